"""Tree-attention semantics, written the slow and obvious way.

The kernels beside this file must agree with `tree_attention_reference`; it is the
definition they are tested against, so it favours clarity over speed and memory.

Layout shared by every implementation:
  q          [B, Hq, T, D]      one query per draft-tree token
  k, v       [B, Hkv, L + T, D] committed prefix (L keys) followed by the T tree keys,
                                in the same order as the queries
  tree_mask  int32 [B, 1, T, W] bit j % 32 of word j // 32 in row i is set iff tree
                                query i may attend tree key j; W = ceil(T / 32)
  kv_start   int32 [B]          keys before kv_start[b] are left padding of the prefix,
                                so kv_start[b] <= L (default 0)

Tree tokens are in topological order (every ancestor before its descendants) and each
query sees itself, so row i only has bits in columns <= i and is never fully masked.
"""

import torch

BITS_PER_WORD = 32


def mask_words(tree_len: int) -> int:
    """Number of int32 words holding one row of a packed tree mask."""
    return (tree_len + BITS_PER_WORD - 1) // BITS_PER_WORD


def pack_tree_mask(dense: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tree mask [B, T, T] (or [T, T]) into int32 words [B, 1, T, W].

    One bit per (query, key) pair makes the mask that travels through the model 8x
    smaller than a bool mask (32x than an fp32 additive one), which matters when T
    reaches prefill sizes.
    """
    if dense.dim() == 2:
        dense = dense.unsqueeze(0)
    batch, tree_len, _ = dense.shape
    words = mask_words(tree_len)
    padded = torch.zeros(batch, tree_len, words * BITS_PER_WORD, dtype=torch.int64, device=dense.device)
    padded[..., :tree_len] = dense.to(torch.int64)
    bit_values = 2 ** torch.arange(BITS_PER_WORD, dtype=torch.int64, device=dense.device)
    unsigned = (padded.view(batch, tree_len, words, BITS_PER_WORD) * bit_values).sum(-1)
    # int32 has no unsigned form: bit 31 set means a negative word (two's complement).
    signed = torch.where(unsigned >= 2**31, unsigned - 2**32, unsigned)
    return signed.to(torch.int32).unsqueeze(1)


def unpack_tree_mask(packed: torch.Tensor, tree_len: int) -> torch.Tensor:
    """Inverse of `pack_tree_mask`: int32 [B, 1, T, W] -> bool [B, T, T]."""
    shifts = torch.arange(BITS_PER_WORD, dtype=torch.int32, device=packed.device)
    # Arithmetic right shift keeps bit j at position 0 even for negative words.
    bits = (packed[:, 0, :, :, None] >> shifts) & 1
    return bits.flatten(-2)[..., :tree_len].bool()


def dense_attention_mask(
    tree_mask: torch.Tensor, prefix_len: int, kv_start: torch.Tensor | None = None
) -> torch.Tensor:
    """Expand a packed tree mask to the full bool mask [B, T, L + T] over prefix and tree keys."""
    batch, _, tree_len, _ = tree_mask.shape
    tree_part = unpack_tree_mask(tree_mask, tree_len)
    prefix_part = torch.ones(batch, tree_len, prefix_len, dtype=torch.bool, device=tree_mask.device)
    allowed = torch.cat([prefix_part, tree_part], dim=-1)
    if kv_start is not None:
        key_index = torch.arange(prefix_len + tree_len, device=tree_mask.device)
        not_padding = key_index[None, :] >= kv_start.to(tree_mask.device)[:, None]
        allowed = allowed & not_padding[:, None, :]
    return allowed


def tree_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tree_mask: torch.Tensor,
    scale: float,
    kv_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of T tree queries over the committed prefix and their tree ancestors.

    Materialises the dense mask and the full score matrix in fp32; returns [B, Hq, T, D]
    in q's dtype.
    """
    batch, q_heads, tree_len, _ = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    allowed = dense_attention_mask(tree_mask.expand(batch, -1, -1, -1), kv_len - tree_len, kv_start)
    # GQA: query head h reads kv head h // (Hq // Hkv), which repeat_interleave lines up.
    group_size = q_heads // kv_heads
    k = k.repeat_interleave(group_size, dim=1).float()
    v = v.repeat_interleave(group_size, dim=1).float()
    scores = (q.float() @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return (scores.softmax(dim=-1) @ v).to(q.dtype)
