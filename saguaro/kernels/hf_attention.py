"""Tree attention as a transformers attention backend.

After `register_hf_attention()`, a model loaded with attn_implementation="saguaro_tree"
(backend "auto"), or "saguaro_tree_triton" / "saguaro_tree_cuda" / "saguaro_tree_sdpa" for one
backend (see `choose_tree_backend`), verifies a draft tree when its forward receives the packed
int32 tree mask
[B, 1, T, ceil(T / 32)] as `attention_mask` (the cache holds the L prefix keys, so the
layer sees S = L + T keys). Left padding of the prefix may be passed as the forward
kwarg `saguaro_kv_start` (int32 [B]). Any other mask (None, 2D, or a float/bool 4D
mask) gets exactly what "sdpa" would do, so prompt prefill and plain decoding need no
special handling.
"""

import functools

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from saguaro.kernels import (
    TREE_ATTENTION_NAMES,
    TREE_BACKENDS,
    choose_tree_backend,
    tree_attention,
)
from saguaro.kernels.build import load_cuda_extension
from saguaro.kernels.reference import dense_attention_mask

KV_START_KWARG = "saguaro_kv_start"


@functools.cache
def attention_forward(backend: str):
    """The transformers attention function of one tree-attention backend."""

    def saguaro_tree_attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """query [B, Hq, T, D], key/value [B, Hkv, S, D] -> [B, T, Hq, D]."""
        kv_start = kwargs.pop(KV_START_KWARG, None)
        if attention_mask is None or attention_mask.dtype != torch.int32:
            # A regular mask already encodes any padding, so kv_start has nothing to add.
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        if dropout != 0.0:
            raise ValueError("tree attention verifies drafts at inference time and has no dropout")
        chosen = choose_tree_backend(backend, query.device)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if chosen == "triton":
            attn_output = tree_attention(query, key, value, attention_mask, scale, kv_start)
            return attn_output.transpose(1, 2).contiguous(), None
        if chosen == "cuda":
            kernel = load_cuda_extension().tree_attention_cuda
            attn_output = kernel(query, key, value, attention_mask, scale, kv_start)
            return attn_output.transpose(1, 2).contiguous(), None
        # Without Triton (CPU), PyTorch's fused SDPA on the unpacked mask beats the fp32 reference.
        batch, _, tree_len, _ = query.shape
        allowed = dense_attention_mask(
            attention_mask.expand(batch, -1, -1, -1), key.shape[2] - tree_len, kv_start
        )
        return sdpa_attention_forward(module, query, key, value, allowed[:, None], scaling=scaling, **kwargs)

    return saguaro_tree_attention_forward


saguaro_tree_attention_forward = attention_forward("auto")


def register_hf_attention(backend: str = "auto") -> str:
    """Register `backend`'s tree attention under its attn_implementation name (idempotent) and
    return the name: "saguaro_tree" for "auto", "saguaro_tree_<backend>" otherwise."""
    name = next((name for name, known in TREE_ATTENTION_NAMES.items() if known == backend), None)
    if name is None:
        raise ValueError(f"tree attention backend must be one of {TREE_BACKENDS}, got {backend!r}")
    AttentionInterface.register(name, attention_forward(backend))
    # transformers builds masks only for backends it knows and otherwise drops a 2D padding
    # mask; sdpa's mask builder makes padded prefills here match sdpa. Packed 4D tree
    # masks are passed through untouched either way.
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
