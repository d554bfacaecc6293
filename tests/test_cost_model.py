"""The cost model's formulas and the adaptive draft length built on them."""

import pytest
import torch
from conftest import perturbed_copy, tiny_model

import saguaro
from saguaro.tune import auto
from saguaro.tune.cost_model import AcceptanceCounter, CostCurve, LookaheadController, expected_tokens


def test_expected_tokens_is_one_plus_the_chance_of_reaching_each_position():
    assert expected_tokens([1.0] * 4, 4) == 5
    assert expected_tokens([0.0] * 4, 4) == 1
    assert expected_tokens([0.5, 0.5, 0.5], 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens([0.5, 0.5, 0.5], 1) == pytest.approx(1.5)


def test_cost_curve_interpolates_and_extrapolates():
    curve = CostCurve({1: 1.0, 5: 3.0})
    assert curve(3) == pytest.approx(2.0)
    assert curve(9) == pytest.approx(5.0)  # linear past the last point
    assert CostCurve({1: 1.0, 5: 3.0}, optimistic=True)(9) == pytest.approx(3.0)  # flat: worth a try
    assert CostCurve({4: 2.0})(1) == pytest.approx(0.5)  # proportional below the first point


def test_acceptance_counter_is_per_position():
    counter = AcceptanceCounter(3, prior=0)
    counter.observe(drafted=3, accepted=3)
    counter.observe(drafted=3, accepted=1)
    assert counter.rates() == [1.0, 0.5, 1.0]


def _controller_after(verify_cost, acceptance, draft_cost=0.0, rounds=60, max_k=6):
    """Drive a controller with synthetic rounds: verify(T) and a fixed per-position acceptance."""
    controller = LookaheadController(max_k)
    generator = torch.Generator().manual_seed(0)
    for _ in range(rounds):
        k = controller.choose(max_k)
        accepted = 0
        while accepted < k and torch.rand((), generator=generator) < acceptance:
            accepted += 1
        controller.observe(k, accepted, verify_cost(k + 1), draft_cost * k)
    return controller


def test_controller_drafts_long_when_verify_is_flat_and_drafts_agree():
    controller = _controller_after(lambda t: 1.0, acceptance=0.9, draft_cost=0.01)
    assert controller.choose(6) == 6


def test_controller_turns_speculation_off_when_verify_grows_like_the_tokens():
    # A CPU without fast bf16: T tokens cost T steps. Even good drafts cannot pay for that.
    controller = _controller_after(lambda t: float(t), acceptance=0.7, draft_cost=0.1)
    assert controller.choose(6) == 0


def test_controller_picks_a_middle_length_when_drafts_are_mediocre():
    controller = _controller_after(lambda t: 1.0 + 0.05 * t, acceptance=0.6, draft_cost=0.05)
    assert 1 <= controller.choose(6) < 6


def test_a_catch_up_is_paid_only_where_the_remaining_tokens_repay_it():
    # Speculation saves most of a second per token here; a drafter that must first feed 100 tokens at
    # 0.1 s each (a batch's prompts) repays that over 50 tokens, not over 5.
    controller = _controller_after(lambda t: 1.0, acceptance=0.9, draft_cost=0.01)
    assert controller.worth_catching_up(100, 50)  # unmeasured: tried, which measures it
    controller.observe_catch_up(100, 10.0)
    assert controller.worth_catching_up(100, 50) and not controller.worth_catching_up(100, 5)
    assert controller.worth_catching_up(0, 1)


def test_drafting_says_whether_the_last_round_drafted():
    # What a batch's draft model asks before prefilling a joining row (decode/batched.py).
    assert LookaheadController(6).drafting  # nothing chosen yet: drafts, which measures
    assert _controller_after(lambda t: 1.0, acceptance=0.9, draft_cost=0.01).drafting
    assert not _controller_after(lambda t: float(t), acceptance=0.7, draft_cost=0.1).drafting
    paying = _controller_after(lambda t: 1.0, acceptance=0.9, draft_cost=0.01)
    paying.observe_catch_up(100, 10.0)
    assert not paying.worth_catching_up(100, 5) and not paying.drafting  # a refused catch-up: plain
    assert paying.choose(6) > 0 and paying.drafting
    paying.skip()  # another drafter's drafts served the round
    assert not paying.drafting


def _row_counts(rounds: int, drafted: int, accepted: int) -> AcceptanceCounter:
    counts = AcceptanceCounter(4)
    for _ in range(rounds):
        counts.observe(drafted, accepted)
    return counts


def test_a_batch_drafts_for_the_rows_that_decide_when_it_ends():
    # Verification grows with the tokens (a CPU); the pooled rate is high, as three rows accept
    # everything, but the fourth accepts about one draft a round and needs the most rounds.
    controller = _controller_after(lambda t: 0.08 + 0.012 * t, acceptance=0.95, draft_cost=0.02, max_k=4)
    fast, slow = _row_counts(10, 4, 4), _row_counts(10, 4, 1)
    assert controller.choose(4) == 4  # one row alone, or pooled: full length
    assert controller.choose(4, [(48, fast), (48, fast), (48, fast), (48, slow)]) <= 2
    # Once the slow row has few tokens left, the fast rows decide: deeper again.
    assert controller.choose(4, [(48, fast), (48, fast), (48, fast), (2, slow)]) == 4


def test_copies_are_drafted_where_enough_rows_have_one():
    # Suffix copies (free) on a CPU where each token a row verifies adds a fifth to the round: a
    # round as wide as one row's copy is paid by all four rows, so it pays only where most have one.
    controller = LookaheadController(4, "free")
    for tokens in range(1, 6):
        controller.verify.observe(tokens, 1.0 + 0.2 * (tokens - 1))
    copied = _row_counts(20, 4, 4)

    def rows(caps):
        return [(40, copied, cap) for cap in caps]

    assert controller.choose(4, rows([4, 0, 0, 0])) == 0
    assert controller.choose(4, rows([4, 4, 4, 4])) == 4
    assert controller.choose(4, rows([2, 2, 2, 2])) == 2  # no deeper than the copies go


def test_rows_that_finish_early_make_the_later_rounds_cheaper():
    controller = _controller_after(lambda t: 1.0, acceptance=0.9, draft_cost=0.01, max_k=4)
    fast, slow = _row_counts(50, 4, 4), _row_counts(50, 4, 0)
    pooled = controller.acceptance.rates()
    fast_rounds = 20 / expected_tokens(fast.rates_near(pooled), 2)
    slow_rounds = 20 / expected_tokens(slow.rates_near(pooled), 2)
    cost = {2: 3.0, 1: 1.0}  # a round at two live rows, then at one

    seconds = controller.batch_seconds(2, [(20, fast), (20, slow)], lambda rows, k: cost[rows])
    assert slow_rounds > fast_rounds
    assert seconds == pytest.approx(fast_rounds * 3.0 + (slow_rounds - fast_rounds) * 1.0)


def test_controller_never_exceeds_the_limit():
    controller = _controller_after(lambda t: 1.0, acceptance=0.9)
    assert controller.choose(2) == 2 and controller.choose(0) == 0


@pytest.mark.parametrize("method", ["speculative", "prompt_lookup", "saguaro"])
def test_adaptive_schedule_stays_exact(method):
    target = tiny_model("qwen2", seed=4)
    draft = perturbed_copy(target, 0.01)
    prompt = torch.tensor([[1, 5, 9, 5, 9, 5, 9, 13, 40]])
    expected = target.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
    with saguaro.SpeculativeGenerator(
        target, draft, method=method, num_speculative_tokens=5, placement="inline"
    ) as generator:
        # Plant costs that make speculation lose unless nearly every draft is accepted (kept as
        # planted: the tiny model's real timings do not blend in): the controller must switch it
        # off, probing now and then (saguaro's worker then catches up); the output must not change.
        generator.policy.lookahead.verify.smoothing = 0.0
        for t in range(1, 7):
            generator.policy.lookahead.verify.observe(t, 1.0 + 0.9 * (t - 1))
        out = generator.generate(prompt, max_new_tokens=40, eos_token_id=[], return_dict_in_generate=True)
    assert out.sequences.tolist() == expected.tolist()
    drafted = [r["drafted"] for r in out.stats.round_log]
    assert len(drafted) == out.stats.rounds
    # Every round is a plain target step, the first included (saguaro's worker is not even told of
    # the sequence), except one probe after 16 of them, which drafts (the worker starts from there).
    assert drafted[0] == 0 and max(drafted[15:17]) > 0 and sum(d > 0 for d in drafted) == 1
    assert all(r["verify_seconds"] > 0 for r in out.stats.round_log)


def test_probes_back_off_while_speculation_keeps_losing():
    controller = LookaheadController(4, probe_every=4)
    for t in range(1, 6):
        controller.verify.observe(t, 1.0 + 0.5 * (t - 1))  # drafts would pay if nearly all accepted
    controller.observe(4, 0, 3.0, 0.4)  # but the first was rejected
    probes = [i for i in range(200) if controller.choose(4) > 0]
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert probes[0] == 3 and gaps == [8, 16, 32, 64][: len(gaps)] and len(probes) >= 4


def test_no_frequent_probes_where_even_accepted_drafts_cannot_pay():
    controller = LookaheadController(4, probe_every=4)
    for t in range(1, 6):
        controller.verify.observe(t, float(t))  # verifying T tokens costs T steps: never worth it
    controller.observe(4, 4, 5.0, 0.4)
    probes = [i for i in range(800) if controller.choose(4) > 0]
    # The probe due after 4 rounds is skipped; one in 256 rounds checks whether the cost changed.
    assert probes == [3 + 256, 3 + 2 * 256, 3 + 3 * 256]


def test_seeded_controller_starts_from_timed_costs():
    # Verifying T tokens timed at T steps (a CPU without native bf16): no draft even at first.
    costly = LookaheadController(4)
    assert costly.seed({1: 1.0, 5: 5.0}) and costly.choose(4) == 0
    # Timed nearly flat (native bf16, a GPU): not seeded, the first round drafts the full length.
    cheap = LookaheadController(4)
    assert not cheap.seed({1: 1.0, 5: 1.1}) and not cheap.verify and cheap.choose(4) == 4
    # At a typical acceptance (0.7), a 7-token verification at 5.8 steps pays for no draft, though
    # 7 tokens all accepted would.
    typical = LookaheadController(6)
    assert not typical.seed({1: 1.0, 7: 5.8}) and typical.seed({1: 1.0, 7: 5.8}, acceptance=0.7)
    assert not LookaheadController(6).seed({1: 1.0, 7: 2.0}, acceptance=0.7)  # native bf16, two cores
    # Seeded so, it probes as rarely as where not even all-accepted drafts would pay.
    first_probe = next(i for i in range(1000) if typical.choose(6))
    assert first_probe > 256
    # Rounds blend into a seed like any measurement; a later seed only fills in lengths not yet known.
    costly.observe(0, 0, 0.5, 0.0)
    blended = costly.verify.points[1]
    assert 0.5 < blended < 1.0
    assert costly.seed({1: 1.0, 3: 3.0})
    assert costly.verify.points[1] == blended and costly.verify.points[3] == 3.0


def test_saguaro_starts_with_plain_steps_where_timed_verification_costs_k_steps(monkeypatch):
    target = tiny_model("llama", seed=0)
    timed = auto.Calibration(*(CostCurve({1: 1.0, 5: 5.0}) for _ in range(4)))
    monkeypatch.setattr(auto, "calibrate", lambda *args: timed)
    prompt = torch.tensor([[1, 17, 33, 5, 80, 42, 9, 64, 23]])
    with saguaro.SpeculativeGenerator(
        target, perturbed_copy(target, 0.005), method="saguaro", placement="process"
    ) as generator:
        out = generator.generate(prompt, max_new_tokens=12, eos_token_id=[], return_dict_in_generate=True)
    assert (
        out.sequences.tolist()
        == target.generate(
            prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        ).tolist()
    )
    assert out.stats.drafted == 0 and out.stats.rounds == 11


def test_the_controller_probes_one_deeper_so_stale_acceptance_cannot_hold_k_down():
    controller = LookaheadController(4, "per_token")
    for _ in range(6):  # early text: only the first draft is ever accepted
        controller.observe(4, 1, 0.15 + 0.03 * 4, 0.04)
    for _ in range(6):
        controller.observe(1, 1, 0.18, 0.01)
        controller.observe(0, 0, 0.15, 0.0)
    assert controller.choose(4) == 1
    chosen = []
    for _ in range(96):  # the text turns predictable: every draft is accepted from now on
        k = controller.choose(4)
        chosen.append(k)
        controller.observe(k, k, 0.15 + 0.03 * k, 0.01 * k)
    assert 2 in chosen[: controller.probe_every]  # the first probe comes within probe_every rounds
    assert chosen[-1] >= 3  # acceptance measured deeper, so K grew to where it pays


def test_a_first_draft_after_a_prefill_is_not_taken_for_a_usual_rounds_drafting(monkeypatch):
    # A call's first draft also fed the prompt to the drafter (and one after plain steps, the tokens
    # it lacked). Counted as a round's drafting, such a wait turned speculation off for good on the
    # demo pair (Saguaro drafting 6 deep, one thread each): a plain step looked cheaper than any draft.
    seen = []
    real_observe = LookaheadController.observe

    def observe(self, drafted, accepted, verify_seconds, draft_seconds):
        seen.append(draft_seconds)
        return real_observe(self, drafted, accepted, verify_seconds, draft_seconds)

    monkeypatch.setattr(LookaheadController, "observe", observe)
    target = tiny_model("llama", seed=0)
    prompt = torch.tensor([[1, 17, 33, 5, 80, 42, 9, 64, 23]])
    draft = perturbed_copy(target, 0.005)
    saguaro.generate(
        target, prompt, draft_model=draft, method="speculative", max_new_tokens=20, eos_token_id=[]
    )
    # Rounds that follow a drafted one are usual rounds (plain steps have no drafting to count).
    assert seen[0] is None and any(wait is not None for wait in seen[1:])
