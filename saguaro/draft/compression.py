"""Cheap drafts: weight-only quantization and a reduced vocabulary for the draft model.

A draft only has to be a good guess. Verification against the target keeps the output exact
whatever distribution q the drafts come from, as long as each draft token is drawn from the q
verification divides by, and the drafter hands verification exactly the q its tokens were drawn
from. So the draft can be made cheap without weakening the guarantee; only acceptance may drop:

  * `quantize_draft(model, "int8" | "int4")`: every nn.Linear (the LM head included) becomes a
    weight-only quantized linear. On CPU these run torch's own kernels (`_weight_int8pack_mm`,
    `_weight_int4pack_mm_for_cpu`), which stream a half or a quarter of bf16's bytes per token.
    On CUDA, torchao's `quantize_` does it when torchao is installed (an optional extra).
  * `restrict_draft_vocabulary(model, keep_ids)`: the LM head computes logits for `keep_ids`
    only (FR-Spec, Zhao et al. 2025) and returns full-vocabulary logits with -inf elsewhere, so
    q = 0 outside the kept set and every sampler, top-k, argmax and verifier works unchanged.
    Greedy stays exact because verification compares drafts with the target's own argmax; sampling
    stays exact because a rejection draws from norm(max(0, p - q)), which gives the excluded ids
    the target's mass there.
  * `default_draft_vocabulary(model_or_config, size)`: the lowest `size` token ids plus the special
    ids. BPE tokenizers number merges in the order they were learned, most frequent pairs first,
    so low ids are roughly the frequent tokens. On this repository's .py and .md files (90,927
    tokens of the Qwen2.5 tokenizer) the lowest 8k / 16k / 32k / 64k ids cover 76% / 85% / 92% /
    97.8% of the tokens. No corpus statistics are shipped: the tokenizer's ordering is the statistic.

All of these return a new model object: a shallow copy of the module tree (new modules along every
path, the unchanged tensors shared, never copied), so the caller's draft is left as it was.

`choose_draft_configuration` picks among the variants by measurement: the cost of a few one-token
draft steps per variant, each variant's teacher-forced top-1 agreement with the plain draft (the
share of the plain draft's acceptance it keeps), and the target's verify cost, combined into the
expected tokens/s of a round. `prepare_draft` is what `SpeculativeGenerator` calls.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import statistics
import time
import warnings
import weakref
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from saguaro.model import disk_cache, weights
from saguaro.model.module_tree import AcceleratedModuleError, clone_module_tree, set_submodule
from saguaro.model.runner import ModelRunner
from saguaro.tune.cost_model import PRIOR_HIT_RATE, expected_tokens

QUANTIZATIONS = ("int8", "int4")
INT4_GROUP_SIZE = 128
QUANTIZE_ROWS = 2048
# torch's CPU int4 packing takes output features in multiples of 16.
INT4_CPU_ROW_MULTIPLE = 16
AUTO_VOCAB_SIZE = 32768
# Weight-only quantization saves the bytes streamed from memory per token. A draft whose linear
# weights fit in a CPU's last-level cache streams nothing to save, so auto does not try it there.
AUTO_MIN_WEIGHT_BYTES = 64 * 2**20
AUTO_MIN_GAIN = 0.10
AUTO_STEPS = 4
AUTO_CONTEXT = 64
# Variants built and measured while choosing, best estimate first (each costs a quantization).
MAX_BUILDS = 2
# Body linears timed to estimate a variant's step: several times a CPU's last-level cache.
COST_SLICE_BYTES = 256 * 2**20
# Top-1 agreement with the plain draft assumed for a quantization until its variant is measured:
# per-channel int8 is all but lossless; int4 groups of 128 keep most top-1 choices.
PRIOR_AGREEMENT = {None: 1.0, "int8": 0.99, "int4": 0.95}

logger = logging.getLogger("saguaro")


class DraftCompressionUnavailable(RuntimeError):
    """This platform cannot run the requested draft compression."""


@dataclass
class DraftConfiguration:
    """What the drafters run: the draft's quantization and vocabulary, and why."""

    quantization: str | None = None
    vocab_size: int | None = None  # kept token ids; None = the draft's whole vocabulary
    chosen_by: str = "explicit"  # or "auto"
    # Per measured variant ("none/full", "int8/32768", ...): median seconds of a one-token draft
    # step, and teacher-forced top-1 agreement with the plain draft.
    step_seconds: dict[str, float] = field(default_factory=dict)
    agreement: dict[str, float] = field(default_factory=dict)
    # Under auto: the target's cost of verifying a round, the plain draft's top-1 agreement with the
    # target (its acceptance estimate), and the chosen variant's estimated tokens/s over the baseline's.
    verify_seconds: float = 0.0
    target_agreement: float = 0.0
    estimated_gain: float = 1.0
    note: str = ""
    setup_seconds: float = 0.0  # building (and under auto, measuring) the variants
    reused: bool = False  # prepared for an earlier generator of the same draft, target and options
    threads: int | None = None  # the torch threads the drafter runs with (None: the caller's)
    # Quantized variants: rows from which the float weights multiply (measure_dense_crossover).
    dense_from_rows: float | None = None
    from_disk: bool = False  # the choice was read from the on-disk measurement cache

    @property
    def label(self) -> str:
        return variant_label(self.quantization, self.vocab_size)


def variant_label(quantization: str | None, vocab_size: int | None) -> str:
    return f"{quantization or 'none'}/{vocab_size or 'full'}"


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    logger.warning(message)


# --- quantized linears -----------------------------------------------------------------------


def _by_rows(quantize):
    """Quantize QUANTIZE_ROWS output rows at a time: each row's codes depend on that row alone, and
    float32 temporaries of a few MB stay in cache where a whole LM head's (~0.5 GB) would not
    (twice as fast on the demo draft's head)."""

    @functools.wraps(quantize)
    def by_rows(weight: torch.Tensor, *args):
        if weight.shape[0] <= QUANTIZE_ROWS:
            return quantize(weight, *args)
        parts = [
            quantize(weight[i : i + QUANTIZE_ROWS], *args) for i in range(0, weight.shape[0], QUANTIZE_ROWS)
        ]
        return tuple(torch.cat(part) for part in zip(*parts))

    return by_rows


@_by_rows
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: [out, in] -> (codes int8 in [-127, 127], scales [out]),
    w ≈ codes * scales[:, None]. Scales are in the weight's dtype, the one the kernel multiplies in."""
    dtype = weight.dtype
    weight = weight.detach().float()
    # Rounded to the stored dtype first, so the codes are chosen for the scale the kernel uses.
    scales = (weight.abs().amax(dim=1) / 127).to(dtype).float().clamp_min(torch.finfo(dtype).tiny)
    codes = torch.round(weight / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes, scales.to(dtype)


@_by_rows
def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of `group_size` inputs, in the convention of torch's int4 kernels:
    [out, in] -> (codes int32 in [0, 15] [out, in], scales and zeros [out, in / group_size]),
    w ≈ (codes - 8) * scale + zero."""
    dtype = weight.dtype
    groups = weight.detach().float().reshape(weight.shape[0], -1, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    scales = ((high - low) / 15).to(dtype).float().clamp_min(torch.finfo(dtype).tiny)
    zeros = (low + 8 * scales).to(dtype).float()
    codes = torch.round((groups - (zeros - 8 * scales)[..., None]) / scales[..., None]).clamp_(0, 15)
    return codes.reshape(weight.shape).to(torch.int32), scales.to(dtype), zeros.to(dtype)


def dequantized_weight(weight: torch.Tensor, mode: str, group_size: int = INT4_GROUP_SIZE) -> torch.Tensor:
    """The slow reference: the float32 weight a quantized linear built from `weight` multiplies by,
    computed from the codes and scales in plain arithmetic (not through the kernels)."""
    if mode == "int8":
        codes, scales = quantize_int8(weight)
        return codes.float() * scales.float()[:, None]
    codes, scales, zeros = quantize_int4(weight, group_size)
    groups = codes.float().reshape(weight.shape[0], -1, group_size)
    return ((groups - 8) * scales.float()[..., None] + zeros.float()[..., None]).reshape(weight.shape)


class _WeightOnlyLinear(nn.Module):
    """A linear whose weight is stored quantized; activations keep their float dtype.

    The weight-only kernels are matrix-vector code: fast while a step streams the weights for one
    token or a few, slow for the hundreds of rows of a prefill, which the float weight's matrix
    multiply runs at compute speed. So from `dense_from_rows` rows on (measured by
    `measure_dense_crossover`; never until then) the float weight, shared with the source linear
    and not copied, does the multiply.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.scale_dtype = linear.weight.dtype
        # Shared with the source linear and never modified: only the weight is quantized.
        self.bias = linear.bias
        # A plain tensor attribute (not a parameter or buffer): the caller's weight, not the draft's.
        self.dense_weight = linear.weight.detach()
        self.dense_from_rows = math.inf

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() >= self.dense_from_rows * x.shape[-1]:  # a prefill: rows x in_features
            return nn.functional.linear(x, self.dense_weight, self.bias)
        # The kernels take contiguous 2D activations in the scales' dtype (bf16, fp16 and fp32 all
        # run); a batch's last positions only (logits_to_keep=1) arrive as a strided view.
        y = self._matmul(x.reshape(-1, x.shape[-1]).to(self.scale_dtype).contiguous()).to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int8WeightOnlyLinear(_WeightOnlyLinear):
    """`quantize_int8` codes and scales through `torch._weight_int8pack_mm`."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        codes, scales = quantize_int8(linear.weight)
        self.register_buffer("weight_int8", codes)
        self.register_buffer("scales", scales)

    def _matmul(self, x2d):
        return torch._weight_int8pack_mm(x2d, self.weight_int8, self.scales)


class Int4WeightOnlyLinear(_WeightOnlyLinear):
    """`quantize_int4` codes, scales and zeros through `torch._weight_int4pack_mm_for_cpu`."""

    def __init__(self, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE):
        super().__init__(linear)
        if linear.in_features % group_size:
            raise ValueError(
                f"in_features {linear.in_features} is not a multiple of the group size {group_size}"
            )
        self.group_size = group_size
        codes, scales, zeros = quantize_int4(linear.weight, group_size)
        # The packing takes rows in multiples of 16: zero rows, sliced off the output.
        padding = -self.out_features % INT4_CPU_ROW_MULTIPLE
        codes = nn.functional.pad(codes, (0, 0, 0, padding))
        scales_and_zeros = nn.functional.pad(torch.stack([scales, zeros], dim=-1), (0, 0, 0, 0, 0, padding))
        self.register_buffer("weight_int4", torch._convert_weight_to_int4pack_for_cpu(codes, 1))
        # The kernel's layout: [in / group_size, out, (scale, zero)].
        self.register_buffer("scales_and_zeros", scales_and_zeros.transpose(0, 1).contiguous())

    def _matmul(self, x2d):
        out = torch._weight_int4pack_mm_for_cpu(x2d, self.weight_int4, self.group_size, self.scales_and_zeros)
        return out[:, : self.out_features]


# --- module trees ----------------------------------------------------------------------------


# --- quantization ------------------------------------------------------------------------------


# Quantized layers by source weight, weight epoch, mode and group size, for as long as a draft
# variant holds them: the drafts prepared for other thread counts (a Saguaro worker's, a plain
# drafter's) share one quantized body instead of quantizing it again.
_QUANTIZED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _cpu_quantized(linear: nn.Linear, mode: str, group_size: int, memo, epoch: int) -> _WeightOnlyLinear:
    # Quantized modules hold no state but their buffers: one per source weight serves every copy.
    key = (id(linear.weight), linear.weight.data_ptr(), epoch, mode, group_size)
    module = memo.get(key)
    if module is None:
        module = _build_cpu_quantized(linear, mode, group_size)
        memo[key] = module
    return module


def _build_cpu_quantized(linear: nn.Linear, mode: str, group_size: int) -> _WeightOnlyLinear:
    if mode == "int4":
        try:
            module = Int4WeightOnlyLinear(linear, group_size)
            module(torch.zeros(1, linear.in_features, dtype=linear.weight.dtype))
            return module
        except (ValueError, RuntimeError) as error:  # group size does not divide, or kernel refuses
            logger.info("int4 draft quantization: a %s keeps int8 (%s)", linear, error)
    try:
        module = Int8WeightOnlyLinear(linear)
        module(torch.zeros(1, linear.in_features, dtype=linear.weight.dtype))
        return module
    except (AttributeError, RuntimeError) as error:
        raise DraftCompressionUnavailable(
            f"torch {torch.__version__} cannot run int8 weight-only matmuls on this CPU ({error}); "
            "use draft_quantization=None"
        ) from error


def _fastest_of(call, repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_dense_crossover(linears: list[_WeightOnlyLinear], rows=(4, 16, 64), repeats: int = 2) -> float:
    """The fewest rows from which the float weights multiply at least as fast as the quantized
    kernels, at every larger size measured too (one noisy size does not decide); inf if the kernels
    win at the largest size. The sizes are the ones that decide: a draft step (1-4 rows), a
    pre-speculation step over its branches (~16), a prefill chunk (64 and more, where float weights
    win on every CPU measured). Timed over all of `linears` in turn, as a forward runs them: the float
    weights then stream from memory as they do in a model, where one layer timed alone stays in the
    CPU's cache and makes them look faster than they are (measured: a crossover of 8 rows where the
    draft's forward at 8 rows ran twice as long through the float weights as through the kernels)."""
    crossover = math.inf
    for n in reversed(rows):
        inputs = {m.in_features: torch.randn(n, m.in_features, dtype=m.scale_dtype) for m in linears}
        quantized = _fastest_of(lambda x=inputs: [m._matmul(x[m.in_features]) for m in linears], repeats)
        dense = _fastest_of(
            lambda x=inputs: [nn.functional.linear(x[m.in_features], m.dense_weight) for m in linears],
            repeats,
        )
        if dense > quantized:
            break
        crossover = n
    return crossover


def _streaming_slice(linears: list) -> list:
    """The first of `linears` whose float weights add up to COST_SLICE_BYTES (all if fewer): timed in
    turn, they stream from memory as a whole forward's do, at a fraction of its cost."""
    sliced, size = [], 0
    for linear in linears:
        if size >= COST_SLICE_BYTES:
            break
        sliced.append(linear)
        size += (linear.dense_weight if isinstance(linear, _WeightOnlyLinear) else linear.weight).nbytes
    return sliced


def _dense_crossover(linears: list[_WeightOnlyLinear], mode: str) -> float:
    """measure_dense_crossover, kept on disk per layer shapes, mode and threads."""
    shapes = tuple(sorted({(m.out_features, m.in_features) for m in linears}))
    entry = disk_cache.key("crossover", shapes, len(linears), mode, torch.get_num_threads())
    stored = disk_cache.load("crossover", entry)
    if stored is None:
        stored = measure_dense_crossover(linears)
        disk_cache.store("crossover", entry, stored if math.isfinite(stored) else None)
    return math.inf if stored is None else stored


def _quantize_with_torchao(model: nn.Module, mode: str, group_size: int) -> None:
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as error:
        raise DraftCompressionUnavailable(
            f"draft_quantization={mode!r} on {model.device.type} needs torchao (pip install torchao), "
            "or use draft_quantization=None"
        ) from error
    config = Int8WeightOnlyConfig() if mode == "int8" else Int4WeightOnlyConfig(group_size=group_size)
    # quantize_ swaps each linear's weight; in the cloned tree those linears are the clone's own.
    quantize_(model, config)


def quantize_draft(
    model: nn.Module,
    mode: str,
    group_size: int = INT4_GROUP_SIZE,
    memo: dict | None = None,
    dense_from_rows: float | None = None,
) -> nn.Module:
    """A new model whose nn.Linear layers (LM head included) hold weight-only int8 or int4 weights.

    int8: symmetric per output channel. int4: asymmetric per group of `group_size` inputs; a layer
    whose in_features the group size does not divide, or that the kernel refuses, keeps int8.
    Layers that are not nn.Linear (GPT-2's Conv1D) keep their weights.
    The caller's model is unchanged; a head tied to the input embedding is quantized in the copy
    while the embedding keeps its weights. On CUDA this needs torchao. `memo` (a dict kept by the
    caller while the weights live) reuses the quantized layers of an earlier call on the same weights.
    `dense_from_rows`: where the float weights take over, if known (else measured, once per
    draft shape, threads and machine: model/disk_cache.py).
    """
    if mode not in QUANTIZATIONS:
        raise ValueError(f"unknown draft quantization {mode!r}; use one of {', '.join(QUANTIZATIONS)}")
    clone = clone_module_tree(model)
    memo = _QUANTIZED if memo is None else memo
    device = next(model.parameters()).device
    if device.type == "cpu":
        linears = [(name, m) for name, m in clone.named_modules() if isinstance(m, nn.Linear)]
        epoch = weights.epoch(model)
        for name, linear in linears:
            set_submodule(clone, name, _cpu_quantized(linear, mode, group_size, memo, epoch))
        quantized = [m for m in clone.modules() if isinstance(m, _WeightOnlyLinear)]
        if quantized:
            # Timed on the layers other than the LM head, which a prefill runs for one row.
            head = clone.get_output_embeddings() if hasattr(clone, "get_output_embeddings") else None
            head = getattr(head, "linear", head)
            if dense_from_rows is None:
                dense_from_rows = _dense_crossover(
                    _streaming_slice([m for m in quantized if m is not head] or quantized), mode
                )
            for module in quantized:
                module.dense_from_rows = dense_from_rows
    elif device.type == "cuda":
        _quantize_with_torchao(clone, mode, group_size)
    else:
        raise DraftCompressionUnavailable(
            f"no weight-only {mode} kernels for a draft on {device.type}; use draft_quantization=None"
        )
    return clone


# --- reduced vocabulary ------------------------------------------------------------------------


class RestrictedLMHead(nn.Module):
    """An LM head that computes logits for `keep_ids` only and scatters them into full-vocabulary
    logits, -inf elsewhere: every id outside the kept set gets probability exactly 0."""

    def __init__(self, head: nn.Linear, keep_ids: torch.Tensor):
        super().__init__()
        self.vocab_size = head.out_features
        self.register_buffer("keep_ids", keep_ids.to(head.weight.device))
        # The kept rows, selected once; a plain Linear so that quantize_draft treats it as any other.
        with torch.device("meta"):
            self.linear = nn.Linear(head.in_features, len(keep_ids), bias=head.bias is not None)
        self.linear.weight = nn.Parameter(
            head.weight.detach().index_select(0, self.keep_ids), requires_grad=False
        )
        if head.bias is not None:
            self.linear.bias = nn.Parameter(
                head.bias.detach().index_select(0, self.keep_ids), requires_grad=False
            )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        kept = self.linear(hidden)
        logits = kept.new_full((*kept.shape[:-1], self.vocab_size), float("-inf"))
        return logits.index_copy_(-1, self.keep_ids, kept)


def _text_config(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def default_draft_vocabulary(model_or_config, size: int) -> torch.Tensor:
    """The lowest `size` token ids (BPE: roughly the most frequent tokens, see the module docstring)
    plus the special ids (eos, bos, pad) of the config and generation config; sorted LongTensor."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"the draft vocabulary size must be a positive int, got {size!r}")
    vocab = _text_config(model_or_config).vocab_size
    specials = set()
    for source in (_text_config(model_or_config), getattr(model_or_config, "generation_config", None)):
        for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
            value = getattr(source, name, None)
            specials.update([value] if isinstance(value, int) else (value or []))
    ids = set(range(min(size, vocab))) | {int(i) for i in specials if 0 <= int(i) < vocab}
    return torch.tensor(sorted(ids), dtype=torch.long)


def restrict_draft_vocabulary(model: nn.Module, keep_ids) -> nn.Module:
    """A new model whose LM head scores only `keep_ids` (q = 0 for every other id); see RestrictedLMHead.
    Restrict before quantizing: the reduced head is then quantized like any linear."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"the draft's output head is a {type(head).__name__}, not an nn.Linear: restrict the vocabulary "
            "of an unquantized, unrestricted draft (then quantize)"
        )
    keep = torch.as_tensor(keep_ids, dtype=torch.long).reshape(-1).unique()  # sorted, no repeats
    if len(keep) == 0 or keep[0] < 0 or keep[-1] >= head.out_features:
        raise ValueError(
            f"keep_ids must be non-empty token ids in [0, {head.out_features}), got {keep_ids!r}"
        )
    name = next(name for name, module in model.named_modules() if module is head)
    clone = clone_module_tree(model)
    set_submodule(clone, name, RestrictedLMHead(head, keep))
    return clone


def compress_draft(
    model: nn.Module,
    quantization: str | None = None,
    vocab_size: int | None = None,
    memo: dict | None = None,
    dense_from_rows: float | None = None,
) -> nn.Module:
    """The draft with a `default_draft_vocabulary` of `vocab_size` ids and then `quantization`
    (`memo` and `dense_from_rows` as in quantize_draft); the model itself when both are None.
    A compressed draft shares the draft's weight epoch (model/weights.py)."""
    source = model
    try:
        if vocab_size is not None:
            model = restrict_draft_vocabulary(model, default_draft_vocabulary(model, vocab_size))
            weights.derived_from(model, source)
        if quantization is not None:
            model = quantize_draft(model, quantization, memo=memo, dense_from_rows=dense_from_rows)
    except AcceleratedModuleError as error:
        raise DraftCompressionUnavailable(
            f"{error}; load the draft onto one device to compress it"
        ) from error
    if model is not source:
        weights.derived_from(model, source)
    return model


def _crossover_of(model: nn.Module) -> float | None:
    rows = [m.dense_from_rows for m in model.modules() if isinstance(m, _WeightOnlyLinear)]
    return rows[0] if rows else None


# --- choosing by measurement -------------------------------------------------------------------


def _measure(model, sample: list[int], steps: int, continuation: list[int] | None = None):
    """Teacher-forced top-1 predictions over `sample` and `steps` one-token steps, the tokens fed in
    those steps (`continuation`, or the model's own greedy choices), and a step's median seconds."""
    runner = ModelRunner(model, len(sample) + steps)
    predictions = runner.forward(sample).argmax(-1).tolist()
    fed, seconds = [], []
    for step in range(steps):
        token = continuation[step] if continuation is not None else predictions[-1]
        start = time.perf_counter()
        predictions.append(int(runner.forward([token])[-1].argmax()))  # int(): waits for the device
        seconds.append(time.perf_counter() - start)
        fed.append(token)
    return predictions, fed, statistics.median(seconds[1:])  # the first step warms up


def _measure_target(target, sample: list[int], continuation: list[int], lookahead: int, repeats: int = 3):
    """The target's top-1 predictions over `sample` and the median seconds of verifying
    `lookahead` drafts (a forward over lookahead + 1 tokens) after it."""
    runner = ModelRunner(target, len(sample) + lookahead + 1)
    predictions = runner.forward(sample).argmax(-1).tolist()
    block = (continuation * (lookahead + 1))[: lookahead + 1]
    seconds = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        int(runner.forward(block)[-1].argmax())  # int(): waits for the device
        seconds.append(time.perf_counter() - start)
        runner.rollback(len(sample))
    return predictions, statistics.median(seconds[1:])


def variant_score(
    acceptance: float, step_seconds: float, verify_seconds: float, lookahead: int, concurrent: bool
) -> float:
    """Expected tokens per second of a round drafting `lookahead` tokens (choose_draft_configuration):
    the target waits for every draft step of a serial drafter, for a concurrent one's only after
    a miss."""
    serial = 1 - PRIOR_HIT_RATE if concurrent else 1.0
    return expected_tokens([acceptance] * lookahead, lookahead) / (
        verify_seconds + serial * lookahead * step_seconds
    )


def choose_draft_configuration(
    draft: nn.Module,
    target: nn.Module,
    sample_ids: list[int],
    threads: int | None = None,
    lookahead: int = 4,
    quantizations=(None, *QUANTIZATIONS),
    vocab_sizes=(None, AUTO_VOCAB_SIZE),
    steps: int = AUTO_STEPS,
    min_gain: float = AUTO_MIN_GAIN,
    concurrent: bool = False,
    target_threads: int | None = None,
) -> tuple[nn.Module, DraftConfiguration]:
    """Choose the best (quantization, vocabulary size) variant by measurement, building at most
    MAX_BUILDS of them, and return it with its record.

    On the last AUTO_CONTEXT tokens of `sample_ids`: the target's cost of verifying `lookahead`
    drafts (with the calling thread count) and its top-1 agreement with the plain draft, the
    plain draft's acceptance estimate a; the plain draft's step cost and its teacher-forced top-1
    predictions over the sample and `steps` one-token steps, with `threads` threads. Each variant's
    step cost d and agreement r with the plain draft are then estimated without building it
    (`_estimated_variants`: its linears timed on a slice of the model, the kept vocabulary's share
    of the plain draft's predictions, a prior for quantization), so its acceptance is about a * r
    and its score the expected tokens per second of a round, expected_tokens(a * r) / (verify +
    lookahead * d). Quantizing a whole draft takes seconds, so only the best-scoring variants are
    built, best first, and measured as they will run (the same steps, teacher-forced on the plain
    draft's continuation); the first whose measured score beats the baseline (the first variant)
    by more than `min_gain` wins, else the baseline does. A `concurrent` drafter (Saguaro's worker,
    the target on `target_threads`) drafts while the target verifies, and its pre-speculation
    sizes its branches to fit the verification (ssd/prespeculation.py): a slower step costs a few
    branches, and in full only the serial backup after a miss, so its round lasts verify +
    (1 - h) * lookahead * d at the prior hit rate h (cost_model.PRIOR_HIT_RATE), and agreement weighs
    more than step cost. A variant that cannot be built on this platform is skipped with a warning
    (the baseline is not: its error is raised).
    """
    sample = [int(t) for t in sample_ids][-AUTO_CONTEXT:]
    if not sample:
        raise ValueError("choosing a draft configuration needs at least one sample token")
    previous_threads = torch.get_num_threads()
    record = DraftConfiguration(chosen_by="auto")
    try:
        torch.set_num_threads(threads or previous_threads)
        reference, continuation, plain_seconds = _measure(draft, sample, steps)
        torch.set_num_threads(target_threads or previous_threads)
        target_predictions, record.verify_seconds = _measure_target(target, sample, continuation, lookahead)
        # Laplace's rule: a short sample neither promises nor rules out acceptance.
        matches = sum(a == b for a, b in zip(reference, target_predictions))
        record.target_agreement = (matches + 1) / (len(sample) + 2)
        torch.set_num_threads(threads or previous_threads)
        variants = [(q, v) for q in quantizations for v in vocab_sizes]
        held: list = []  # quantized slices, until the chosen variant is built on them
        estimates = _estimated_variants(draft, variants, reference, plain_seconds, held)

        def score(variant) -> float:
            seconds, agreement = estimates[variant]
            acceptance = record.target_agreement * agreement
            return variant_score(acceptance, seconds, record.verify_seconds, lookahead, concurrent)

        baseline, *others = [variant for variant in variants if variant in estimates]
        bar = (1 + min_gain) * score(baseline)
        choice, model = baseline, None
        for variant in sorted(others, key=score, reverse=True)[:MAX_BUILDS]:
            if score(variant) <= bar:
                break
            try:
                candidate = compress_draft(draft, *variant)
            except DraftCompressionUnavailable as error:
                _warn(f"draft variant {variant_label(*variant)} skipped: {error}")
                continue
            predictions, _, seconds = _measure(candidate, sample, steps, continuation)
            estimates[variant] = seconds, sum(a == b for a, b in zip(predictions, reference)) / len(reference)
            if score(variant) > bar:
                choice, model = variant, candidate
                break
            del candidate  # measured and not chosen: freed before the next one is built
        if model is None:
            model = compress_draft(draft, *baseline)
        for variant, (seconds, agreement) in estimates.items():
            record.step_seconds[variant_label(*variant)] = seconds
            record.agreement[variant_label(*variant)] = agreement
        record.estimated_gain = score(choice) / score(baseline)
    finally:
        torch.set_num_threads(previous_threads)
    record.quantization, record.vocab_size = choice
    return model, record


def _estimated_variants(
    draft: nn.Module, variants: list[tuple], reference: list[int], plain_seconds: float, held: list
) -> dict[tuple, tuple[float, float]]:
    """(step seconds, agreement with the plain draft) per variant, estimated without building it.

    Step: the plain step with its linears' cost replaced by the variant's. On CPU those are timed
    at one row: a slice of the body's linears (COST_SLICE_BYTES of them, several times a CPU's
    last-level cache, so they stream from memory as in a forward; scaled to the whole body), and
    the LM head at the kept vocabulary's rows (a quantized head timed on at most AUTO_VOCAB_SIZE
    rows and scaled). Elsewhere (torchao on CUDA) a step is taken to scale with its weight bytes.
    Agreement: the share of the plain draft's predictions the kept vocabulary holds, times
    PRIOR_AGREEMENT for the quantization (measured for real once a variant is built).
    """
    head = draft.get_output_embeddings() if hasattr(draft, "get_output_embeddings") else None
    head = head if isinstance(head, nn.Linear) else None
    body = [m for m in draft.modules() if isinstance(m, nn.Linear) and m is not head]
    kept_rows = {v: head.out_features if v is None or head is None else v for _, v in variants}
    on_cpu = next(draft.parameters()).device.type == "cpu"
    if on_cpu:
        costs = _timed_linears(body, head, variants, kept_rows, weights.epoch(draft), held)
    else:
        costs = _linear_bytes(body, head, variants)
    plain = costs[(None, None)]
    estimates = {}
    for quantization, vocab in variants:
        if isinstance(costs[(quantization, vocab)], DraftCompressionUnavailable):
            if (quantization, vocab) == variants[0]:
                raise costs[(quantization, vocab)]  # the baseline: nothing to fall back to
            _warn(
                f"draft variant {variant_label(quantization, vocab)} skipped: {costs[(quantization, vocab)]}"
            )
            continue
        kept = set(default_draft_vocabulary(draft, vocab).tolist()) if vocab is not None else None
        covered = sum(kept is None or token in kept for token in reference) / len(reference)
        if on_cpu:  # linear seconds swapped in, the rest of the step (attention, norms, Python) kept
            seconds = max(plain_seconds - plain, 0.0) + costs[(quantization, vocab)]
        else:
            seconds = plain_seconds * costs[(quantization, vocab)] / plain
        estimates[(quantization, vocab)] = seconds, PRIOR_AGREEMENT[quantization] * covered
    return estimates


def _linear_bytes(body: list[nn.Linear], head: nn.Linear | None, variants) -> dict[tuple, float]:
    """Bytes a one-token step streams through the linears, per variant (and the plain draft's)."""
    per_weight = {None: 1.0, "int8": 0.5, "int4": 0.25}
    body_bytes = sum(m.weight.nbytes for m in body)
    costs = {}
    for quantization, vocab in {(None, None), *variants}:
        rows = head.out_features if head is None or vocab is None else vocab
        head_bytes = 0 if head is None else head.weight.nbytes * rows / head.out_features
        costs[(quantization, vocab)] = per_weight[quantization] * (body_bytes + head_bytes)
    return costs


def _timed_linears(
    body: list[nn.Linear], head: nn.Linear | None, variants, kept_rows, epoch: int, held: list
) -> dict[tuple, float | DraftCompressionUnavailable]:
    """Seconds of one row through the draft's linears, per variant (and the plain draft's), timed
    on slices (see _estimated_variants): quantizing a slice takes a fraction of the whole. The
    quantized slices go to `held`, so that building the chosen variant reuses them. A variant
    this platform cannot run gets its error instead."""
    sliced = _streaming_slice(body)
    scale = sum(m.weight.nbytes for m in body) / max(sum(m.weight.nbytes for m in sliced), 1)
    dtype = (head or body[0]).weight.dtype

    def seconds(modules) -> float:
        rows = {m.in_features: torch.randn(1, m.in_features, dtype=dtype) for m in modules}
        return _fastest_of(lambda: [m(rows[m.in_features]) for m in modules], repeats=3)

    def head_rows(rows: int) -> nn.Linear:
        with torch.device("meta"):
            part = nn.Linear(head.in_features, rows, bias=False)
        part.weight = nn.Parameter(head.weight.detach()[:rows], requires_grad=False)
        return part

    body_cost, head_cost, costs = {}, {}, {}
    for quantization, vocab in dict.fromkeys([(None, None), *variants]):
        rows = kept_rows[vocab] if head is not None else 0
        try:
            if quantization not in body_cost:
                modules = [
                    _cpu_quantized(m, quantization, INT4_GROUP_SIZE, _QUANTIZED, epoch) if quantization else m
                    for m in sliced
                ]
                body_cost[quantization] = seconds(modules) * scale
                held += modules
            if head is not None and (quantization, rows) not in head_cost:
                timed_rows = rows if quantization is None else min(rows, AUTO_VOCAB_SIZE)
                part = head_rows(timed_rows)
                if quantization:
                    part = _build_cpu_quantized(part, quantization, INT4_GROUP_SIZE)
                head_cost[(quantization, rows)] = seconds([part]) * rows / timed_rows
        except DraftCompressionUnavailable as error:  # this platform cannot run the variant
            costs[(quantization, vocab)] = error
            continue
        costs[(quantization, vocab)] = body_cost[quantization] + head_cost.get((quantization, rows), 0.0)
    return costs


# --- what SpeculativeGenerator calls -----------------------------------------------------------


def check_draft_options(quantization, vocab_size, draft: nn.Module | None = None) -> None:
    """Specific errors for bad draft_quantization / draft_vocab_size values (for this draft)."""
    if quantization not in ("auto", None, *QUANTIZATIONS):
        raise ValueError(
            f"draft_quantization must be 'auto', 'int8', 'int4' or None (unquantized), got {quantization!r}"
        )
    if not (
        vocab_size is None
        or (isinstance(vocab_size, str) and vocab_size == "auto")
        or (isinstance(vocab_size, int) and not isinstance(vocab_size, bool) and vocab_size >= 1)
    ):
        raise ValueError(
            f"draft_vocab_size must be 'auto', a positive int (the draft scores its lowest ids plus the "
            f"special ones) or None (the whole vocabulary), got {vocab_size!r}"
        )
    vocab = None if draft is None else _text_config(draft).vocab_size
    if isinstance(vocab_size, int) and vocab is not None and vocab_size >= vocab:
        raise ValueError(
            f"draft_vocab_size={vocab_size} keeps the draft's whole {vocab}-id vocabulary; pass a smaller "
            "size, or None"
        )


def _weight_bytes(model: nn.Module) -> int:
    return sum(
        m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear)
    )


def _auto_quantizations(draft: nn.Module) -> tuple[list, str]:
    """The quantizations worth measuring for this draft, and why any were left out."""
    device = next(draft.parameters()).device
    if _weight_bytes(draft) < AUTO_MIN_WEIGHT_BYTES:
        return [None], "linear weights too small to be limited by memory traffic: not quantized"
    if device.type == "cuda":
        if importlib.util.find_spec("torchao") is None:
            note = "draft_quantization='auto' on CUDA needs torchao (pip install torchao): not quantized"
            _warn(note)
            return [None], note
    elif device.type != "cpu":
        return [None], f"no weight-only kernels for a draft on {device.type}: not quantized"
    return [None, *QUANTIZATIONS], ""


def prepare_draft(
    draft: nn.Module,
    target: nn.Module,
    quantization="auto",
    vocab_size="auto",
    sample_ids: list[int] | None = None,
    threads: int | None = None,
    lookahead: int = 4,
    target_threads: int | None = None,
) -> tuple[nn.Module, DraftConfiguration]:
    """The draft model the drafters should run, and its record.

    Explicit values build that variant (or raise: DraftCompressionUnavailable when this platform
    cannot run it). "auto" measures the candidates on `sample_ids` against `target` through
    `choose_draft_configuration` (the draft with `threads` threads, rounds of `lookahead` drafts):
    quantization None / int8 / int4 where the draft is large enough for weight traffic to matter,
    vocabulary full / AUTO_VOCAB_SIZE ids where the vocabulary is at least twice that. Under auto
    a quantization that fails falls back to the plain draft with a warning.

    Prepared once per (draft, target, options) for as long as the draft lives, and shared by every
    generator (saguaro.generate builds one per call); auto's choice is also kept on disk
    (model/disk_cache.py), so another process builds the chosen variant without measuring. When the
    draft's weights move (weights.observe), the same variant is built again from the new weights.
    """
    options = (quantization, vocab_size, threads, lookahead, target_threads)
    prepared = _PREPARED.setdefault(draft, {})

    def forget(dead_target, prepared=prepared):  # a variant measured for a target that is gone
        for stale in [k for k in prepared if k[0] is dead_target]:
            del prepared[stale]

    key = (weakref.ref(weights.source_of(target), forget), *options)
    epoch = weights.epoch(draft)
    if key in prepared:
        model, record, built_at = prepared[key]
        if built_at == epoch:
            return model or draft, replace(record, reused=True)
        del prepared[key], model  # freed before its successor is built
        start = time.perf_counter()
        model = compress_draft(
            draft, record.quantization, record.vocab_size, dense_from_rows=record.dense_from_rows
        )
        record = replace(record, setup_seconds=time.perf_counter() - start, reused=False)
    else:
        start = time.perf_counter()
        model, record = _prepare(draft, target, *options, sample_ids)
        record.setup_seconds = time.perf_counter() - start
        record.threads = threads
        record.dense_from_rows = _crossover_of(model)
    # None for the draft itself: a value holding its key would keep the entry alive forever.
    prepared[key] = (None if model is draft else model, record, epoch)
    return model, record


# Prepared drafts per user draft, for as long as it lives: saguaro.generate() builds a generator per
# call, and neither auto's measurement nor a quantization (seconds each on a real draft) should be
# paid again for the same pair and options.
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _prepare(draft, target, quantization, vocab_size, threads, lookahead, target_threads, sample_ids):
    check_draft_options(quantization, vocab_size, draft)
    vocab = _text_config(draft).vocab_size
    note = ""
    quantizations = [quantization]
    if quantization == "auto":
        quantizations, note = _auto_quantizations(draft)
    vocab_sizes = [vocab_size]
    if vocab_size == "auto":
        vocab_sizes = [None, AUTO_VOCAB_SIZE] if vocab >= 2 * AUTO_VOCAB_SIZE else [None]
    chosen_by = "auto" if "auto" in (quantization, vocab_size) else "explicit"
    if len(quantizations) * len(vocab_sizes) == 1:
        variant = quantizations[0], vocab_sizes[0]
        return compress_draft(draft, *variant), DraftConfiguration(*variant, chosen_by, note=note)
    # Auto's choice for this pair, machine and threads, if an earlier process measured it.
    entry = disk_cache.key(
        "draft",
        disk_cache.model_key(draft),
        disk_cache.model_key(target),
        quantizations,
        vocab_sizes,
        threads,
        lookahead,
        target_threads,
    )
    stored = disk_cache.load("draft", entry)
    if stored is not None:
        record = DraftConfiguration(**stored)
        record.from_disk = True
        crossover = math.inf if record.dense_from_rows is None else record.dense_from_rows
        return compress_draft(
            draft, record.quantization, record.vocab_size, dense_from_rows=crossover
        ), record
    # Under auto the baseline variant is unquantized; quantized variants that fail are skipped there.
    model, record = choose_draft_configuration(
        draft,
        target,
        sample_ids or [],
        threads,
        lookahead,
        quantizations,
        vocab_sizes,
        concurrent=target_threads is not None,
        target_threads=target_threads,
    )
    record.note = note
    record.threads, record.dense_from_rows = threads, _crossover_of(model)
    disk_cache.store("draft", entry, asdict(record))
    return model, record
