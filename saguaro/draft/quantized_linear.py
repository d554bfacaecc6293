"""Weight-only quantized linears: a draft's nn.Linear stored as int8 or int4 codes.

On CPU these run torch's own kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`),
which stream a half or a quarter of bf16's bytes per token. `dequantized_weight` is the slow
reference the tests hold them to. Building a draft of them is draft/quantize.py.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

QUANTIZATIONS = ("int8", "int4")  # weight-only, per output channel (int8) or per group (int4)
INT4_GROUP_SIZE = 128
QUANTIZE_ROWS = 2048
# torch's CPU int4 packing takes output features in multiples of 16.
INT4_CPU_ROW_MULTIPLE = 16


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


class WeightOnlyLinear(nn.Module):
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


class Int8WeightOnlyLinear(WeightOnlyLinear):
    """`quantize_int8` codes and scales through `torch._weight_int8pack_mm`."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        codes, scales = quantize_int8(linear.weight)
        self.register_buffer("weight_int8", codes)
        self.register_buffer("scales", scales)

    def _matmul(self, x2d):
        return torch._weight_int8pack_mm(x2d, self.weight_int8, self.scales)


class Int4WeightOnlyLinear(WeightOnlyLinear):
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
