"""saguaro.generate: stopping rules, return types and clear errors for bad input."""

import copy
import logging
import warnings

import numpy as np
import pytest
import torch
from conftest import perturbed_copy, tiny_model

import saguaro
from saguaro.tune.cost_model import LookaheadController, TreeDepthController

PROMPT = torch.tensor([[1, 17, 33, 5, 80, 42, 9, 64, 23]])
EOS_PROMPT = torch.tensor([[1, 13, 51, 16, 20, 79, 45, 71, 17]])  # the target emits EOS (2) after it


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
    assert target.generation_config.eos_token_id == 2
    expected = target.generate(EOS_PROMPT, max_new_tokens=60, do_sample=False, pad_token_id=0)
    out = saguaro.generate(target, EOS_PROMPT, draft_model=draft, max_new_tokens=60)
    assert out.tolist() == expected.tolist()
    # It stopped at the EOS, not at max_new_tokens.
    new = out[0, EOS_PROMPT.shape[1] :].tolist()
    assert new[-1] == 2 and 2 not in new[:-1] and len(new) < 60


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
    # With a fixed method and the constant schedule: "auto" picks the method and the adaptive
    # schedule the draft lengths from measured timings, and each choice draws a different number of
    # random numbers (same distribution, another sample).
    target, draft = pair
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(
            saguaro.generate(
                target,
                PROMPT,
                draft_model=draft,
                method="speculative",
                max_new_tokens=20,
                do_sample=True,
                eos_token_id=[],
                speculation_schedule="constant",
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
        saguaro.generate(target, PROMPT, draft_model=draft, do_sample=True, top_p=-0.5)
    for bad in (0, True, 2.0, "4"):
        with pytest.raises(ValueError, match="max_new_tokens"):
            saguaro.generate(target, PROMPT, draft_model=draft, max_new_tokens=bad)
    with pytest.raises(TypeError, match="integer token ids"):
        saguaro.generate(target, PROMPT.float(), draft_model=draft)
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


def test_numpy_integer_max_new_tokens_is_accepted(pair):
    target, draft = pair
    out = saguaro.generate(target, PROMPT, draft_model=draft, max_new_tokens=np.int64(7), eos_token_id=[])
    assert out.shape == (1, PROMPT.shape[1] + 7)


def test_a_float_attention_mask_works_as_in_hf(pair):
    target, draft = pair
    ids = torch.tensor([[0, 0, *PROMPT[0, :7].tolist()], PROMPT[0].tolist()])
    mask = torch.tensor([[0] * 2 + [1] * 7, [1] * 9])
    expected = target.generate(ids, attention_mask=mask.float(), max_new_tokens=8, do_sample=False)
    assert (
        expected.tolist()
        == target.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False).tolist()
    )
    out = saguaro.generate(
        target, ids, draft_model=draft, attention_mask=mask.float(), max_new_tokens=8, pad_token_id=0
    )
    assert out.tolist() == expected.tolist()


def test_top_p_of_one_or_more_keeps_every_token_as_in_hf(pair):
    # HF's generate adds no top-p warper for top_p >= 1: the same samples as without top_p.
    target, draft = pair
    runs = []
    for top_p in (None, 1.0, 1.5):
        torch.manual_seed(11)
        runs.append(
            saguaro.generate(
                target,
                PROMPT,
                draft_model=draft,
                max_new_tokens=12,
                do_sample=True,
                top_p=top_p,
                eos_token_id=[],
                method="speculative",
                speculation_schedule="constant",
            ).tolist()
        )
    assert runs[0] == runs[1] == runs[2]


def test_past_max_position_embeddings_warns_and_generates_as_hf(caplog):
    target = tiny_model("llama", seed=0)
    target.config.max_position_embeddings = 16  # rotary positions go on past it, as in HF
    expected = target.generate(PROMPT, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="saguaro"):
        warnings.simplefilter("always")
        out = saguaro.generate(
            target, PROMPT, draft_model=perturbed_copy(target, 0.003), max_new_tokens=20, eos_token_id=[]
        )
    assert out.tolist() == expected.tolist()
    assert [w.category for w in caught if "max_position_embeddings" in str(w.message)] == [
        saguaro.SaguaroWarning
    ]
    assert any("max_position_embeddings" in r.getMessage() for r in caplog.records if r.name == "saguaro")


@pytest.mark.parametrize("method", ["speculative", "tree", "saguaro"])
def test_a_draft_with_a_slightly_smaller_vocabulary_is_exact(method):
    # Like Qwen2.5's 151936 vs 152064 rows: the target emits (and the prompt holds) ids 92..95,
    # which the draft lacks; it must still be fed them, and never propose them.
    target = tiny_model("llama", seed=0)
    draft = tiny_model("llama", seed=0, vocab=92)
    prompt = torch.tensor([[1, 7, 34, 75, 93, 30, 58, 80, 61, 95]])
    expected = target.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert max(expected[0].tolist()) >= 92  # the case this test is about
    options = {"placement": "process"} if method == "saguaro" else {}
    with saguaro.SpeculativeGenerator(target, draft, method=method, **options) as generator:
        out = generator.generate(prompt, max_new_tokens=40, eos_token_id=[], return_dict_in_generate=True)
        torch.manual_seed(0)
        sampled = generator.generate(prompt, max_new_tokens=20, do_sample=True, eos_token_id=[])
    assert out.sequences.tolist() == expected.tolist()
    assert out.stats.drafted > 0 and out.stats.worker_failures == 0
    assert sampled.shape == (1, prompt.shape[1] + 20)


def test_options_are_checked_when_the_generator_is_built(pair):
    target, draft = pair

    def build(**options):
        return saguaro.SpeculativeGenerator(
            target, draft, method="saguaro", num_speculative_tokens=4, **options
        )

    with pytest.raises(ValueError, match="pre-speculates no branch: use at least 1"):
        build(saguaro_budget=0)
    with pytest.raises(ValueError, match="saguaro_budget must be an int"):
        build(saguaro_budget=6.0)
    with pytest.raises(ValueError, match="lower it to at most 96"):
        build(saguaro_budget=97)
    for timeout in (0, -1.0, None, True):
        with pytest.raises(ValueError, match="worker_timeout"):
            build(worker_timeout=timeout)
    assert build(saguaro_budget=2).drafts._speculator_kwargs["budget"] == 2
    assert build(saguaro_budget=np.int64(96), worker_timeout=0.5).options.worker_timeout == 0.5


def test_a_model_on_the_meta_device_gets_a_clear_error(pair):
    target, draft = pair
    meta = copy.deepcopy(draft).to("meta")
    with pytest.raises(ValueError, match="meta device, so it has no weights"):
        saguaro.SpeculativeGenerator(target, meta)
    # What the old hint suggested (draft_device="meta") must not get past the check either.
    with pytest.raises(ValueError, match="meta device"):
        saguaro.SpeculativeGenerator(target, meta, draft_device="meta")


def test_tree_adapts_its_depth_and_stays_exact(pair, monkeypatch):
    target, draft = pair
    expected = target.generate(PROMPT, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
    with saguaro.SpeculativeGenerator(target, draft, method="tree", tree_branching=[2, 2, 1, 1]) as generator:
        assert (
            isinstance(generator.policy.lookahead, TreeDepthController)
            and generator.policy.lookahead.max_k == 4
        )
        out = generator.generate(PROMPT, max_new_tokens=30, eos_token_id=[], return_dict_in_generate=True)
        assert out.sequences.tolist() == expected.tolist()
        # The controller booked the rounds under the depths it chose (4 at first: nothing measured).
        assert (
            generator.policy.lookahead.acceptance.reached[0] > 0
            and out.stats.round_log[0]["drafted"] == 2 + 4 + 4 + 4
        )
        # Whatever depth it chooses, the tree is cut to it: depth 1 is the first level's 2 nodes.
        monkeypatch.setattr(LookaheadController, "choose", lambda self, limit: min(1, limit))
        cut = generator.generate(PROMPT, max_new_tokens=30, eos_token_id=[], return_dict_in_generate=True)
    assert cut.sequences.tolist() == expected.tolist()
    assert {r["drafted"] for r in cut.stats.round_log} == {2}


def test_the_deepest_draft_defaults_per_method(pair):
    target, draft = pair
    # Saguaro drafts behind the verification, so depth costs it only verification tokens.
    with saguaro.SpeculativeGenerator(target, draft, method="saguaro") as generator:
        assert generator.options.num_speculative_tokens == 6
    with saguaro.SpeculativeGenerator(target, draft, method="speculative") as generator:
        assert generator.options.num_speculative_tokens == 4
    with saguaro.SpeculativeGenerator(target, draft, method="saguaro", num_speculative_tokens=3) as generator:
        assert generator.options.num_speculative_tokens == 3
