"""Packed grouped-query attention (kernels/packed_gqa.py) against PyTorch's SDPA, in the manner of
flash-attention's tests: its error from a float64 reference stays within a small multiple of what
SDPA's own error is; and through a model, saguaro's forwards use it without changing the model."""

import pytest
import torch
from conftest import tiny_model
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from saguaro.kernels.packed_gqa import MAX_PACKED_TOKENS, PACKED_GQA, packed_gqa_attention_forward
from saguaro.model.batched_runner import BatchedRunner


class Layer(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups


def inputs(batch, heads, kv_heads, tokens, keys, dtype, seed=0):
    """q/k/v and an additive mask [B, 1, T, S]: each row's own random holes in the past, then the
    causal chain of the new tokens (every query sees itself, so no row is all masked)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, tokens, 64, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, keys, 64, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, keys, 64, generator=gen).to(dtype)
    past = torch.rand(batch, 1, 1, keys - tokens, generator=gen) > 0.3
    chain = torch.ones(tokens, tokens, dtype=torch.bool).tril()[None, None]
    visible = torch.cat([past.expand(-1, -1, tokens, -1), chain.expand(batch, -1, -1, -1)], dim=3)
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)
    return q, k, v, mask


def reference(q, k, v, mask) -> torch.Tensor:
    """float64 attention with every key/value head repeated for its query heads: [B, T, H, D]."""
    groups = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(groups, dim=1) for x in (k, v))
    scores = q.double() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + mask.double().clamp_min(-1e30)
    return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [2, 5, MAX_PACKED_TOKENS])
@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (12, 2), (8, 8)])
def test_packed_attention_is_as_accurate_as_sdpa(dtype, tokens, heads, kv_heads):
    q, k, v, mask = inputs(3, heads, kv_heads, tokens, 70, dtype)
    layer = Layer(heads // kv_heads)
    packed, _ = packed_gqa_attention_forward(layer, q, k, v, mask)
    sdpa, _ = sdpa_attention_forward(layer, q, k, v, mask)
    exact = reference(q, k, v, mask)
    assert packed.shape == sdpa.shape == exact.shape
    sdpa_error = (sdpa.double() - exact).abs().max().item()
    packed_error = (packed.double() - exact).abs().max().item()
    assert packed_error <= 2 * sdpa_error + 1e-6


def test_a_mask_repeated_in_the_wrong_order_is_caught():
    # Planted bug: the mask repeated per token (interleaved) instead of per head group.
    q, k, v, mask = inputs(2, 6, 2, 4, 30, torch.float32)
    exact = reference(q, k, v, mask)
    wrong = mask.repeat_interleave(3, dim=2)
    packed = q.reshape(2, 2, 12, 64)
    out = torch.nn.functional.scaled_dot_product_attention(packed, k, v, attn_mask=wrong)
    out = out.reshape(2, 6, 4, 64).transpose(1, 2)
    assert (out.double() - exact).abs().max() > 1e-2


@pytest.mark.parametrize("tokens", [1, MAX_PACKED_TOKENS + 1])
def test_one_token_and_long_chains_get_sdpa_itself(tokens):
    q, k, v, mask = inputs(2, 6, 2, tokens, 40, torch.float32)
    layer = Layer(3)
    for m in (mask, None):
        packed, _ = packed_gqa_attention_forward(layer, q, k, v, m)
        assert torch.equal(packed, sdpa_attention_forward(layer, q, k, v, m)[0])


def test_saguaro_forwards_use_it_and_leave_the_model_as_it_was():
    model = tiny_model("qwen2", seed=1)  # 4 query heads on 2 key/value heads
    calls = []

    def counting(module, query, *args, **kwargs):
        calls.append(query.shape[2])
        return packed_gqa_attention_forward(module, query, *args, **kwargs)

    runner = BatchedRunner(model)  # registers the backend
    AttentionInterface.register(PACKED_GQA, counting)
    try:
        runner.prefill([[1, 5, 6, 7, 8], [1, 9, 10]])
        logits = runner.forward([[11, 12, 13], [14, 15, 16]])
    finally:
        AttentionInterface.register(PACKED_GQA, packed_gqa_attention_forward)
    assert 3 in calls  # the verification-shaped forward went through the packed backend
    assert model.config._attn_implementation == "sdpa"
    # The same forward through HF's own "sdpa" agrees.
    reference_runner = BatchedRunner(model)
    reference_runner.call.packed_gqa = None
    reference_runner.prefill([[1, 5, 6, 7, 8], [1, 9, 10]])
    expected = reference_runner.forward([[11, 12, 13], [14, 15, 16]])
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
