"""Saguaro (speculative speculative decoding): exact output, a working speculation cache, and a
drafter worker that never outlives its generator nor loses a token when it dies."""

import multiprocessing
import os
import signal

import pytest
import torch
from conftest import perturbed_copy, slow_verification, tiny_model

import saguaro
from saguaro.decode import engines
from saguaro.draft.stream import DraftSource
from saguaro.ssd.outcomes import ConfidenceCalibration, draft_confidence, predict_outcomes
from saguaro.ssd.worker import WorkerFailed

PROMPT = torch.tensor([[1, 17, 33, 5, 80, 42, 9, 64, 23]])
pytestmark = pytest.mark.timeout(180)


def hf_greedy(model, max_new_tokens):
    return model.generate(
        PROMPT, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    ).tolist()


def worker_process(generator):
    return generator.drafts.worker._process


def saguaro_generator(target, draft=None, **options):
    """A Saguaro generator with the constant schedule and a process worker; the draft defaults to a
    slightly perturbed copy of the target (most drafts accepted, some rejected)."""
    options = {"speculation_schedule": "constant", "placement": "process", **options}
    return saguaro.SpeculativeGenerator(
        target, draft if draft is not None else perturbed_copy(target, 0.005), method="saguaro", **options
    )


def kill_worker_at_round(monkeypatch, generator, round_number: int) -> None:
    """SIGKILL the generator's worker process during its `round_number`-th verification."""
    rounds = []
    real_verify = engines.verify_proposal

    def verify_then_kill(*args):
        rounds.append(1)
        if len(rounds) == round_number:
            os.kill(worker_process(generator).pid, signal.SIGKILL)
        return real_verify(*args)

    monkeypatch.setattr(engines, "verify_proposal", verify_then_kill)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "gpt2"])
@pytest.mark.parametrize("draft_kind", ["agreeing", "disagreeing"])
def test_saguaro_greedy_matches_target_with_process_worker(arch, draft_kind):
    target = tiny_model(arch, seed=0)
    draft = perturbed_copy(target, 0.005) if draft_kind == "agreeing" else tiny_model(arch, seed=1)
    with saguaro_generator(target, draft) as generator:
        out = generator.generate(PROMPT, max_new_tokens=40, eos_token_id=[], return_dict_in_generate=True)
        assert worker_process(generator).is_alive()
    assert out.sequences.tolist() == hf_greedy(target, 40)
    assert out.stats.worker_failures == 0


@pytest.mark.parametrize("placement", ["thread", "inline"])
def test_saguaro_greedy_matches_target_in_other_placements(placement):
    target = tiny_model("llama", seed=0)
    out = saguaro.generate(
        target,
        PROMPT,
        draft_model=perturbed_copy(target, 0.005),
        method="saguaro",
        speculation_schedule="constant",
        placement=placement,
        max_new_tokens=40,
        eos_token_id=[],
        return_dict_in_generate=True,
    )
    assert out.sequences.tolist() == hf_greedy(target, 40)
    if placement == "inline":  # no pre-speculation: every round is a backup draft
        assert out.stats.hits == 0


def test_perfect_drafter_always_hits_and_random_drafter_almost_never(monkeypatch):
    slow_verification(monkeypatch)
    target = tiny_model("llama", seed=0)
    with saguaro_generator(target, target) as generator:
        perfect = generator.generate(PROMPT, max_new_tokens=60, eos_token_id=[], return_dict_in_generate=True)
    # The drafter is the target: every draft is accepted and its bonus guess is the target's token.
    assert perfect.stats.hit_rate == 1.0 and perfect.stats.acceptance_rate == 1.0
    monkeypatch.undo()  # fast verification: the budget stays small, as it would for a tiny target
    unrelated = tiny_model("llama", seed=7)
    with saguaro_generator(target, unrelated) as generator:
        random = generator.generate(PROMPT, max_new_tokens=60, eos_token_id=[], return_dict_in_generate=True)
    assert random.stats.hit_rate < 0.15
    assert random.sequences.tolist() == perfect.sequences.tolist() == hf_greedy(target, 60)


def test_killing_the_worker_mid_generation_loses_nothing(monkeypatch):
    target = tiny_model("qwen2", seed=0)
    generator = saguaro_generator(target)
    kill_worker_at_round(monkeypatch, generator, 3)
    with generator, pytest.warns(saguaro.SaguaroWarning, match="drafter worker failed") as caught:
        out = generator.generate(PROMPT, max_new_tokens=40, eos_token_id=[], return_dict_in_generate=True)
        again = generator.generate(PROMPT, max_new_tokens=40, eos_token_id=[])  # inline from now on
    assert out.sequences.tolist() == again.tolist() == hf_greedy(target, 40)
    assert out.stats.worker_failures == 1
    assert len([w for w in caught if issubclass(w.category, saguaro.SaguaroWarning)]) == 1
    assert multiprocessing.active_children() == []


def test_a_worker_failure_warns_once_per_generator_naming_the_error(caplog):
    target = tiny_model("llama", seed=0)
    generator = saguaro.SpeculativeGenerator(target, target, method="saguaro", placement="inline")
    with pytest.warns(saguaro.SaguaroWarning) as caught, caplog.at_level("WARNING", logger="saguaro"):
        generator.drafts.draft_inline(WorkerFailed("no answer within 60s"))
        generator.drafts.draft_inline(WorkerFailed("gone"))
        generator.drafts.draft_inline()  # an engine that passes no error
    assert len(caught) == 1 and "WorkerFailed: no answer within 60s" in str(caught[0].message)
    # Every failure is logged; only the first is a warning.
    assert [r.name for r in caplog.records] == ["saguaro"] * 3 and "gone" in caplog.records[1].getMessage()


def test_strict_raises_a_worker_failure_instead_of_drafting_inline(monkeypatch):
    target = tiny_model("llama", seed=0)
    generator = saguaro_generator(target, strict=True)
    kill_worker_at_round(monkeypatch, generator, 2)
    with generator:
        with pytest.raises(WorkerFailed):
            generator.generate(PROMPT, max_new_tokens=40, eos_token_id=[])
        error = WorkerFailed("stalled")
        with pytest.raises(WorkerFailed, match="stalled") as raised:
            generator.drafts.draft_inline(error)
        assert raised.value is error
    assert multiprocessing.active_children() == []


def test_a_stalled_worker_times_out_and_is_killed_on_close():
    target = tiny_model("llama", seed=0)
    generator = saguaro_generator(target, worker_timeout=2.0)
    with generator:
        generator.generate(PROMPT, max_new_tokens=5, eos_token_id=[])
        stalled = worker_process(generator)
        os.kill(stalled.pid, signal.SIGSTOP)
        with pytest.warns(saguaro.SaguaroWarning, match="drafter worker failed"):
            out = generator.generate(PROMPT, max_new_tokens=30, eos_token_id=[], return_dict_in_generate=True)
    assert out.sequences.tolist() == hf_greedy(target, 30) and out.stats.worker_failures == 1
    assert not stalled.is_alive() and multiprocessing.active_children() == []


def test_fifty_calls_then_close_leave_no_process():
    target = tiny_model("llama", seed=0)
    generator = saguaro_generator(target)
    for i in range(50):
        generator.generate(PROMPT[:, : 3 + i % 6], max_new_tokens=6, eos_token_id=[])
    process = worker_process(generator)
    assert multiprocessing.active_children() == [process]  # one worker for all fifty calls
    generator.close()
    assert not process.is_alive() and multiprocessing.active_children() == []


def test_context_manager_cleans_up_on_exception():
    target = tiny_model("llama", seed=0)
    with pytest.raises(RuntimeError, match="boom"):
        with saguaro_generator(target, target) as generator:
            generator.generate(PROMPT, max_new_tokens=5, eos_token_id=[])
            process = worker_process(generator)
            raise RuntimeError("boom")
    assert not process.is_alive() and multiprocessing.active_children() == []


def test_saguaro_stats_are_reported(monkeypatch):
    slow_verification(monkeypatch)  # pre-speculation finishes, so the cache hits
    target = tiny_model("llama", seed=0)
    out = saguaro.generate(
        target,
        PROMPT,
        draft_model=perturbed_copy(target, 0.05),
        method="saguaro",
        speculation_schedule="constant",
        placement="process",
        max_new_tokens=30,
        eos_token_id=[],
        return_dict_in_generate=True,
    )
    assert out.sequences.tolist() == hf_greedy(target, 30)
    stats, log = out.stats.as_dict(), out.stats.round_log
    # The totals are the per-round log's, and the rates follow from them.
    assert stats["hits"] == sum(r["source"] == DraftSource.CACHE for r in log) > 0
    assert stats["hit_rate"] == pytest.approx(stats["hits"] / (stats["rounds"] - 1))
    assert (
        stats["drafted"]
        == sum(r["drafted"] for r in log)
        > stats["accepted"]
        == sum(r["accepted"] for r in log)
        > 0
    )
    assert stats["acceptance_rate"] == pytest.approx(stats["accepted"] / stats["drafted"])
    assert stats["accepted"] + stats["rounds"] + 1 == 30 and stats["new_tokens"] == 30
    # Branches were prepared while rounds were verified; none before the first.
    assert log[0]["branches"] == 0 and sum(r["branches"] for r in log) > 0
    assert stats["drafter_busy_seconds"] > 0
    assert stats["worker_failures"] == 0


def test_default_adaptive_schedule_runs_through_a_process_worker():
    target = tiny_model("llama", seed=0)
    with saguaro.SpeculativeGenerator(
        target, perturbed_copy(target, 0.005), method="saguaro", placement="process"
    ) as generator:
        assert generator.policy.lookahead is not None  # the default schedule is the adaptive controller
        out = generator.generate(PROMPT, max_new_tokens=40, eos_token_id=[], return_dict_in_generate=True)
        assert worker_process(generator).is_alive()
    assert out.sequences.tolist() == hf_greedy(target, 40)
    # Speculation ran (the tiny models verify K+1 tokens for about the cost of one).
    assert out.stats.drafted >= 4 and out.stats.accepted > 0 and out.stats.worker_failures == 0
    assert generator.policy.lookahead.verify  # the controller measured the rounds it chose


@pytest.mark.parametrize("acceptance", [0.2, 0.9])
def test_outcome_guesses_follow_the_acceptance_rate(acceptance):
    # Outcome k has chance a^k (1 - a), and all K accepted a^K: low acceptance piles the guesses
    # on early rejections, high acceptance on k = K (with the next likeliest outcomes after it).
    q = torch.tensor([0.6, 0.2, 0.1, 0.05, 0.05]).repeat(5, 1)
    outcomes = predict_outcomes(q, [0, 0, 0, 0], [0.6] * 4, [acceptance] * 4, budget=6)
    assert len(set(outcomes)) == 6 and all(t != 0 for k, t in outcomes if k < 4)
    assert [k for k, _ in outcomes] == ([0, 0, 0, 0, 1, 1] if acceptance < 0.5 else [0, 1, 2, 4, 4, 4])
    # Spread (the acceptances are only a prior): every outcome's likeliest guess first.
    spread = predict_outcomes(q, [0, 0, 0, 0], [0.6] * 4, [acceptance] * 4, budget=6, spread=True)
    assert [k for k, _ in spread] == ([0, 0, 1, 2, 3, 4] if acceptance < 0.5 else [0, 1, 2, 3, 4, 4])
    with pytest.raises(ValueError, match="budget"):
        predict_outcomes(q, [0, 0, 0, 0], [0.6] * 4, [acceptance] * 4, budget=0)


def test_outcome_guesses_follow_the_drafters_confidence():
    # d_1 is near certain, d_2 a coin toss: a rejection of d_1 is unlikely, so no guess goes there,
    # where a single rate (0.5 everywhere) would spend one.
    sure = torch.tensor([0.97, 0.01, 0.01, 0.01])
    unsure = torch.tensor([0.1, 0.4, 0.3, 0.2])
    after = torch.tensor([0.7, 0.1, 0.1, 0.1])
    positions = torch.stack([sure, unsure, after])
    confidence = draft_confidence(positions, [0, 1])
    assert confidence == pytest.approx([0.97, 0.4])
    confident = predict_outcomes(positions, [0, 1], confidence, confidence, budget=3)
    assert confident == [(1, 2), (1, 3), (2, 0)]
    one_rate = predict_outcomes(positions, [0, 1], confidence, [0.5, 0.5], budget=3)
    assert any(k == 0 for k, _ in one_rate)


def test_confidence_calibration_learns_what_a_drafters_confidence_is_worth():
    calibration = ConfidenceCalibration()
    assert calibration.chance(0.05, 0.5) == 0.5  # nothing seen: the running rate
    for _ in range(20):  # an unsure drafter that is always right (the target drafting for itself)
        calibration.record([0.05, 0.06, 0.04], accepted=3)
    # A sure one that is wrong on its second token: the first accepted, the second rejected, the
    # third never judged.
    calibration.record([0.95, 0.97, 0.96], accepted=1)
    assert calibration.chance(0.05, 0.5) > 0.9
    assert calibration.judged[9] == 2 and calibration.accepted[9] == 1
    assert calibration.chance(0.5, 0.3) == 0.3


def test_misses_fall_back_to_prompt_lookup_when_it_pays():
    # Tiny random models loop, so copying from the sequence is often right: after a miss the
    # drafter should use it, and the output must stay the target's.
    target = tiny_model("llama", seed=0)
    out = saguaro.generate(
        target,
        PROMPT,
        draft_model=tiny_model("llama", seed=7),
        method="saguaro",
        speculation_schedule="constant",
        max_new_tokens=60,
        eos_token_id=[],
        return_dict_in_generate=True,
    )
    assert out.sequences.tolist() == hf_greedy(target, 60)
    assert out.stats.lookup_backups > 0
