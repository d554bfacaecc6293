"""`saguaro.generate`: HF-style generation with a choice of decoding method."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .drafters import ModelDrafter
from .engines import StopRule, autoregressive, speculative
from .runner import ModelRunner
from .sampling import SamplingConfig, TokenSampler
from .stats import GenerationStats
from .tree import static_tree

METHODS = ("autoregressive", "speculative", "tree")
DEFAULT_TREE = (2, 2, 1, 1)


@dataclass
class GenerateOutput:
    sequences: torch.LongTensor  # [batch, prompt + new], like HF generate()
    stats: GenerationStats


def _eos_ids(eos_token_id, model) -> frozenset[int]:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int):
        return frozenset([eos_token_id])
    return frozenset(int(t) for t in eos_token_id)


def _prompt_ids(input_ids) -> list[int]:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(ids.shape)}")
    if ids.shape[0] != 1:
        raise NotImplementedError(
            f"saguaro.generate handles batch size 1 for now, got {ids.shape[0]} rows; "
            "call it once per prompt"
        )
    if ids.shape[1] == 0:
        raise ValueError("input_ids is empty: give at least one prompt token (e.g. the BOS token)")
    return ids[0].tolist()


def generate(
    target,
    input_ids,
    draft_model=None,
    method: str = "speculative",
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_speculative_tokens: int = 4,
    tree_branching: list[int] | tuple[int, ...] = DEFAULT_TREE,
    eos_token_id: int | list[int] | None = None,
    return_dict_in_generate: bool = False,
    generator: torch.Generator | None = None,
):
    """Generate with `target`, speculating with `draft_model`; output equals the target's own.

    method: "autoregressive" (no draft), "speculative" (a chain of num_speculative_tokens drafts per
    round) or "tree" (a draft tree with tree_branching[d] children per node at depth d, verified
    in one target forward with a tree attention mask).
    Greedy output is token-for-token the target's greedy `generate()`; with do_sample=True the
    output has exactly the target's sampling distribution (temperature / top_k / top_p as in HF).
    Returns a LongTensor [1, prompt + new], or a GenerateOutput with `.sequences` and `.stats`
    when return_dict_in_generate=True. `generator` seeds sampling; by default torch's global RNG
    is used, so torch.manual_seed makes runs reproducible.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method != "autoregressive" and draft_model is None:
        raise ValueError(f"method={method!r} needs a draft_model (or use method='autoregressive')")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(num_speculative_tokens, int) or num_speculative_tokens < 1:
        raise ValueError(f"num_speculative_tokens must be a positive int, got {num_speculative_tokens!r}")
    if method == "tree" and (not tree_branching or any(not isinstance(b, int) or b < 1 for b in tree_branching)):
        raise ValueError(f"tree_branching must be a non-empty list of positive ints, got {tree_branching!r}")
    prompt = _prompt_ids(input_ids)
    sampler = TokenSampler(SamplingConfig(do_sample, temperature, top_k, top_p), generator)
    stop = StopRule(max_new_tokens, _eos_ids(eos_token_id, target))
    branching = list(tree_branching) if method == "tree" else None
    max_depth = len(branching) if branching else num_speculative_tokens
    tree_size = len(static_tree(branching)) if branching else max_depth
    capacity = len(prompt) + max_new_tokens + tree_size + 1
    runner = ModelRunner(target, capacity)
    stats = GenerationStats(method=method, prompt_tokens=len(prompt))

    start = time.perf_counter()
    if method == "autoregressive":
        new = autoregressive(runner, prompt, sampler, stop, stats)
    else:
        drafter = ModelDrafter(draft_model, sampler, target.config.vocab_size, capacity, branching)
        new = speculative(runner, drafter, prompt, sampler, stop, stats, max_depth)
    stats.total_seconds = time.perf_counter() - start
    stats.new_tokens = len(new)

    sequences = torch.tensor([prompt + new], dtype=torch.long, device=torch.as_tensor(input_ids).device)
    return GenerateOutput(sequences, stats) if return_dict_in_generate else sequences
