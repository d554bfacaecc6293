"""Grouped-query attention for a few query tokens, with the query heads that share a key/value head
packed into one sequence: a transformers attention backend for verification forwards on CPU.

For a grouped-query model (G query heads per key/value head) and T > 1 new tokens under an explicit
mask, transformers' "sdpa" copies every key and value G times (`repeat_kv`) and PyTorch's CPU
flash kernel then works through G x more heads of T queries each, padded to its query block: a
verification of 2 tokens costs half again a step of 1. transformers itself avoids this only for
T = 1 (`pack_gqa`). Here the G x T queries of one key/value head become one sequence
[B, Hkv, G * T, D] against that head's keys, and the mask [B, 1, T, S] is repeated G times along
the queries to match: the same scores, each key read once. Anything else (one token, a long
prefill, no mask, a position bias, another device) gets exactly what "sdpa" does.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_GQA = "saguaro_packed_gqa"
# Longest query chain packed: a verification (draft length + 1) or a catch-up of a few tokens.
# A prefill is long enough for the kernel's query blocks to fill up without packing.
MAX_PACKED_TOKENS = 16
# What some attention layers pass that changes the scores (a bias, soft-capping, sinks): left to "sdpa".
UNPACKED_KWARGS = ("position_bias", "softcap", "s_aux")


def packed_gqa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [B, H, T, D], key/value [B, Hkv, S, D], mask [B, 1, T, S] -> [B, T, H, D]."""
    batch, heads, tokens, dim = query.shape
    groups = heads // key.shape[1]
    if (
        groups == 1
        or not 1 < tokens <= MAX_PACKED_TOKENS
        or attention_mask is None
        or attention_mask.dim() != 4
        or attention_mask.shape[1] != 1
        or query.device.type != "cpu"
        or any(kwargs.get(name) is not None for name in UNPACKED_KWARGS)
        or dropout
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    # Head h = kv * groups + g: its queries go to rows g * T .. g * T + T - 1 of head kv's sequence.
    packed = query.reshape(batch, heads // groups, groups * tokens, dim)
    mask = attention_mask.expand(batch, 1, tokens, -1).repeat(1, 1, groups, 1)
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, tokens, dim).transpose(1, 2).contiguous(), None


def register_packed_gqa() -> str:
    """Register the backend under its attn_implementation name (idempotent) and return the name."""
    AttentionInterface.register(PACKED_GQA, packed_gqa_attention_forward)
    AttentionMaskInterface.register(PACKED_GQA, sdpa_mask)  # masks built as for "sdpa"
    return PACKED_GQA
