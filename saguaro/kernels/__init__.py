"""Tree attention: T draft-tree queries attend the committed prefix and their ancestors.

`tree_attention` runs the Triton kernel where it can (CUDA tensors, or any tensors in a
process started with TRITON_INTERPRET=1) and the fp32 reference otherwise.
"""

import torch

from .reference import dense_attention_mask, pack_tree_mask, tree_attention_reference, unpack_tree_mask

try:
    from .triton_tree_attention import INTERPRETED as _TRITON_INTERPRETED
    from .triton_tree_attention import tree_attention_triton

    HAS_TRITON = True
except (ImportError, AttributeError):  # no Triton, or one older than 3.4 (no triton.knobs)
    HAS_TRITON = False
    _TRITON_INTERPRETED = False

__all__ = [
    "HAS_TRITON",
    "dense_attention_mask",
    "pack_tree_mask",
    "register_hf_attention",
    "tree_attention",
    "tree_attention_reference",
    "unpack_tree_mask",
    "uses_triton",
]


def uses_triton(tensor: torch.Tensor) -> bool:
    """Whether `tree_attention` runs the Triton kernel for tensors on this tensor's device."""
    return HAS_TRITON and (tensor.is_cuda or _TRITON_INTERPRETED)


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


def __getattr__(name: str):
    # Resolved lazily so that importing the kernels does not import transformers.
    if name == "register_hf_attention":
        from .hf_attention import register_hf_attention

        return register_hf_attention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
