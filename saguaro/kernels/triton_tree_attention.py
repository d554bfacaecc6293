"""Tree attention in Triton: flash-attention forward with a bit-packed tree mask.

Same semantics as `reference.tree_attention_reference` (see the layout there). Each
program owns BLOCK_M tree queries of one (batch, query head) and streams key blocks
with the online softmax of the Triton fused-attention tutorial, in two stages:
  1. the committed prefix, which every tree query sees in full (only left padding,
     kv_start, is masked), so no mask is read;
  2. the tree keys, whose visibility comes from the packed mask bits.

With TRITON_INTERPRET=1 set before triton is imported, the same kernel runs on CPU
tensors (slowly), which is how it is tested on machines without a GPU.
"""

import torch
import triton
import triton.language as tl

# Triton picks compiled or interpreted when a function is decorated, its own library
# functions (tl.zeros & co.) at import, so the dispatcher asks this flag rather than
# reading the environment again later.
INTERPRETED = triton.knobs.runtime.interpret

LOG2_E = 1.4426950408889634
MAX_HEAD_DIM = 256
TRITON_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _attend_key_block(
    acc,
    m_i,
    l_i,
    q,
    k_ptrs,
    v_ptrs,
    key_valid,
    allowed,
    dim_valid,
    qk_scale,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Fold one block of keys into the running (acc, max, sum) of the online softmax."""
    # Keys outside `key_valid` are never read: padding in a cache may hold garbage, and
    # 0 * NaN would leak into the sum.
    k = tl.load(k_ptrs, mask=key_valid[:, None] & dim_valid[None, :], other=0.0).to(DOT_DTYPE)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    qk = tl.where(allowed, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # A row can see nothing in this block and nothing before it (e.g. its first tree
    # block holds none of its ancestors); subtracting 0 instead of -inf keeps it NaN-free.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptrs, mask=key_valid[:, None] & dim_valid[None, :], other=0.0).to(DOT_DTYPE)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(DOT_DTYPE), v, acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _tree_attention_fwd(
    Q,
    K,
    V,
    TreeMask,
    KvStart,
    Out,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_vd,
    stride_mb,
    stride_mt,
    stride_mw,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_od,
    qk_scale,
    num_q_heads,
    group_size,
    tree_len,
    prefix_len,
    head_dim,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    # int64 base offsets: B * H * S * D overflows int32 for long caches.
    off_b = (off_bh // num_q_heads).to(tl.int64)
    off_h = (off_bh % num_q_heads).to(tl.int64)
    off_kv_h = off_h // group_size

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_valid = offs_m < tree_len
    # head_dim is padded up to a power of two; the extra lanes load zeros and are not stored.
    dim_valid = offs_d < head_dim

    q_ptrs = (
        Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=row_valid[:, None] & dim_valid[None, :], other=0.0).to(DOT_DTYPE)
    k_head = K + off_b * stride_kb + off_kv_h * stride_kh
    v_head = V + off_b * stride_vb + off_kv_h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    # Stage 1: prefix keys. Blocks entirely inside the left padding are skipped.
    kv_start = tl.load(KvStart + off_b)
    for start_n in range(kv_start // BLOCK_N * BLOCK_N, prefix_len, BLOCK_N):
        cols = start_n + offs_n
        key_valid = (cols >= kv_start) & (cols < prefix_len)
        acc, m_i, l_i = _attend_key_block(
            acc,
            m_i,
            l_i,
            q,
            k_head + cols[:, None] * stride_ks + offs_d[None, :] * stride_kd,
            v_head + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd,
            key_valid,
            key_valid[None, :],
            dim_valid,
            qk_scale,
            DOT_DTYPE,
            DOT_PRECISION,
        )

    # Stage 2: tree keys. Ancestors precede descendants, so keys after this block's last
    # query are invisible to all of its rows and are skipped (half the work of a chain).
    k_tree = k_head + prefix_len * stride_ks
    v_tree = v_head + prefix_len * stride_vs
    mask_rows = TreeMask + off_b * stride_mb + offs_m[:, None] * stride_mt
    for start_n in range(0, tl.minimum(start_m + BLOCK_M, tree_len), BLOCK_N):
        cols = start_n + offs_n
        key_valid = cols < tree_len
        # Each (query, key) pair reads its own word; rows share a handful of words per
        # block, so these loads hit cache and cost far less than the K/V tiles.
        words = tl.load(
            mask_rows + (cols // 32)[None, :] * stride_mw,
            mask=row_valid[:, None] & key_valid[None, :],
            other=0,
        )
        allowed = ((words >> (cols % 32)[None, :]) & 1) != 0
        acc, m_i, l_i = _attend_key_block(
            acc,
            m_i,
            l_i,
            q,
            k_tree + cols[:, None] * stride_ks + offs_d[None, :] * stride_kd,
            v_tree + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd,
            key_valid,
            allowed,
            dim_valid,
            qk_scale,
            DOT_DTYPE,
            DOT_PRECISION,
        )

    # Every real row sees at least itself; only the padding rows past tree_len end at 0.
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = (
        Out
        + off_b * stride_ob
        + off_h * stride_oh
        + offs_m[:, None] * stride_ot
        + offs_d[None, :] * stride_od
    )
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_valid[:, None] & dim_valid[None, :])


def launch_config(dtype: torch.dtype, head_dim: int, tree_len: int) -> dict:
    """Compile-time parameters and launch options of the kernel for these shapes."""
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    # Wide rows (fp32, or head_dim 256) get narrower tiles so that the Q tile and the
    # double-buffered K/V tiles stay within shared memory.
    row_bytes = dtype.itemsize * head_dim_pad
    return {
        "HEAD_DIM_PAD": head_dim_pad,
        # Small trees (decode-time verification) get a small query tile instead of idle rows.
        "BLOCK_M": min(64 if row_bytes <= 512 else 32, max(16, triton.next_power_of_2(tree_len))),
        "BLOCK_N": 64 if row_bytes <= 256 else 32,
        # The interpreter stores bf16 as raw uint16 and its tl.dot multiplies the bit
        # patterns (triton-lang/triton#11584), so interpreted bf16 multiplies in fp32.
        "DOT_DTYPE": tl.float32 if INTERPRETED and dtype == torch.bfloat16 else TRITON_DTYPES[dtype],
        # fp32 callers expect fp32 results, not TF32's 10-bit mantissa.
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "num_warps": 4,
        "num_stages": 2,
        # FMA contraction, pinned because Triton's default flips in 3.10.
        "enable_fp_fusion": True,
    }


def tree_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tree_mask: torch.Tensor,
    scale: float,
    kv_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tree attention with the Triton kernel; arguments as in `tree_attention_reference`.

    tree_mask may have batch size 1 to share one tree across the batch.
    """
    batch, q_heads, tree_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    prefix_len = kv_len - tree_len
    words = triton.cdiv(tree_len, 32)
    if q.dtype not in TRITON_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"q, k, v must share one of {list(TRITON_DTYPES)}, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if head_dim > MAX_HEAD_DIM or k.shape[-1] != head_dim or v.shape[-1] != head_dim:
        raise ValueError(f"head_dim must match across q, k, v and be <= {MAX_HEAD_DIM}")
    if q_heads % kv_heads != 0 or prefix_len < 0:
        raise ValueError(
            f"need Hq % Hkv == 0 and k holding L + T >= T keys, got {q_heads=}, {kv_heads=}, {kv_len=}"
        )
    if tree_mask.dtype != torch.int32 or tuple(tree_mask.shape[1:]) != (1, tree_len, words):
        expected = f"int32 [B, 1, {tree_len}, {words}]"
        raise ValueError(f"tree_mask must be {expected}, got {tree_mask.dtype} {list(tree_mask.shape)}")

    # expand gives a shared tree a zero batch stride instead of a copy.
    tree_mask = tree_mask.expand(batch, 1, tree_len, words)
    if kv_start is None:
        kv_start = torch.zeros(batch, dtype=torch.int32, device=q.device)
    kv_start = kv_start.to(device=q.device, dtype=torch.int32)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)

    config = launch_config(q.dtype, head_dim, tree_len)
    grid = (triton.cdiv(tree_len, config["BLOCK_M"]), batch * q_heads)
    _tree_attention_fwd[grid](
        q,
        k,
        v,
        tree_mask,
        kv_start,
        out,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        tree_mask.stride(0),
        tree_mask.stride(2),
        tree_mask.stride(3),
        *out.stride(),
        scale * LOG2_E,
        q_heads,
        q_heads // kv_heads,
        tree_len,
        prefix_len,
        head_dim,
        **config,
    )
    return out
