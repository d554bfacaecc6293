"""Weight-only quantization of a draft: `quantize_draft(model, "int8" | "int4")`, and
`compress_draft`, which builds any variant: a reduced vocabulary (draft/vocabulary.py), then this.

Every nn.Linear (the LM head included) becomes a weight-only quantized linear
(draft/quantized_linear.py) in a shallow copy of the module tree (new modules along every path, the
unchanged tensors shared, never copied), so the caller's draft is left as it was. On CUDA,
torchao's `quantize_` does it when torchao is installed (an optional extra).

A weight-only kernel streams fewer bytes per token but multiplies as matrix-vector code, so from
some number of rows on (a prefill) the float weight's matrix multiply is faster: the dense
crossover, measured on the machine at hand (`measure_dense_crossover`). `streaming_slice` and
`fastest_of` also time auto's variants (draft/choice.py).
"""

from __future__ import annotations

import logging
import math
import time
import weakref

import torch
from torch import nn

from saguaro.draft.quantized_linear import (
    INT4_GROUP_SIZE,
    QUANTIZATIONS,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    WeightOnlyLinear,
)
from saguaro.draft.vocabulary import default_draft_vocabulary, restrict_draft_vocabulary
from saguaro.model import disk_cache, weights
from saguaro.model.module_tree import AcceleratedModuleError, clone_module_tree, set_submodule

# Linears timed as a forward streams them: several times a CPU's last-level cache.
COST_SLICE_BYTES = 256 * 2**20

logger = logging.getLogger("saguaro")


class DraftCompressionUnavailable(RuntimeError):
    """This platform cannot run the requested draft compression."""


# Quantized layers by source weight, weight epoch, mode and group size, for as long as a draft
# variant holds them: the drafts prepared for other thread counts (a Saguaro worker's, a plain
# drafter's) share one quantized body instead of quantizing it again.
_QUANTIZED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def cpu_quantized(
    linear: nn.Linear, mode: str, group_size: int, epoch: int, memo: dict | None = None
) -> WeightOnlyLinear:
    """`linear` quantized on CPU, from `memo` (default: the shared _QUANTIZED) if it was before."""
    memo = _QUANTIZED if memo is None else memo
    # Quantized modules hold no state but their buffers: one per source weight serves every copy.
    key = (id(linear.weight), linear.weight.data_ptr(), epoch, mode, group_size)
    module = memo.get(key)
    if module is None:
        module = build_cpu_quantized(linear, mode, group_size)
        memo[key] = module
    return module


def build_cpu_quantized(linear: nn.Linear, mode: str, group_size: int) -> WeightOnlyLinear:
    """A new quantized copy of `linear`, tried once on a row; int4 falls back to int8 where it cannot run."""
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


def fastest_of(call, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls, after one to warm up."""
    call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_dense_crossover(linears: list[WeightOnlyLinear], rows=(4, 16, 64), repeats: int = 2) -> float:
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
        quantized = fastest_of(lambda x=inputs: [m._matmul(x[m.in_features]) for m in linears], repeats)
        dense = fastest_of(
            lambda x=inputs: [nn.functional.linear(x[m.in_features], m.dense_weight) for m in linears],
            repeats,
        )
        if dense > quantized:
            break
        crossover = n
    return crossover


def streaming_slice(linears: list) -> list:
    """The first of `linears` whose float weights add up to COST_SLICE_BYTES (all if fewer): timed in
    turn, they stream from memory as a whole forward's do, at a fraction of its cost."""
    sliced, size = [], 0
    for linear in linears:
        if size >= COST_SLICE_BYTES:
            break
        sliced.append(linear)
        size += (linear.dense_weight if isinstance(linear, WeightOnlyLinear) else linear.weight).nbytes
    return sliced


def dense_crossover(linears: list[WeightOnlyLinear], mode: str) -> float:
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
    device = next(model.parameters()).device
    if device.type == "cpu":
        linears = [(name, m) for name, m in clone.named_modules() if isinstance(m, nn.Linear)]
        epoch = weights.epoch(model)
        for name, linear in linears:
            set_submodule(clone, name, cpu_quantized(linear, mode, group_size, epoch, memo))
        quantized = [m for m in clone.modules() if isinstance(m, WeightOnlyLinear)]
        if quantized:
            # Timed on the layers other than the LM head, which a prefill runs for one row.
            head = clone.get_output_embeddings() if hasattr(clone, "get_output_embeddings") else None
            head = getattr(head, "linear", head)
            if dense_from_rows is None:
                dense_from_rows = dense_crossover(
                    streaming_slice([m for m in quantized if m is not head] or quantized), mode
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


def dense_crossover_of(model: nn.Module) -> float | None:
    """The rows from which a quantized draft's float weights multiply (None: nothing quantized on CPU)."""
    rows = [m.dense_from_rows for m in model.modules() if isinstance(m, WeightOnlyLinear)]
    return rows[0] if rows else None


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
