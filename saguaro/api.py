"""`saguaro.generate` and `SpeculativeGenerator`: HF-style generation with a choice of decoding method."""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import torch

from .drafters import ModelDrafter, PromptLookupDrafter
from .engines import StopRule, autoregressive, saguaro, speculative
from .runner import ModelRunner
from .sampling import SamplingConfig, TokenSampler
from .stats import GenerationStats
from .tree import DynamicTree, static_tree
from .workers import PLACEMENTS, DraftWorker

METHODS = ("autoregressive", "speculative", "tree", "saguaro", "prompt_lookup")
MODEL_FREE = ("autoregressive", "prompt_lookup")
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


class SpeculativeGenerator:
    """A target, its draft model and a decoding method, reusable across generate() calls.

    For method="saguaro" it owns the drafter worker (a process on CPU, a thread on GPU), started
    on the first call and stopped by close(), by leaving a `with` block, or when the generator is
    garbage collected or the interpreter exits - never left behind.
    """

    def __init__(self, target, draft_model=None, method: str = "speculative", num_speculative_tokens: int = 4,
                 tree_branching=DEFAULT_TREE, placement: str | None = None, saguaro_budget: int | None = None,
                 saguaro_reshape: float = 1.0, worker_timeout: float = 60.0):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if method not in MODEL_FREE and draft_model is None:
            raise ValueError(
                f"method={method!r} needs a draft_model (or use a model-free method: {', '.join(MODEL_FREE)})"
            )
        if not isinstance(num_speculative_tokens, int) or num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be a positive int, got {num_speculative_tokens!r}")
        if method == "tree" and not isinstance(tree_branching, DynamicTree) and (
            not tree_branching or any(not isinstance(b, int) or b < 1 for b in tree_branching)
        ):
            raise ValueError(
                f"tree_branching must be a non-empty list of positive ints or a saguaro.DynamicTree, got {tree_branching!r}"
            )
        if placement not in (None, *PLACEMENTS):
            raise ValueError(f"unknown placement {placement!r}; use one of {', '.join(PLACEMENTS)}")
        if not 0 < saguaro_reshape <= 1:
            raise ValueError(f"saguaro_reshape (the factor C on the draft's top tokens) must be in (0, 1], got {saguaro_reshape}")
        self.target, self.draft_model, self.method = target, draft_model, method
        self.num_speculative_tokens = num_speculative_tokens
        self.tree_shape = None
        if method == "tree":
            self.tree_shape = tree_branching if isinstance(tree_branching, DynamicTree) else list(tree_branching)
        self.placement = placement or ("thread" if target.device.type == "cuda" else "process")
        self.worker_timeout = worker_timeout
        self._speculator_kwargs = dict(lookahead=num_speculative_tokens, budget=saguaro_budget,
                                       vocab_size=target.config.vocab_size, reshape_c=saguaro_reshape)
        self._worker: DraftWorker | None = None
        self._finalizer = None

    def _draft_worker(self) -> DraftWorker:
        if self._worker is None:
            self._worker = DraftWorker(self.draft_model, self.placement, self.worker_timeout, **self._speculator_kwargs)
            self._finalizer = weakref.finalize(self, self._worker.close)
        return self._worker

    def _inline_worker(self) -> DraftWorker:
        """After a worker failure: stop what is left of it and draft in this process from now on."""
        if self._worker is not None:
            self._finalizer()
        self._worker = DraftWorker(self.draft_model, "inline", **self._speculator_kwargs)
        return self._worker

    def _tree_extent(self) -> tuple[int, int]:
        """(deepest draft, most draft nodes) per round."""
        if isinstance(self.tree_shape, DynamicTree):
            return self.tree_shape.depth, self.tree_shape.budget
        if self.tree_shape:
            return len(self.tree_shape), len(static_tree(self.tree_shape))
        return self.num_speculative_tokens, self.num_speculative_tokens

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._worker = self._finalizer = None

    def __enter__(self) -> "SpeculativeGenerator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, input_ids, max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | list[int] | None = None,
                 return_dict_in_generate: bool = False, generator: torch.Generator | None = None):
        """See `saguaro.generate`."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        prompt = _prompt_ids(input_ids)
        sampling = SamplingConfig(do_sample, temperature, top_k, top_p)
        sampler = TokenSampler(sampling, generator)
        stop = StopRule(max_new_tokens, _eos_ids(eos_token_id, self.target))
        max_depth, tree_size = self._tree_extent()
        capacity = len(prompt) + max_new_tokens + tree_size + 1
        runner = ModelRunner(self.target, capacity)
        stats = GenerationStats(method=self.method, prompt_tokens=len(prompt))

        start = time.perf_counter()
        if self.method == "autoregressive":
            new = autoregressive(runner, prompt, sampler, stop, stats)
        elif self.method == "prompt_lookup":
            new = speculative(runner, PromptLookupDrafter(), prompt, sampler, stop, stats, max_depth)
        elif self.method == "saguaro":
            new = saguaro(runner, self._draft_worker(), prompt, sampler, stop, stats, self._inline_worker)
        else:
            drafter = ModelDrafter(self.draft_model, sampler, self.target.config.vocab_size, capacity, self.tree_shape)
            new = speculative(runner, drafter, prompt, sampler, stop, stats, max_depth)
        stats.total_seconds = time.perf_counter() - start
        stats.new_tokens = len(new)

        sequences = torch.tensor([prompt + new], dtype=torch.long, device=torch.as_tensor(input_ids).device)
        return GenerateOutput(sequences, stats) if return_dict_in_generate else sequences


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
    **saguaro_options,
):
    """Generate with `target`, speculating with `draft_model`; output equals the target's own.

    method: "autoregressive" (no draft), "speculative" (a chain of num_speculative_tokens drafts per
    round), "prompt_lookup" (model-free: drafts copied from the sequence itself), "tree" (a draft tree with tree_branching[d] children per node at depth d, or a
    saguaro.DynamicTree grown where the drafter is confident; verified in one target forward
    with a tree attention mask) or "saguaro" (speculative speculative
    decoding: the drafter prepares the next draft for the likely verification outcomes while the
    target verifies; options placement=, saguaro_budget=, saguaro_reshape=, worker_timeout=).
    Greedy output is token-for-token the target's greedy `generate()`; with do_sample=True the
    output has exactly the target's sampling distribution (temperature / top_k / top_p as in HF).
    Returns a LongTensor [1, prompt + new], or a GenerateOutput with `.sequences` and `.stats`
    when return_dict_in_generate=True. `generator` seeds sampling; by default torch's global RNG
    is used, so torch.manual_seed makes runs reproducible.
    For many calls with method="saguaro", keep one `SpeculativeGenerator`: its worker starts once.
    """
    with SpeculativeGenerator(target, draft_model, method, num_speculative_tokens, tree_branching,
                              **saguaro_options) as speculative_generator:
        return speculative_generator.generate(input_ids, max_new_tokens, do_sample, temperature, top_k, top_p,
                                              eos_token_id, return_dict_in_generate, generator)
