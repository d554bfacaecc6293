"""Weight epochs: a number per model that moves whenever its weights may have changed.

saguaro keeps things computed from a model's weights across calls: a packed copy of the target's
linears, a quantized or vocabulary-reduced draft, the KV of earlier prompts (prefix caches), a
drafter worker's copy of the draft. Each remembers the epoch it was built at and is rebuilt when
`observe` finds that the weights moved on. The routes a weight can change by, and what sees each:

  * in-place torch ops (an optimizer step, `load_state_dict`, `.mul_`): the version counter;
  * a new tensor (`param.data = ...`, `.to(dtype)`): the data pointer;
  * a new parameter or module (`load_state_dict(assign=True)`, `model.lm_head = nn.Linear(...)`):
    parameter and module identity;
  * writes through `param.data` (PEFT merges, manual loaders), which no counter sees: a few
    elements of every weight, sampled at fixed positions, compared with their last values.

The sample costs one gather per parameter per call (about 2 ms for the 1.5B demo target) and sees
any write that touches a weight broadly; a write of a handful of elements can fall between the
samples: call `saguaro.weights_changed(model)` after such a write.
"""

from __future__ import annotations

import hashlib
import weakref

import torch
from torch import nn

SAMPLES_PER_TENSOR = 16

# Derived modules (a packed view, a compressed draft) -> the user's model they were built from.
_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def derived_from(derived: nn.Module, source: nn.Module) -> None:
    """Record that `derived` computes with `source`'s weights: it shares `source`'s epoch."""
    _SOURCES[derived] = weakref.ref(source_of(source))


def source_of(model: nn.Module) -> nn.Module:
    """The user's model behind a derived one (itself if none)."""
    ref = _SOURCES.get(model)
    source = ref() if ref is not None else None
    return model if source is None else source


class _Watch:
    """The last observed state of one model's weights, and its epoch."""

    def __init__(self, model: nn.Module):
        self.epoch = 0
        self._snapshot(model)

    def _snapshot(self, model: nn.Module) -> None:
        self._structure = _structure(model)
        # A tensor-parallel target's DTensors: each rank samples its own shard.
        self._tensors = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
        self._positions = [_sample_positions(p) for p in self._tensors]
        self._values = self._sample()

    def _sample(self) -> torch.Tensor:
        with torch.no_grad():
            pieces = [torch.take(p.detach(), idx).float() for p, idx in zip(self._tensors, self._positions)]
        return torch.cat(pieces) if pieces else torch.empty(0)

    def check(self, model: nn.Module) -> bool:
        """Whether the weights moved since the last check (then a new epoch starts)."""
        moved = _structure(model) != self._structure
        if not moved:
            values = self._sample()
            # NaN != NaN: a weight that holds NaN must not read as moving on every call.
            moved = not torch.equal(values.nan_to_num(nan=0.5), self._values.nan_to_num(nan=0.5))
        if moved:
            self.epoch += 1
            self._snapshot(model)
        return moved

    def fingerprint(self) -> str:
        """A short hash of the sampled values: tells two models of one config apart."""
        return hashlib.sha256(self._values.cpu().numpy().tobytes()).hexdigest()[:16]


def _structure(model: nn.Module) -> tuple:
    modules = tuple(id(m) for m in model.modules())
    params = tuple((id(p), p.data_ptr(), p._version, p.dtype, p.device) for p in model.parameters())
    return modules, params


def _sample_positions(tensor: torch.Tensor) -> torch.Tensor:
    """SAMPLES_PER_TENSOR flat positions spread over the tensor (fixed per shape)."""
    n = tensor.numel()
    count = min(n, SAMPLES_PER_TENSOR)
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=tensor.device)
    # Spread evenly with a per-shape odd stride, so rows and columns are both visited.
    stride = max(1, n // count) | 1
    return (torch.arange(count, device=tensor.device) * stride + n // (2 * count)) % n


_WATCHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def observe(model: nn.Module | None) -> int:
    """The model's weight epoch, after checking its weights (once per call is enough)."""
    if model is None:
        return 0
    model = source_of(model)
    watch = _WATCHES.get(model)
    if watch is None:
        _WATCHES[model] = _Watch(model)
        return 0
    watch.check(model)
    return watch.epoch


def epoch(model: nn.Module | None) -> int:
    """The epoch `observe` last found (no check): what a runner binds its prefix cache to."""
    if model is None:
        return 0
    watch = _WATCHES.get(source_of(model))
    return 0 if watch is None else watch.epoch


def fingerprint(model: nn.Module) -> str:
    """A hash of the model's sampled weights (observed now)."""
    observe(model)
    return _WATCHES[source_of(model)].fingerprint()


def weights_changed(model: nn.Module) -> None:
    """Tell saguaro that `model`'s weights changed (in a way its sampling might miss): everything
    built from them (packed copies, compressed drafts, prefix caches, workers) is rebuilt on the
    next call."""
    model = source_of(model)
    observe(model)
    _WATCHES[model].epoch += 1
