"""`saguaro.generate` and `SpeculativeGenerator`: HF-style generation with a choice of decoding method."""

from __future__ import annotations

import functools
import numbers
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field, replace

import torch
from transformers.generation.logits_process import LogitsProcessorList

from saguaro import distributed
from saguaro.decode.batched import BatchedModelDrafter, PerRowDrafters, batched_speculative
from saguaro.decode.engines import StopRule, autoregressive, speculative
from saguaro.decode.sampling import SamplingConfig, TokenSampler
from saguaro.decode.stats import GenerationStats
from saguaro.distributed.consensus import Consensus
from saguaro.draft.compression import DraftConfiguration, check_draft_options, prepare_draft
from saguaro.draft.drafters import InlineDrafts, ModelDrafter, PromptLookupDrafter
from saguaro.draft.stream import DraftStream
from saguaro.faults import WorkerFailed, logger, warn
from saguaro.model import weights
from saguaro.model.batched_runner import BatchedRunner
from saguaro.model.compiled_runner import (
    CHAIN_FEED,
    GREEDY_BLOCK,
    STATIC_CAPACITY,
    CompiledRunner,
    check_compilable,
    check_static_capacity,
)
from saguaro.model.packed_linear import runnable_target
from saguaro.model.placement import NoSplit, ThreadSplit
from saguaro.model.prefix_cache import DEFAULT_MAX_BYTES, PrefixCache, check_max_bytes
from saguaro.model.runner import ModelRunner
from saguaro.model.tree import DynamicTree, static_tree
from saguaro.ssd.worker import PLACEMENTS, DraftWorker
from saguaro.tune import auto
from saguaro.tune.cost_model import BatchLookaheads, LookaheadController, TreeDepthController

METHODS = ("autoregressive", "speculative", "tree", "saguaro", "prompt_lookup", "auto")
SCHEDULES = ("adaptive", "constant")
# How drafting time grows with the draft length, per method whose draft length adapts. Saguaro's
# drafter works while the target verifies: the target waits once per round, whatever the length.
# A tree adapts its depth (one draft forward per level; see TreeDepthController).
ADAPTIVE_DRAFT_COST = {
    "speculative": "per_token",
    "prompt_lookup": "free",
    "saguaro": "per_round",
    "tree": "per_token",
}
MODEL_FREE = ("autoregressive", "prompt_lookup")
# Methods whose batches run as one (decode/batched.py); a tree's batch runs row after row.
BATCHED_METHODS = ("autoregressive", "speculative", "saguaro", "prompt_lookup")
DEFAULT_TREE = (2, 2, 1, 1)
# num_speculative_tokens=None: the deepest draft per round, by method. Saguaro's drafting is hidden
# behind the verification, so a deeper draft costs only the verification's extra tokens: on the demo
# pair at one thread each, 6 gave 1.13x the tokens/s of 4 (median of six held-out prompts).
DEFAULT_DEPTH = {"saguaro": 6, None: 4}


@dataclass
class GenerateOutput:
    sequences: torch.LongTensor  # [batch, prompt + new], like HF generate()
    stats: GenerationStats  # the row's, or all rows' merged
    row_stats: list[GenerationStats] = field(default_factory=list)


def _eos_ids(eos_token_id, model) -> frozenset[int]:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int):
        return frozenset([eos_token_id])
    return frozenset(int(t) for t in eos_token_id)


def _prompt_rows(
    input_ids, attention_mask, vocab_size: int
) -> tuple[torch.Tensor, list[list[int]], list[int]]:
    """[batch, length] ids (+ mask) -> (ids, each row's prompt without padding, each row's pad count);
    every prompt token must be an id of the target's `vocab_size`-token vocabulary."""
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise ValueError("input_ids is empty: give at least one prompt token (e.g. the BOS token)")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        # HF fails deep in the embedding lookup; say it here, and how to fix it.
        raise TypeError(
            f"input_ids must hold integer token ids, got dtype {ids.dtype}; tokenize the text, or convert "
            "with input_ids.long()"
        )
    # Like HF, a float mask (1.0 / 0.0) is as good as an integer one: nonzero means attend.
    mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask)
    if mask.numel() != ids.numel():
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)} but input_ids {tuple(ids.shape)}: pass the mask "
            "the tokenizer returned with these input_ids (one entry per token), or none"
        )
    mask = mask.reshape(ids.shape).ne(0).long()
    rows, pads = [], []
    for row, row_mask in zip(ids.tolist(), mask.tolist()):
        pad = len(row_mask) - sum(row_mask)
        if any(row_mask[:pad]) or not all(row_mask[pad:]):
            raise ValueError(
                "attention_mask must be left padding (zeros first, then ones): decoder-only generation "
                "appends after the last token. Set tokenizer.padding_side = 'left' before tokenizing "
                "the batch"
            )
        if pad == len(row):
            raise ValueError("a row of input_ids is all padding: every prompt needs at least one token")
        # The runner feeds ids beyond a draft's smaller table as 0; an id the target lacks would be
        # fed so too, giving an answer to another prompt (HF fails in the embedding lookup).
        bad = [t for t in row[pad:] if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(
                f"input_ids holds token id {bad[0]}, outside the target's {vocab_size}-token vocabulary "
                f"(ids 0 to {vocab_size - 1}): tokenize with the target's own tokenizer"
            )
        rows.append(row[pad:])
        pads.append(pad)
    return ids, rows, pads


def _check_pair(target, draft_model, draft_device) -> None:
    """Clear errors for a draft model that cannot serve this target."""
    if draft_model is None:
        return
    for model, role in ((target, "target"), (draft_model, "draft_model")):
        if getattr(model.config, "is_encoder_decoder", False) or not model.can_generate():
            raise TypeError(
                f"{role} ({type(model).__name__}) is not a decoder-only causal LM; load it with "
                "AutoModelForCausalLM"
            )
        if model.device.type == "meta":
            # Shapes without weights: no draft_device can make it run (the device hint below would).
            raise ValueError(
                f"{role} is on the meta device, so it has no weights; load it with its weights (no "
                "meta-device init, no device_map that offloads it) before passing it to saguaro"
            )
    if draft_device is not None:
        _check_draft_device(draft_device, draft_model)
    if draft_model.device != target.device and (
        draft_device is None or torch.device(draft_device) != draft_model.device
    ):
        raise ValueError(
            f"draft_model is on {draft_model.device} but the target on {target.device}; move the draft with "
            f".to('{target.device}'), or pass draft_device='{draft_model.device}' to draft there on purpose "
            "(only token ids and draft probabilities cross devices)"
        )
    # Families pad their embedding tables differently (Qwen2.5: 151936 vs 152064 rows for one
    # 151665-token tokenizer), so sizes may differ a little; a different tokenizer differs a lot,
    # or in its special tokens.
    sizes = target.config.vocab_size, draft_model.config.vocab_size
    if min(sizes) < 0.95 * max(sizes):
        raise ValueError(
            f"target and draft vocabularies differ ({sizes[0]} vs {sizes[1]} entries): the draft must share "
            "the target's tokenizer (e.g. a smaller model of the same family)"
        )
    for name in ("eos_token_id", "bos_token_id"):
        ids = [getattr(getattr(m, "generation_config", None), name, None) for m in (target, draft_model)]
        ids = [frozenset([i] if isinstance(i, int) else i) for i in ids if i is not None]
        if len(ids) == 2 and not ids[0] & ids[1]:
            raise ValueError(
                f"target and draft disagree on {name} ({set(ids[0])} vs {set(ids[1])}): "
                "they do not share a tokenizer"
            )


def _check_draft_device(draft_device, draft_model) -> None:
    """draft_device says where the draft already is (on purpose apart from the target); it moves
    nothing, so a device this machine lacks, or one the draft is not on, is a mistake to name now."""
    try:
        device = torch.device(draft_device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"draft_device={draft_device!r} is not a device (e.g. 'cpu', 'cuda:1')") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"draft_device={draft_device!r} but CUDA is not available on this machine; drop draft_device "
            "to draft on the target's device"
        )
    actual = draft_model.device
    if device.type != actual.type or device.index not in (None, actual.index):
        raise ValueError(
            f"draft_device={draft_device!r} but draft_model is on {actual}; draft_device moves nothing: "
            f"move the draft with draft_model.to('{device}') first, or drop draft_device"
        )


def _check_saguaro_options(target, draft_model, saguaro_budget, worker_timeout):
    """Clear errors for options the Saguaro worker would otherwise trip over mid-generation."""
    if saguaro_budget is not None:
        if not isinstance(saguaro_budget, numbers.Integral) or isinstance(saguaro_budget, bool):
            raise ValueError(f"saguaro_budget must be an int (or None to adapt it), got {saguaro_budget!r}")
        if saguaro_budget < 1:
            raise ValueError(
                f"saguaro_budget={saguaro_budget} pre-speculates no branch: use at least 1 "
                "(or None to adapt it)"
            )
        # An outcome's guesses are tokens of the draft's vocabulary, at most `budget` of them.
        vocab = min(m.config.vocab_size for m in (target, draft_model) if m is not None)
        if saguaro_budget > vocab:
            raise ValueError(
                f"saguaro_budget={saguaro_budget} exceeds the {vocab}-token vocabulary, so an outcome "
                f"could need more guesses than there are tokens; lower it to at most {vocab}"
            )
    if (
        not isinstance(worker_timeout, numbers.Real)
        or isinstance(worker_timeout, bool)
        or not 0 < worker_timeout < float("inf")
    ):
        # inf (and nan) would reach the worker's waits, which take finite seconds only.
        raise ValueError(
            "worker_timeout (seconds to wait for a draft) must be a finite number > 0, got "
            f"{worker_timeout!r}; for a very patient wait give a large number (e.g. 3600)"
        )


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
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        # A target sharded over several ranks: rank 0 decodes, the others follow (distributed/__init__.py).
        self._tp = distributed.tensor_parallel_target(target)
        if self._tp is not None:
            method, placement, draft_quantization, draft_vocab_size = distributed.settle_options(
                self._tp, method, draft_model is not None, placement, draft_quantization, draft_vocab_size
            )
        if method not in (*MODEL_FREE, "auto") and draft_model is None:
            raise ValueError(
                f"method={method!r} needs a draft_model (or use a model-free method: {', '.join(MODEL_FREE)})"
            )
        _check_pair(target, draft_model if method not in MODEL_FREE else None, draft_device)
        if num_speculative_tokens is None:
            num_speculative_tokens = DEFAULT_DEPTH.get(method, DEFAULT_DEPTH[None])
        # bool is an int to Python, but True is no draft length.
        if (
            not isinstance(num_speculative_tokens, int)
            or isinstance(num_speculative_tokens, bool)
            or num_speculative_tokens < 1
        ):
            raise ValueError(f"num_speculative_tokens must be a positive int, got {num_speculative_tokens!r}")
        # "auto" may choose the tree, so its shape is checked then too.
        if (
            method in ("tree", "auto")
            and not isinstance(tree_branching, DynamicTree)
            and (
                not isinstance(tree_branching, (list, tuple))
                or not tree_branching
                or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in tree_branching)
            )
        ):
            raise ValueError(
                "tree_branching must be a non-empty list of positive ints or a saguaro.DynamicTree, "
                f"got {tree_branching!r}"
            )
        if placement not in (None, *PLACEMENTS):
            raise ValueError(f"unknown placement {placement!r}; use one of {', '.join(PLACEMENTS)}")
        if placement == "rank" and (self._tp is None or self._tp.drafter_rank is None):
            raise ValueError(
                "placement='rank' drafts on a drafter rank: start the run with "
                "saguaro.distributed.init(tp, drafter_rank=True) and load the target with load_target"
            )
        if speculation_schedule not in SCHEDULES:
            raise ValueError(
                f"unknown speculation_schedule {speculation_schedule!r}; use one of {', '.join(SCHEDULES)}"
            )
        check_draft_options(draft_quantization, draft_vocab_size, draft_model)
        if not 0 < saguaro_reshape <= 1:
            raise ValueError(
                "saguaro_reshape (the factor C on the draft's top tokens) must be in (0, 1], "
                f"got {saguaro_reshape}"
            )
        _check_saguaro_options(target, draft_model, saguaro_budget, worker_timeout)
        if not isinstance(prefix_cache, bool):
            raise ValueError(f"prefix_cache must be True or False, got {prefix_cache!r}")
        check_max_bytes(prefix_cache_bytes)
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be True or False, got {compile!r}")
        if compile and self._tp is not None:
            raise ValueError(
                "compile=True does not serve a tensor-parallel target (its other ranks replay eager "
                "runner operations); pass compile=False"
            )
        if compile:
            check_compilable(target, draft_model if method not in MODEL_FREE else None)
        check_static_capacity(static_capacity)
        if not isinstance(pack_target_weights, bool):
            raise ValueError(f"pack_target_weights must be True or False, got {pack_target_weights!r}")
        self.target, self.draft_model = target, draft_model
        # compile=True: the target's and the chain drafter's steps run as compiled graphs on static
        # caches (model/compiled_runner.py), kept across calls so the graphs compiled at warm-up serve them.
        self.compile = compile
        self.static_capacity = static_capacity  # a static cache's first size; it doubles as needed
        self._static_runners: dict[str, CompiledRunner] = {}
        # The target as the runners run it (model/packed_linear.py), built on the first call. Compiled
        # graphs pack weights their own way; a sharded target's other ranks run the plain model.
        self._pack_target = pack_target_weights and not compile and self._tp is None
        # Each model's prefix cache (None: off) holds the KV of earlier calls' sequences; the Saguaro
        # worker keeps its own in its process.
        self._prefix_cache_bytes = prefix_cache_bytes if prefix_cache else None
        self._new_prefix_caches()
        self.num_speculative_tokens = num_speculative_tokens
        self.placement = placement or ("thread" if target.device.type == "cuda" else "process")
        self.worker_timeout = worker_timeout
        self._tree_branching, self._schedule = tree_branching, speculation_schedule
        # method="auto" settles on a method at each call, from measured step costs and acceptance.
        self.auto = method == "auto"
        self.auto_choice: auto.Choice | None = None
        self._auto_counts = [0, 0, 0, 0]  # accepted, rejected, hits, rounds after the first
        self.strict = strict
        self._speculator_kwargs = dict(
            lookahead=num_speculative_tokens,
            budget=saguaro_budget,
            vocab_size=target.config.vocab_size,
            reshape_c=saguaro_reshape,
            prefix_cache_bytes=self._prefix_cache_bytes,
        )
        # The draft the drafters run (quantized / reduced vocabulary, see draft_compression), built
        # once: on the first call under "auto", which measures on that call's first prompt.
        self._draft_options = (draft_quantization, draft_vocab_size)
        self._draft = None
        self.draft_configuration: DraftConfiguration | None = None
        self._worker: DraftWorker | None = None
        self._worker_draft = None  # (the draft it runs, the weight epoch it forked at)
        self._decode_start: float | None = None  # this call's, for .stats.setup_seconds
        self._finalizer = None
        self._lock = threading.Lock()
        self._warned_worker_failure = False
        if self.auto:
            method = "speculative" if draft_model is not None else "prompt_lookup"
        self._configure(method)
        if draft_model is not None and method not in MODEL_FREE and "auto" not in self._draft_options:
            self._prepared_draft([])

    def _new_prefix_caches(self) -> None:
        size = self._prefix_cache_bytes
        self._target_prefixes = PrefixCache(size) if size is not None else None
        self._draft_prefixes = PrefixCache(size) if size is not None else None

    def _configure(self, method: str) -> None:
        """Everything that follows from the decoding method."""
        self.method = method
        self.tree_shape = None
        if method == "tree":
            branching = self._tree_branching
            self.tree_shape = branching if isinstance(branching, DynamicTree) else list(branching)
        # On CPU the worker process and the target share the cores: split them (model/placement.py).
        cpu_worker = method == "saguaro" and self.placement == "process" and self.target.device.type == "cpu"
        self.threads = ThreadSplit.for_cpu() if cpu_worker else NoSplit()
        # Kept across calls: what a step costs on this machine carries over from one prompt to the next.
        self.lookahead = None
        if self._schedule == "adaptive" and method in ADAPTIVE_DRAFT_COST:
            controller = TreeDepthController if method == "tree" else LookaheadController
            self.lookahead = controller(self._tree_extent()[0], ADAPTIVE_DRAFT_COST[method])
        self._batch_lookaheads = BatchLookaheads(
            self.num_speculative_tokens, "free" if method == "prompt_lookup" else "per_token"
        )

    def _choose_method(self, sample: list[int], greedy: bool = True) -> None:
        """method="auto": the method the cost model predicts fastest, from step costs measured once
        (with the draft the drafters will run) and the acceptance (and Saguaro hit rate) measured
        over this generator's earlier calls."""
        if self.draft_model is None:
            return  # prompt lookup, which turns itself off where it does not pay
        on_cpu = self.target.device.type == "cpu"
        split = ThreadSplit.for_cpu() if on_cpu and self.placement == "process" else NoSplit()
        concurrent = self.placement != "inline" and (split.drafter > 0 or not on_cpu)
        accepted, rejected, hits, rounds = self._auto_counts
        acceptance = (accepted + 7 * auto.PRIOR_ACCEPTANCE) / (accepted + rejected + 7)
        hit_rate = (hits + 7 * auto.PRIOR_HIT_RATE) / (rounds + 7)
        branching = None if isinstance(self._tree_branching, DynamicTree) else self._tree_branching
        self.auto_choice = auto.choose(
            self._runnable_target(),
            self._prepared_draft(sample),
            self.num_speculative_tokens,
            branching,
            split,
            concurrent,
            acceptance,
            hit_rate,
            self.compile,
            greedy,
        )
        if self.auto_choice.method != self.method:
            self._configure(self.auto_choice.method)

    def _learn_acceptance(self, stats: GenerationStats) -> None:
        """Keep method="auto"'s acceptance and hit-rate estimates current."""
        drafted_rounds = [r for r in stats.round_log if r["drafted"]]
        self._auto_counts[0] += sum(r["accepted"] for r in drafted_rounds)
        # A draft was refused where the accepted path stops short of its depth: a tree's path is
        # never as long as its node count, so counting against that would call every tree round a
        # rejection. (A tree level's acceptance, with its siblings, is what a tree round measures.)
        self._auto_counts[1] += sum(r["accepted"] < r["depth"] for r in drafted_rounds)
        if self.method == "saguaro":
            self._auto_counts[2] += stats.hits
            self._auto_counts[3] += max(0, len(drafted_rounds) - 1)

    def _seed_saguaro_lookahead(self) -> None:
        """Show Saguaro's adaptive schedule the step costs `auto` times once per process (the
        target alone for a plain step, beside the worker for a verification), so that where
        verification costs about K+1 steps (a CPU without native bf16) the very first round is a
        plain step, since no draft pays at a typical acceptance (elsewhere the controller starts
        unseeded: see `LookaheadController.seed`). A few forwards, once per process;
        `method="auto"` has them already."""
        # A tensor-parallel target is not timed: its other ranks could not follow the leader's forwards.
        if self.lookahead is None or self.lookahead.verify or self._tp is not None:
            return
        k = self.num_speculative_tokens
        calibration = auto.calibrate(self._runnable_target(), self._draft, k, self.threads)
        # At auto's prior acceptance, not all-accepted drafts: 6 tokens all accepted would pay at
        # 5.8 steps (a 7-token verification without native bf16, emulated on the demo pair),
        # where the first round's 6-deep draft cost a chat prompt a quarter of its time.
        timed = {1: calibration.target_alone(1), k + 1: calibration.target_beside(k + 1)}
        self.lookahead.seed(timed, acceptance=auto.PRIOR_ACCEPTANCE)

    def _runnable_target(self):
        """The target the runners run: on CPU in bf16, a view with prepacked linears (the same
        products, faster: model/packed_linear.py), else the model itself. One per model and weight epoch,
        shared with every other generator of the model."""
        return runnable_target(self.target, self._pack_target, self._memory_reserve())

    def _memory_reserve(self) -> int:
        """Bytes the packed target must leave free for what else this generator holds: a
        compressed draft (at most the draft's size) and full prefix caches (target, draft, worker)."""
        draft = 0 if self.draft_model is None else sum(p.nbytes for p in self.draft_model.parameters())
        return draft + 3 * (self._prefix_cache_bytes or 0)

    def _prepared_draft(self, sample: list[int]):
        """The draft the drafters run, shared with every generator of the same pair and options
        (draft_compression.prepare_draft): measured once, rebuilt when the draft's weights move."""
        # One choice per pair and options, whatever the method, measured on the caller's threads:
        # a variant's step cost against another's is alike on a worker's thread, and auto's method
        # may move between calls, which must not measure the draft again (~20 s on the demo pair).
        self._draft, record = prepare_draft(
            self.draft_model,
            self._runnable_target(),
            *self._draft_options,
            sample,
            None,
            self.num_speculative_tokens,
        )
        # The threads it drafts on in this generator: a CPU Saguaro worker's own, else the caller's.
        self.draft_configuration = replace(record, threads=self.threads.drafter or None)
        return self._draft

    def _draft_worker(self) -> DraftWorker:
        """The worker, started on the first call; a failed one is restarted here (with backoff)."""
        if self._worker is not None and self._worker_draft != (self._draft, weights.epoch(self.draft_model)):
            # The draft's weights moved (the worker computes with a copy of the old ones) or its
            # prepared variant was rebuilt: a new worker, with empty caches, on the new draft.
            logger.info("saguaro: the draft's weights changed; restarting the drafter worker")
            self.close()
        if self._worker is None:
            self._worker_draft = (self._draft, weights.epoch(self.draft_model))
            self._worker = DraftWorker(
                self._draft,
                self.placement,
                self.worker_timeout,
                threads=self.threads.drafter or 1,
                **self._speculator_kwargs,
            )
            self._finalizer = weakref.finalize(self, self._worker.close)
        elif self._worker.heal():
            logger.info("saguaro: drafter worker restarted (restart %d)", self._worker.restarts)
        return self._worker

    def __getstate__(self) -> dict:
        # A copy (deepcopy, pickle) must not share the live worker, its finalizer or the lock: it
        # gets a fresh lock and starts a worker of its own on its first call (warned afresh if it fails).
        # It starts with empty prefix caches: copying stored KV would cost memory for no exactness.
        state = dict(vars(self))
        state.update(_worker=None, _finalizer=None, _lock=None, _warned_worker_failure=False)
        state.update(_target_prefixes=None, _draft_prefixes=None, _static_runners={}, _worker_draft=None)
        return state

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state)
        self._lock = threading.Lock()
        self._new_prefix_caches()

    def _inline_worker(self, error: BaseException | None = None) -> DraftWorker:
        """After a worker failure: the same handle drafts inline for the rest of the call and
        restarts the worker on a later one. The first failure of a generator warns (with the
        worker's traceback), later ones are logged; under strict=True `error` is re-raised."""
        if self.strict:
            raise error if error is not None else WorkerFailed("the drafter worker failed")
        cause = f" ({type(error).__name__}: {error})" if error is not None else ""
        message = (
            f"saguaro: the {self.placement} drafter worker failed{cause}; drafting inline for the rest of "
            "this call (output stays exact), a new worker starts on a later call. Pass strict=True to raise"
        )
        if getattr(error, "remote_traceback", None):
            message += "\nin the worker:\n" + error.remote_traceback
        if self._warned_worker_failure:
            logger.warning(message)
        else:
            self._warned_worker_failure = True
            warn(message, stacklevel=3)
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
        if (
            not isinstance(max_new_tokens, numbers.Integral)
            or isinstance(max_new_tokens, bool)
            or max_new_tokens < 1
        ):
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        max_new_tokens = int(max_new_tokens)  # numpy integers too
        ids, prompts, pads = _prompt_rows(input_ids, attention_mask, self.target.config.vocab_size)
        if streamer is not None and len(prompts) > 1:
            raise ValueError("a streamer takes one sequence: stream with batch size 1, or drop streamer=")
        limit = getattr(self.target.config, "max_position_embeddings", None)
        longest = max(len(p) for p in prompts)
        if limit and longest + max_new_tokens > limit:
            # As HF: the model may cope (rotary positions extrapolate) or fail; warn and try.
            warn(
                f"saguaro: a {longest}-token prompt + max_new_tokens={max_new_tokens} exceeds the target's "
                f"{limit} positions (max_position_embeddings); the model may degrade or fail past them. "
                "Shorten the prompt or lower max_new_tokens to stay within them",
                stacklevel=3,
            )
        sampling = SamplingConfig(do_sample, temperature, top_k, top_p)
        # Whatever was built from the weights (packed target, compressed draft, prefix caches, the
        # worker's copy) is rebuilt below if they moved since the last call, by any route (model/weights.py).
        call_start, self._decode_start = time.perf_counter(), None
        weights.observe(self.target)
        weights.observe(self.draft_model)
        if self.auto:
            self._choose_method(prompts[0], greedy=not sampling.do_sample)
        eos = _eos_ids(eos_token_id, self.target)
        if streamer is not None:
            streamer.put(ids.cpu())
        if logits_processor is None or isinstance(logits_processor, LogitsProcessorList):
            logits_processor = [logits_processor] * len(prompts)
        samplers = [
            TokenSampler(sampling, generator, processors, [pad_token_id] * pad if pad else [])
            for pad, processors in zip(pads, logits_processor)
        ]
        stops = [
            StopRule(max_new_tokens, eos, stopping_criteria, sampler.history_prefix + prompt, streamer)
            for prompt, sampler in zip(prompts, samplers)
        ]
        # A tensor-parallel target decodes rows one after another (its ranks replay one runner).
        batched = len(prompts) > 1 and (self.method in BATCHED_METHODS or self.auto) and self._tp is None
        if batched:
            results = self._generate_batch(prompts, samplers, stops)
        else:
            results = [self._generate_row(*row) for row in zip(prompts, samplers, stops)]
        if self.auto:
            for _, stats in results:
                self._learn_acceptance(stats)
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
        rows[0].setup_seconds = (self._decode_start or time.perf_counter()) - call_start
        merged = rows[0] if len(rows) == 1 else GenerationStats.merge(rows, concurrent=batched)
        return GenerateOutput(sequences, merged, rows)

    def _generate_batch(
        self, prompts: list[list[int]], samplers: list[TokenSampler], stops: list[StopRule]
    ) -> list[tuple[list[int], GenerationStats]]:
        """All rows at once (decode/batched.py): one target forward per round for every live row.

        Saguaro's pre-speculation of every row's outcomes would multiply the drafter's work by the
        batch, and a tree (which "auto" may choose) has no batched loop: both serve a batch with
        batched chains, exact all the same.
        """
        method = "speculative" if self.method in ("saguaro", "tree") else self.method
        if method != self.method:
            logger.info("saguaro: method=%r serves a batch with batched speculative decoding", self.method)
        stats = [GenerationStats(method=method, prompt_tokens=len(prompt)) for prompt in prompts]
        drafter = None
        if method == "speculative":
            self._prepared_draft(prompts[0])
            for row_stats in stats:
                row_stats.draft_configuration = asdict(self.draft_configuration)
            drafter = BatchedModelDrafter(
                self._draft, samplers[0].drafting(), self.target.config.vocab_size, self._draft_prefixes
            )
        elif method == "prompt_lookup":
            drafter = PerRowDrafters(PromptLookupDrafter)
        target = self._runnable_target()
        self._decode_start = time.perf_counter()
        new = batched_speculative(
            BatchedRunner(target, self._target_prefixes),
            drafter,
            prompts,
            samplers,
            stops,
            stats,
            self.num_speculative_tokens,
            self._batch_lookaheads if self.lookahead is not None and drafter is not None else None,
        )
        for row, row_stats in zip(new, stats):
            row_stats.new_tokens = len(row)
        return list(zip(new, stats))

    def _generate_row(
        self, prompt: list[int], sampler: TokenSampler, stop: StopRule
    ) -> tuple[list[int], GenerationStats]:
        """One row; with a tensor-parallel target, rank 0 decodes and the other target ranks follow."""
        if self._tp is None:
            return self._generate_one(prompt, sampler, stop)
        consensus = Consensus(self._tp)
        if not consensus.leads:
            runner = self._target_runner(prompt, stop)
            new = consensus.follow(runner, prompt)
            runner.remember(prompt + new)
            stop.stream(new)
            return new, GenerationStats(method=self.method, prompt_tokens=len(prompt), new_tokens=len(new))
        try:
            new, stats = self._generate_one(prompt, sampler, stop, consensus)
        except BaseException:
            consensus.abort()
            raise
        consensus.finish(new)
        return new, stats

    def _target_runner(self, prompt: list[int], stop: StopRule, blocks=()) -> ModelRunner:
        tree_size = self._tree_extent()[1]
        capacity = len(prompt) + stop.max_new_tokens + tree_size + 1
        buckets = (1, tree_size + 1)
        target = self._runnable_target()
        return self._runner("target", target, capacity, self._target_prefixes, buckets, blocks)

    def _generate_one(
        self, prompt: list[int], sampler: TokenSampler, stop: StopRule, consensus=None
    ) -> tuple[list[int], GenerationStats]:
        max_depth, tree_size = self._tree_extent()
        capacity = len(prompt) + stop.max_new_tokens + tree_size + 1
        # Autoregressive greedy decoding runs in compiled blocks (engines.autoregressive).
        greedy_blocks = self.method == "autoregressive" and not sampler.config.do_sample
        blocks = ((GREEDY_BLOCK, 1),) if greedy_blocks else ()
        runner = self._target_runner(prompt, stop, blocks)
        if consensus is not None:
            runner = consensus.lead(runner)
        owners = [runner]  # whose KV is stored for later calls (the worker stores its own)
        stats = GenerationStats(method=self.method, prompt_tokens=len(prompt))
        if self.method not in MODEL_FREE:
            self._prepared_draft(prompt)
            stats.draft_configuration = asdict(self.draft_configuration)
        start = time.perf_counter()
        self._decode_start = self._decode_start or start
        if self.method == "autoregressive":
            new = autoregressive(runner, prompt, sampler, stop, stats)
        else:
            drafts = self._draft_stream(sampler, capacity, max_depth, owners)
            # A Saguaro worker process flags its work: once it idles, the target takes the worker's
            # core back for the rest of its forward.
            with self.threads, self.threads.hand_back_when_idle(self._runnable_target(), drafts.working):
                new = speculative(
                    runner,
                    drafts,
                    prompt,
                    sampler,
                    stop,
                    stats,
                    max_depth,
                    self.lookahead,
                    self.threads,
                    self._inline_worker,
                )
        # Each cache holds a prefix of prompt + the untrimmed generation, and so of prompt + new.
        for owner in owners:
            owner.remember(prompt + new)
        stats.total_seconds = time.perf_counter() - start
        stats.new_tokens = len(new)
        return new, stats

    def _draft_stream(
        self, sampler: TokenSampler, capacity: int, max_depth: int, owners: list
    ) -> DraftStream:
        """Where this call's drafts come from: the Saguaro worker, or a drafter drafting inline
        (a model drafter joins `owners`, whose KV is stored for later calls)."""
        if self.method == "saguaro":
            self._seed_saguaro_lookahead()
            worker = self._draft_worker()
            worker.sample_as(sampler)
            return worker
        if self.method == "prompt_lookup":
            return InlineDrafts(PromptLookupDrafter())
        # A tree is drafted level by level on top of cached levels, shapes no bucket covers.
        draft_runner = None
        if self.tree_shape is None:
            # A round feeds the draft the 1 or 2 committed tokens it lacks, then 1 per draft;
            # greedy, one compiled call drafts the whole chain, of any length up to max_depth.
            lengths = () if sampler.config.do_sample else range(1, max_depth + 1)
            chains = tuple((k, CHAIN_FEED) for k in lengths)
            draft_runner = self._runner("draft", self._draft, capacity, self._draft_prefixes, (1, 2), chains)
        drafter = ModelDrafter(
            self._draft,
            sampler.drafting(),
            self.target.config.vocab_size,
            capacity,
            self.tree_shape,
            self._draft_prefixes,
            draft_runner,
        )
        owners.append(drafter)
        return InlineDrafts(drafter)

    def _runner(self, role: str, model, capacity: int, prefixes, buckets, chains=()) -> ModelRunner:
        """A fresh eager runner, or with compile=True this role's compiled runner, kept across calls.
        Its static cache starts at static_capacity slots and doubles as a sequence needs it
        (`CompiledRunner.reserve`: a logged recompile, once per size), the prefill sizing it for at
        most PRESIZED_NEW_TOKENS of the call's `capacity` (the most it may hold), never all of it."""
        if not self.compile:
            return ModelRunner(model, capacity, prefixes)
        runner = self._static_runners.get(role)
        if runner is None or runner.model is not model:
            # Another model (weights rebuilt) keeps the size reached, whose graphs its shape shares.
            size = self.static_capacity if runner is None else runner.cache.capacity
            runner = CompiledRunner(model, size, prefixes, buckets, chains, role)
            self._static_runners[role] = runner
        runner.most = capacity
        runner.prefix_cache = prefixes
        runner.buckets = tuple(sorted(set(runner.buckets) | set(buckets)))
        runner.chains = tuple(sorted(set(runner.chains) | set(chains)))
        runner.reset()
        return runner


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
