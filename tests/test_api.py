"""saguaro.generate: stopping rules, return types and clear errors for bad input."""

import pytest
import torch
from conftest import perturbed_copy, tiny_model

import saguaro

PROMPT = torch.tensor([[1, 17, 33, 5, 80, 42, 9, 64, 23]])


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("llama", seed=0)
    return target, perturbed_copy(target, 0.003)


@pytest.mark.parametrize("method", ["autoregressive", "speculative"])
@pytest.mark.parametrize("max_new_tokens", [1, 2, 5, 13])
def test_max_new_tokens_is_exact(pair, method, max_new_tokens):
    target, draft = pair
    out = saguaro.generate(
        target,
        PROMPT,
        draft_model=draft,
        method=method,
        max_new_tokens=max_new_tokens,
        num_speculative_tokens=4,
        eos_token_id=[],
    )
    assert out.shape == (1, PROMPT.shape[1] + max_new_tokens)


@pytest.mark.parametrize("method", ["autoregressive", "speculative"])
def test_stops_at_eos_like_hf(pair, method):
    target, draft = pair
    free = target.generate(PROMPT, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
    new = free[0, PROMPT.shape[1] :].tolist()
    eos = new[6]  # a token the target emits mid-way: generation must end right after it
    for eos_arg in (eos, [999, eos]):
        expected = target.generate(
            PROMPT, max_new_tokens=30, do_sample=False, eos_token_id=eos_arg, pad_token_id=0
        )
        out = saguaro.generate(
            target, PROMPT, draft_model=draft, method=method, max_new_tokens=30, eos_token_id=eos_arg
        )
        assert out.tolist() == expected.tolist()
        assert out[0, -1].item() == eos and out.shape[1] == PROMPT.shape[1] + new.index(eos) + 1


def test_default_eos_comes_from_generation_config(pair):
    target, draft = pair
    expected = target.generate(PROMPT, max_new_tokens=60, do_sample=False, pad_token_id=0)
    out = saguaro.generate(target, PROMPT, draft_model=draft, max_new_tokens=60)
    assert out.tolist() == expected.tolist()


def test_return_dict_has_stats(pair):
    target, draft = pair
    out = saguaro.generate(
        target, PROMPT, draft_model=draft, max_new_tokens=20, eos_token_id=[], return_dict_in_generate=True
    )
    stats = out.stats
    assert out.sequences.shape == (1, PROMPT.shape[1] + 20)
    assert stats.new_tokens == 20 and stats.prompt_tokens == PROMPT.shape[1]
    # Every new token but the prefill's is accounted for by a round: accepted drafts + one per round.
    assert stats.accepted + stats.rounds + 1 == 20
    assert stats.drafted >= stats.accepted and len(stats.round_log) == stats.rounds
    assert sum(stats.accepted_histogram) == sum(1 for r in stats.round_log if r["drafted"])
    assert stats.mean_accepted_length == pytest.approx((stats.accepted + stats.rounds) / stats.rounds)
    assert stats.tokens_per_second > 0 and set(stats.as_dict()) >= {"acceptance_rate", "tokens_per_second"}


def test_seeded_sampling_is_reproducible(pair):
    target, draft = pair
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(
            saguaro.generate(
                target, PROMPT, draft_model=draft, max_new_tokens=20, do_sample=True, eos_token_id=[]
            ).tolist()
        )
    assert runs[0] == runs[1]


def test_bad_input_raises_specific_errors(pair):
    target, draft = pair
    with pytest.raises(ValueError, match="unknown method"):
        saguaro.generate(target, PROMPT, draft_model=draft, method="medusa")
    with pytest.raises(ValueError, match="needs a draft_model"):
        saguaro.generate(target, PROMPT, method="speculative")
    with pytest.raises(ValueError, match="empty"):
        saguaro.generate(target, torch.zeros(1, 0, dtype=torch.long), draft_model=draft)
    with pytest.raises(ValueError, match="left padding"):
        saguaro.generate(
            target,
            PROMPT.repeat(2, 1),
            draft_model=draft,
            attention_mask=torch.tensor([[1] * 9, [1] * 8 + [0]]),
        )
    with pytest.raises(ValueError, match="all padding"):
        saguaro.generate(
            target, PROMPT.repeat(2, 1), draft_model=draft, attention_mask=torch.tensor([[1] * 9, [0] * 9])
        )
    with pytest.raises(ValueError, match="temperature"):
        saguaro.generate(target, PROMPT, draft_model=draft, do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        saguaro.generate(target, PROMPT, draft_model=draft, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        saguaro.generate(target, PROMPT, draft_model=draft, max_new_tokens=0)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        saguaro.generate(target, PROMPT, draft_model=draft, num_speculative_tokens=0)
    with pytest.raises(ValueError, match="speculation_schedule"):
        saguaro.generate(target, PROMPT, draft_model=draft, speculation_schedule="sometimes")


def test_batch_rows_equal_single_rows(pair):
    target, draft = pair
    rows = [PROMPT[0].tolist(), PROMPT[0, :4].tolist()]
    ids = torch.tensor([rows[0], [0] * 5 + rows[1]])
    mask = (ids != 0).long()
    mask[0] = 1
    out = saguaro.generate(
        target,
        ids,
        draft_model=draft,
        attention_mask=mask,
        max_new_tokens=12,
        eos_token_id=[],
        pad_token_id=0,
        return_dict_in_generate=True,
    )
    for row, prompt in enumerate(rows):
        alone = saguaro.generate(
            target, torch.tensor([prompt]), draft_model=draft, max_new_tokens=12, eos_token_id=[]
        )
        assert out.sequences[row, 9:].tolist() == alone[0, len(prompt) :].tolist()
    assert len(out.row_stats) == 2 and out.stats.new_tokens == 24
