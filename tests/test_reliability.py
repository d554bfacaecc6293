"""Failure modes that must cost speed or give a clear error, never a crash or a wrong answer (issue 31)."""

import warnings

import pytest
import torch
from conftest import perturbed_copy, tiny_model

import saguaro

PROMPT = torch.tensor([[1, 17, 50, 5]])


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("llama", seed=0)
    return target, perturbed_copy(target, 0.02)


@pytest.mark.parametrize("method", ["autoregressive", "speculative", "tree", "saguaro", "prompt_lookup"])
def test_a_huge_max_new_tokens_allocates_only_what_the_sequence_uses(pair, method):
    # The KV buffers were sized prompt + max_new_tokens up front: 64 GB here, refused by the allocator.
    target, draft = pair
    expected = target.generate(PROMPT, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    eos = int(expected[0, PROMPT.shape[1] + 3])  # the 4th token generated
    assert eos not in expected[0, PROMPT.shape[1] : PROMPT.shape[1] + 3].tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # past max_position_embeddings, as HF warns
        out = saguaro.generate(
            target, PROMPT, draft_model=draft, method=method, max_new_tokens=10**9, eos_token_id=eos
        )
        batch = saguaro.generate(
            target,
            torch.cat([PROMPT, PROMPT]),
            draft_model=draft,
            method=method,
            max_new_tokens=10**9,
            eos_token_id=eos,
        )
    assert out.tolist() == expected[:, : PROMPT.shape[1] + 4].tolist()
    assert batch.tolist() == expected[:, : PROMPT.shape[1] + 4].repeat(2, 1).tolist()
