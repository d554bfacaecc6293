"""Prepacked bf16 linears for the target on CPU: the same products, without re-laying the weights
out on every call.

torch's CPU bf16 `F.linear` hands the weight to oneDNN in its stored [out, in] layout, and oneDNN
first copies it into its blocked layout, on every call: for a forward that streams each weight
once, that copy is about as much memory traffic again. Packing each weight once
(`mkldnn._reorder_linear_weight`) and calling `mkldnn._linear_pointwise` on it skips the copy:
on a 2-core AVX512-BF16 EPYC the 1.5B demo target's forward over 4 rows x 3 tokens takes 101 ms
instead of 152 (docs/RESULTS.md), and its logits are the same bits. That is not guaranteed
(with oneDNN capped below its bf16 instructions, as on a CPU without them, one-row products
differ), so `packed_view` compares packed and plain products of the model's own largest layer
on the machine, and keeps the plain model wherever they differ or packing is not faster.

The packed weights are a copy (the model keeps its own for everything else), so the view is built
only where that copy fits in the memory the machine has free after everything else saguaro will
hold (`reserve_bytes`: the draft's compressed copy, the prefix caches' budgets, a working margin);
where it does not, the model runs unpacked and the log says why. One view per model serves every
generator (`runnable_target`), rebuilt when `weights.observe` finds the weights moved; between
calls, each packed layer also packs again after an in-place change of its weight (its version
counter moves). The view shares the model's hook dicts, so a hook registered on the
model or one of its layers (even after the view was built) runs in saguaro's forwards too.
"""

from __future__ import annotations

import statistics
import time
import weakref
from pathlib import Path

import torch
from torch import nn

from saguaro.faults import logger
from saguaro.model import disk_cache, weights
from saguaro.model.module_tree import clone_module_tree, set_submodule

# Rows a packed weight is laid out for: oneDNN picks its blocking by the expected batch; decoding
# and verification feed a handful of tokens per row, a few rows at once.
PACKING_ROWS = 16
# Free memory kept beyond the packed copy and what the caller reserves: activations, logits.
WORKING_MARGIN = 1 << 30
# Token counts the check compares packed and plain products at (a step, a verification, a prefill).
CHECK_ROWS = (1, 5, 67)


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(nn.Module):
    """`linear`'s product through a oneDNN-packed copy of its weight (bias and weight shared)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the source: its version says when the packed copy is stale
        self.bias = linear.bias
        for key, value in vars(linear).items():  # hooks on the layer (now or later) run here too
            if "hooks" in key and isinstance(value, dict):
                self.__dict__[key] = value
        self._pack()

    def _pack(self) -> None:
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), PACKING_ROWS)
        self._packed_from = (self.weight.data_ptr(), self.weight._version)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.weight.data_ptr(), self.weight._version) != self._packed_from:
            self._pack()
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def _available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none: not Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _seconds_per_product(layer: nn.Module, x: torch.Tensor, repeats: int = 5) -> float:
    """Median seconds of layer(x), after one untimed call."""
    layer(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        layer(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _why_not_packed(model: nn.Module, linears: list[tuple[str, nn.Linear]], reserve_bytes: int) -> str | None:
    """Why packing does not serve this model, or None if it does."""
    if not packing_available():
        return "torch has no oneDNN linear packing here"
    if model.device.type != "cpu" or model.dtype != torch.bfloat16:
        return f"it packs bf16 weights on CPU, the model is {model.dtype} on {model.device.type}"
    if not linears:
        return "the model has no bf16 nn.Linear layers"
    if any(getattr(module, "_hf_hook", None) is not None for module in model.modules()):
        return "the model carries accelerate hooks (device_map=...), which run its own modules"
    needed = sum(linear.weight.nbytes for _, linear in linears)
    available = _available_memory_bytes()
    if available is not None and needed + reserve_bytes + WORKING_MARGIN > available:
        return (
            f"the packed copy ({needed / 2**30:.1f} GiB), with {reserve_bytes / 2**30:.1f} GiB kept for the "
            f"draft and prefix caches and {WORKING_MARGIN / 2**30:.0f} GiB to work in, exceeds the free "
            f"memory ({available / 2**30:.1f} GiB); pass pack_target_weights=False to silence this"
        )
    return None


def _matches_and_pays(linear: nn.Linear, packed: PackedLinear) -> str | None:
    """Why the packed product must not replace the plain one for this layer, or None."""
    with torch.no_grad():
        for rows in CHECK_ROWS:
            seeded = torch.Generator().manual_seed(rows)
            x = torch.randn(rows, linear.in_features, dtype=linear.weight.dtype, generator=seeded)
            if not torch.equal(linear(x), packed(x)):
                return f"its products differ from the plain layer's ({rows} rows)"
        x = torch.randn(4, linear.in_features, dtype=linear.weight.dtype)
        plain, fast = _seconds_per_product(linear, x), _seconds_per_product(packed, x)
    if fast > plain:
        return f"it is not faster here ({fast * 1e6:.0f} us against {plain * 1e6:.0f} us a product)"
    return None


def packed_view(model: nn.Module, reserve_bytes: int = 0) -> nn.Module:
    """A view of `model` whose bf16 nn.Linear layers run `PackedLinear`s (everything else, and every
    parameter, shared), or `model` itself where packing does not serve (logged, with why).

    Whether packed products equal and beat the plain ones is a property of the layer's shape, the
    CPU and torch: decided once per machine (model/disk_cache.py), measured on the largest layer."""
    linears = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and module.weight.dtype == torch.bfloat16
    ]
    packed = {}  # by layer: one reached under two names is packed once, the checked one too
    why = _why_not_packed(model, linears, reserve_bytes)
    if why is None:
        # The largest layer decides: where the copy does not pay, it does not for the small ones.
        largest = max((linear for _, linear in linears), key=lambda linear: linear.weight.numel())
        entry = disk_cache.key("packing", tuple(largest.weight.shape), torch.get_num_threads())
        verdict = disk_cache.load("packing", entry)
        if verdict is None:
            packed[id(largest)] = PackedLinear(largest)
            verdict = {"why": _matches_and_pays(largest, packed[id(largest)])}
            disk_cache.store("packing", entry, verdict)
        why = verdict["why"]
    if why is not None:
        logger.info("saguaro: the target's linears stay unpacked: %s", why)
        return model
    view = clone_module_tree(model, share_hooks=True)
    # The drop-in's handle and patched generate (hf.drop_in.enable) lead back to the model: a
    # view holding them would keep its model, the key of the views' registry, alive for good.
    for name in ("_saguaro", "generate"):
        view.__dict__.pop(name, None)
    for name, linear in linears:
        if id(linear) not in packed:
            packed[id(linear)] = PackedLinear(linear)
        set_submodule(view, name, packed[id(linear)])
    weights.derived_from(view, model)
    return view


# Per model: (weight epoch, device and dtype, the view or None for the model itself), shared by
# every generator of the model; a value holding the model would keep its own key alive.
_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def runnable_target(model: nn.Module, pack: bool, reserve_bytes: int = 0) -> nn.Module:
    """The target as saguaro runs it: its packed view where `pack` and packing serves, else itself.
    Built once per model and weight epoch; the stale view is freed before a new one is built."""
    if not pack:
        return model
    state = (weights.epoch(model), model.device, model.dtype)
    entry = _VIEWS.get(model)
    if entry is not None and entry[0] == state:
        return entry[1] or model
    _VIEWS.pop(model, None)
    view = packed_view(model, reserve_bytes)
    _VIEWS[model] = (state, None if view is model else view)
    return view
