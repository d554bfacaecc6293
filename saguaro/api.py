"""`saguaro.generate` and `SpeculativeGenerator`: HF-style generation with a choice of decoding method."""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass, field

import torch

from saguaro import distributed
from saguaro.config import DEFAULT_DEPTH, DEFAULT_TREE, METHODS, Method, Options
from saguaro.decode.sampling import SamplingConfig
from saguaro.decode.stats import GenerationStats
from saguaro.draft.compression import DraftConfiguration
from saguaro.generator.decoding import Decoder
from saguaro.generator.draft_side import DraftSide
from saguaro.generator.policy import MethodPolicy
from saguaro.generator.pool import RunnerPool
from saguaro.generator.requests import (
    checked_max_new_tokens,
    eos_ids,
    prompt_rows,
    samplers_and_stops,
    warn_past_positions,
)
from saguaro.model import weights
from saguaro.model.compiled_runner import STATIC_CAPACITY
from saguaro.model.prefix_cache import DEFAULT_MAX_BYTES
from saguaro.tune import auto

# METHODS and DEFAULT_DEPTH stay importable from here, where they were before config.py.
__all__ = ["DEFAULT_DEPTH", "METHODS", "GenerateOutput", "SpeculativeGenerator", "generate"]


@dataclass
class GenerateOutput:
    sequences: torch.LongTensor  # [batch, prompt + new], like HF generate()
    stats: GenerationStats  # the row's, or all rows' merged
    row_stats: list[GenerationStats] = field(default_factory=list)


def _serialised(method):
    """Hold the generator's lock for the whole call: its models' caches, its worker and its
    draft-length controller serve one generation at a time."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class SpeculativeGenerator:
    """A target, its draft model and a decoding method, reusable across generate() calls.

    For method="saguaro" it owns the drafter worker (a process on CPU, a thread on GPU), started
    on the first call and stopped by close(), by leaving a `with` block, or when the generator is
    garbage collected or the interpreter exits - never left behind. A worker that fails is replaced
    by inline drafting with a `SaguaroWarning` (once per generator), or re-raised with strict=True.

    Thread-safe: concurrent generate() calls are serialised (one lock held for the whole call), as
    they share the models' caches, the worker and the draft-length controller.
    copy.deepcopy and pickle copy the generator without its worker (the copy starts its own on its
    first call) and leave the original untouched.

    Prefix reuse (prefix_cache=True, the default): the target, the draft and the Saguaro worker
    each keep the KV of the sequences this generator produced (prompt + answer) in a
    `PrefixCache` of at most prefix_cache_bytes bytes, so a prompt that starts like an earlier
    sequence (the next turn of a chat, another request behind the same system prompt) prefills only
    the rest; `.stats.reused_prompt_tokens` counts the target's. The output is unchanged. A copy
    starts with empty caches. Stored KV belongs to the weights that computed it: each call first
    checks both models' weights (`weights.observe`: identity, storage, version counters and
    sampled values, so writes through `param.data` and `load_state_dict(assign=True)` are seen
    too), and what was built from weights that moved is rebuilt: prefix caches, the packed target,
    the compressed draft, the worker. After a write of a few elements only, call
    `saguaro.weights_changed(model)`.
    """

    def __init__(
        self,
        target,
        draft_model=None,
        method: str = "auto",
        num_speculative_tokens: int | None = None,
        tree_branching=DEFAULT_TREE,
        placement: str | None = None,
        saguaro_budget: int | None = None,
        saguaro_reshape: float = 1.0,
        worker_timeout: float = 60.0,
        speculation_schedule: str = "adaptive",
        draft_device: str | torch.device | None = None,
        strict: bool = False,
        draft_quantization: str | None = "auto",
        draft_vocab_size: int | str | None = "auto",
        prefix_cache: bool = True,
        prefix_cache_bytes: int = DEFAULT_MAX_BYTES,
        compile: bool = False,
        pack_target_weights: bool = True,
        static_capacity: int = STATIC_CAPACITY,
    ):
        # A target sharded over several ranks: rank 0 decodes, the others follow (distributed/__init__.py).
        self._tp = distributed.tensor_parallel_target(target)
        self.options = Options.checked(
            target,
            draft_model,
            self._tp,
            method=method,
            num_speculative_tokens=num_speculative_tokens,
            tree_branching=tree_branching,
            placement=placement,
            saguaro_budget=saguaro_budget,
            saguaro_reshape=saguaro_reshape,
            worker_timeout=worker_timeout,
            speculation_schedule=speculation_schedule,
            draft_device=draft_device,
            strict=strict,
            draft_quantization=draft_quantization,
            draft_vocab_size=draft_vocab_size,
            prefix_cache=prefix_cache,
            prefix_cache_bytes=prefix_cache_bytes,
            compile=compile,
            pack_target_weights=pack_target_weights,
            static_capacity=static_capacity,
        )
        self.target, self.draft_model = target, draft_model
        tensor_parallel = self._tp is not None
        self.policy = MethodPolicy(self.options, target, draft_model is not None, tensor_parallel)
        self.pool = RunnerPool(target, draft_model, self.options, tensor_parallel)
        self.drafts = DraftSide(draft_model, self.options, target.config.vocab_size)
        self._decoder = Decoder(target, self._tp, self.policy, self.pool, self.drafts)
        self._lock = threading.Lock()
        # A draft with fixed options is built now; "auto" measures on the first call's prompt.
        fixed = "auto" not in (self.options.draft_quantization, self.options.draft_vocab_size)
        if draft_model is not None and not self.policy.method.model_free and fixed:
            self.drafts.prepare([], self.pool.target(), self.policy.threads)

    @property
    def method(self) -> Method:
        """The method the next call decodes with (method="auto" settles it at each call)."""
        return self.policy.method

    @property
    def auto_choice(self) -> auto.Choice | None:
        """method="auto"'s last choice: each method's predicted tokens/s, and why."""
        return self.policy.choice

    @property
    def draft_configuration(self) -> DraftConfiguration | None:
        """The draft the drafters run (quantization, vocabulary), once prepared."""
        return self.drafts.configuration

    def __getstate__(self) -> dict:
        # A copy (deepcopy, pickle) gets a fresh lock; its parts drop what must not be shared.
        return dict(vars(self), _lock=None)

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Stop the drafter worker, if one runs (a later call starts another)."""
        self.drafts.close()

    def __enter__(self) -> SpeculativeGenerator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @_serialised
    def generate(
        self,
        input_ids,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        return_dict_in_generate: bool = False,
        generator: torch.Generator | None = None,
        *,
        attention_mask=None,
        pad_token_id: int | None = None,
        logits_processor=None,
        stopping_criteria=None,
        streamer=None,
    ):
        """See `saguaro.generate`. Rows of a batch (left-padded, per `attention_mask`) are generated
        together (decode/batched.py: one target forward per round for all live rows, each accepting its
        own count; "saguaro" and an auto-chosen tree run batched chains), except for method="tree",
        whose rows run one after another; each row exactly as alone, finished rows padded with
        pad_token_id.
        `logits_processor` (HF processors applied to the target's scores, each position with its own
        history) is one LogitsProcessorList for all rows or a list of them, one per row."""
        max_new_tokens = checked_max_new_tokens(max_new_tokens)
        ids, prompts, pads = prompt_rows(input_ids, attention_mask, self.target.config.vocab_size)
        if streamer is not None and len(prompts) > 1:
            raise ValueError("a streamer takes one sequence: stream with batch size 1, or drop streamer=")
        warn_past_positions(self.target, max(len(p) for p in prompts), max_new_tokens)
        sampling = SamplingConfig(do_sample, temperature, top_k, top_p)
        # Whatever was built from the weights (packed target, compressed draft, prefix caches, the
        # worker's copy) is rebuilt below if they moved since the last call, by any route (model/weights.py).
        call_start = time.perf_counter()
        weights.observe(self.target)
        weights.observe(self.draft_model)
        if self.policy.auto and self.draft_model is not None:
            target = self.pool.target()
            draft = self.drafts.prepare(prompts[0], target, self.policy.threads)
            self.policy.choose(target, draft, greedy=not sampling.do_sample)
        eos = eos_ids(eos_token_id, self.target)
        if streamer is not None:
            streamer.put(ids.cpu())
        samplers, stops = samplers_and_stops(
            prompts, pads, sampling, generator, logits_processor, pad_token_id, max_new_tokens, eos,
            stopping_criteria, streamer,
        )  # fmt: skip
        results, batched = self._decoder.rows(prompts, samplers, stops)
        if self.policy.auto:
            for _, stats in results:
                self.policy.learn(stats)
        if streamer is not None:
            streamer.end()

        width = max(len(new) for new, _ in results)
        if width > min(len(new) for new, _ in results) and pad_token_id is None:
            pad_token_id = next(iter(sorted(eos)), None)
            if pad_token_id is None:
                raise ValueError(
                    "rows ended at different lengths and there is no pad_token_id (or EOS) to fill "
                    "the shorter ones; pass pad_token_id="
                )
        tail = torch.full(
            (ids.shape[0], width), pad_token_id if pad_token_id is not None else 0, dtype=torch.long
        )
        for row, (new, _) in enumerate(results):
            tail[row, : len(new)] = torch.tensor(new, dtype=torch.long)
        sequences = torch.cat([ids.cpu(), tail], dim=1).to(ids.device)
        if not return_dict_in_generate:
            return sequences
        rows = [stats for _, stats in results]
        rows[0].setup_seconds = (self._decoder.decode_start or time.perf_counter()) - call_start
        merged = rows[0] if len(rows) == 1 else GenerationStats.merge(rows, concurrent=batched)
        return GenerateOutput(sequences, merged, rows)


def generate(
    target,
    input_ids,
    draft_model=None,
    method: str = "auto",
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_speculative_tokens: int | None = None,
    tree_branching: list[int] | tuple[int, ...] = DEFAULT_TREE,
    eos_token_id: int | list[int] | None = None,
    return_dict_in_generate: bool = False,
    generator: torch.Generator | None = None,
    *,
    attention_mask=None,
    pad_token_id: int | None = None,
    streamer=None,
    **saguaro_options,
):
    """Generate with `target`, speculating with `draft_model`; output equals the target's own.

    method: "auto" (the default: see below), "autoregressive" (no draft), "speculative" (a chain
    of up to num_speculative_tokens drafts per round; None: 6 for saguaro, 4 for the others),
    "prompt_lookup" (model-free: drafts copied from the sequence itself),
    "tree" (a draft tree with tree_branching[d] children per node at depth d, or a
    saguaro.DynamicTree grown where the drafter is confident; verified in one target forward with
    a tree attention mask) or "saguaro" (speculative speculative decoding: the drafter prepares
    the next draft for the likely verification outcomes while the target verifies; options
    placement=, saguaro_budget=, saguaro_reshape=, worker_timeout=, draft_device=), or "auto"
    (whichever of these the cost model predicts fastest on this hardware, from step costs timed
    once per process and the acceptance measured so far; `SpeculativeGenerator.auto_choice` says
    which it took and why).
    draft_quantization ("auto", "int8", "int4", None) and draft_vocab_size ("auto", an int, None)
    make the draft cheaper (weight-only quantized linears; logits for the lowest ids plus the
    special ones only) without touching exactness; "auto" measures the variants on the first prompt
    against the target and keeps the plain draft unless one promises >10% more tokens/s. The choice is in
    `.stats.draft_configuration` (and `SpeculativeGenerator.draft_configuration`).
    With speculation_schedule="adaptive" (default) each round drafts the length that maximises
    measured tokens/s (0 = a plain target step when speculation loses, as on CPUs where verifying
    T tokens costs ~T steps); "constant" always drafts num_speculative_tokens.
    Greedy output is token-for-token the target's greedy `generate()`; with do_sample=True the
    output has exactly the target's sampling distribution (temperature / top_k / top_p as in HF).
    A batch is left-padded per `attention_mask` and decoded as one (every live row verified in one
    target forward per round, finished rows dropping out); `streamer` gets tokens as rounds accept them.
    Returns a LongTensor [batch, prompt + new], or a GenerateOutput with `.sequences` and `.stats`
    when return_dict_in_generate=True. `generator` seeds sampling; by default torch's global RNG
    is used, so torch.manual_seed makes runs reproducible for a fixed method with
    speculation_schedule="constant" (auto's choices and adaptive lengths follow measured timings).
    compile=True runs the target's steps, and the chain drafter's, as compiled graphs of fixed shape
    on static KV caches (inductor on CPU, CUDA graphs on GPU; model/compiled_runner.py): the first calls
    compile (seconds to minutes per shape), later ones are faster. Off by default: it pays on long
    or many generations with one generator, not on a single short call. Sliding-window models
    cannot use it. A static cache starts at static_capacity slots (256; a positive int), a prefill
    sizes it for the prompt plus at most 1024 new tokens, and it doubles whenever the sequence needs
    more (mid-call too); each growth recompiles that runner's graphs once at the new size (seconds
    to minutes on a CPU; a size compiled before in the process is reused) and is logged as a warning
    on the "saguaro" logger. A static_capacity holding the longest prompt + answer avoids them.
    pack_target_weights=True (default): on CPU in bf16 the target runs with oneDNN-prepacked
    linears (model/packed_linear.py), the same products without re-laying every weight out on each call
    (~1.5x a forward on the demo target), at the memory of one copy of its linear weights; used
    only where that copy fits in half the free memory and the model's own layers give the same
    bits and are slower. False keeps the model's own linears.
    For many calls, keep one `SpeculativeGenerator` (a Saguaro worker then starts once), or patch
    the model with `saguaro.enable` and call `model.generate` as usual: only a kept generator (or an
    enabled model) reuses the KV of earlier calls' prompts and answers (prefix_cache=True, its
    default, with a budget of prefix_cache_bytes per model); here, a fresh generator per call, the
    option is moot.
    """
    with SpeculativeGenerator(
        target, draft_model, method, num_speculative_tokens, tree_branching, **saguaro_options
    ) as speculative_generator:
        return speculative_generator.generate(
            input_ids,
            max_new_tokens,
            do_sample,
            temperature,
            top_k,
            top_p,
            eos_token_id,
            return_dict_in_generate,
            generator,
            attention_mask=attention_mask,
            pad_token_id=pad_token_id,
            streamer=streamer,
        )
