"""Tree attention: T draft-tree queries attend the committed prefix and their ancestors.

`tree_attention` runs the Triton kernel where it can (CUDA tensors, or any tensors in a
process started with TRITON_INTERPRET=1) and the fp32 reference otherwise.

Backends of the `saguaro_tree` attention (`choose_tree_backend`): "triton" (the kernel above),
"cuda" (csrc/, built just in time by `build.load_cuda_extension`), "sdpa" (PyTorch's fused
attention over the unpacked mask) and "auto": Triton where it runs, else SDPA.
"""

import torch

from saguaro.kernels.reference import (
    dense_attention_mask,
    pack_tree_mask,
    tree_attention_reference,
    unpack_tree_mask,
)

try:
    from saguaro.kernels.triton_tree_attention import INTERPRETED as _TRITON_INTERPRETED
    from saguaro.kernels.triton_tree_attention import tree_attention_triton

    HAS_TRITON = True
except (ImportError, AttributeError):  # no Triton, or one older than 3.4 (no triton.knobs)
    HAS_TRITON = False
    _TRITON_INTERPRETED = False

TREE_BACKENDS = ("auto", "triton", "cuda", "sdpa")
TREE_ATTENTION = "saguaro_tree"
# attn_implementation name -> tree-attention backend.
TREE_ATTENTION_NAMES = {
    TREE_ATTENTION: "auto",
    **{f"{TREE_ATTENTION}_{backend}": backend for backend in TREE_BACKENDS if backend != "auto"},
}


class TreeBackendUnavailable(ValueError):
    """A tree-attention backend was asked for where it cannot run."""


__all__ = [
    "HAS_TRITON",
    "TREE_BACKENDS",
    "TreeBackendUnavailable",
    "choose_tree_backend",
    "dense_attention_mask",
    "pack_tree_mask",
    "tree_attention",
    "tree_attention_reference",
    "unpack_tree_mask",
    "uses_triton",
]


def uses_triton(tensor: torch.Tensor) -> bool:
    """Whether `tree_attention` runs the Triton kernel for tensors on this tensor's device."""
    return HAS_TRITON and (tensor.is_cuda or _TRITON_INTERPRETED)


def choose_tree_backend(backend: str, device: torch.device) -> str:
    """The backend ("triton", "cuda" or "sdpa") that runs tree attention for `backend` on `device`.

    "auto" never builds anything: Triton where it runs (CUDA, or TRITON_INTERPRET=1), else SDPA.
    An explicit choice that cannot run here raises TreeBackendUnavailable saying what to do.
    """
    if backend not in TREE_BACKENDS:
        raise ValueError(f"tree attention backend must be one of {TREE_BACKENDS}, got {backend!r}")
    device = torch.device(device)
    triton_runs = HAS_TRITON and (device.type == "cuda" or _TRITON_INTERPRETED)
    if backend == "auto":
        return "triton" if triton_runs else "sdpa"
    if backend == "triton" and not triton_runs:
        raise TreeBackendUnavailable(
            f"the Triton tree-attention kernel cannot run on {device} "
            + ("(it needs a CUDA device)" if HAS_TRITON else "(Triton 3.4 or later is not installed)")
            + "; use the 'auto' or 'sdpa' backend (attn_implementation='saguaro_tree' or 'saguaro_tree_sdpa')"
        )
    if backend == "cuda":
        if device.type != "cuda":
            raise TreeBackendUnavailable(
                f"the CUDA tree-attention kernel runs on CUDA devices, and the model is on {device}; move "
                "it to a GPU, or use the 'auto' or 'sdpa' backend (attn_implementation='saguaro_tree' or "
                "'saguaro_tree_sdpa')"
            )
        from saguaro.kernels.build import CudaExtensionUnavailable, load_cuda_extension

        try:
            load_cuda_extension()
        except CudaExtensionUnavailable as error:
            raise TreeBackendUnavailable(str(error)) from error
    return backend


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tree_mask: torch.Tensor,
    scale: float,
    kv_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tree attention [B, Hq, T, D]; see `reference` for the layout of the arguments."""
    if uses_triton(q):
        return tree_attention_triton(q, k, v, tree_mask, scale, kv_start)
    return tree_attention_reference(q, k, v, tree_mask, scale, kv_start)
