"""method="auto": the cost model's choice from measured step costs, and exact output whatever it picks."""

import pytest
import torch
from conftest import perturbed_copy, tiny_model

import saguaro
from saguaro.model.placement import ThreadSplit
from saguaro.tune import auto
from saguaro.tune.cost_model import CostCurve

PROMPT = torch.tensor([[1, 17, 33, 5, 80, 42, 9, 64, 23]])
pytestmark = pytest.mark.timeout(180)


def calibration(verify_growth: float, draft_step: float, beside_slowdown: float = 1.5) -> auto.Calibration:
    """Step costs of a made-up machine: a target step of 100 ms growing by `verify_growth` per
    extra token, a draft step of `draft_step` seconds (batched branches cost 1.2x)."""
    target = CostCurve({1: 0.1, 5: 0.1 * (1 + 4 * verify_growth)})
    beside = CostCurve({t: s * beside_slowdown for t, s in target.points.items()})
    draft = CostCurve({1: draft_step, 2: draft_step * 1.05, 4: draft_step * 1.1, 15: draft_step * 1.2})
    return auto.Calibration(target, beside, draft, draft)


def test_speculation_is_chosen_only_where_verification_is_cheap():
    cheap = auto.predict(calibration(0.03, 0.03), 4, [2, 2, 1, 1], 0.8, 0.8, concurrent=False)
    assert max(cheap, key=cheap.get) in ("speculative", "tree") and "saguaro" not in cheap
    assert cheap["speculative"] > 1.3 * cheap["autoregressive"]
    costly = auto.predict(calibration(1.0, 0.03), 4, [2, 2, 1, 1], 0.8, 0.8, concurrent=False)
    assert max(costly, key=costly.get) == "autoregressive"  # verifying T tokens costs T steps


def test_saguaro_is_chosen_where_the_drafter_runs_beside_the_target_for_little():
    # A spare core: the target is not slowed beside the drafter, and drafting is expensive.
    spare = auto.predict(calibration(0.03, 0.06, beside_slowdown=1.0), 4, None, 0.8, 0.9, concurrent=True)
    assert max(spare, key=spare.get) == "saguaro"
    # Two busy cores: the target runs 1.5x slower beside the drafter and drafts are cheap.
    busy = auto.predict(calibration(0.03, 0.01, beside_slowdown=1.5), 4, None, 0.8, 0.9, concurrent=True)
    assert max(busy, key=busy.get) != "saguaro"


def test_auto_is_exact_and_says_what_it_chose(monkeypatch):
    # A machine where speculation pays (tiny models themselves sit in the overhead regime).
    monkeypatch.setattr(auto, "calibrate", lambda *args: calibration(0.03, 0.01))
    target = tiny_model("llama", seed=0)
    expected = target.generate(PROMPT, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
    with saguaro.SpeculativeGenerator(target, perturbed_copy(target, 0.005), method="auto") as generator:
        for _ in range(2):  # the second call chooses again, with the acceptance the first measured
            out = generator.generate(PROMPT, max_new_tokens=30, eos_token_id=[], return_dict_in_generate=True)
            assert out.sequences.tolist() == expected.tolist()
            choice = generator.auto_choice
            assert choice.method == generator.method == out.stats.method
            assert choice.method == max(
                choice.predicted_tokens_per_second, key=choice.predicted_tokens_per_second.get
            )
        assert generator.method != "autoregressive" and generator.policy.counts[0] > 0  # acceptance measured


def test_calibration_is_measured_once_per_model_pair():
    target, draft = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    split = ThreadSplit(2, 1)
    first = auto.calibrate(target, draft, 4, split)
    assert auto.calibrate(target, draft, 4, split) is first
    assert first.target_alone(1) > 0 and first.draft_beside(15) > 0


def test_a_trees_verification_is_timed_at_its_size(monkeypatch):
    # A machine whose verify cost steps up past the chain's width: 100 ms up to 5 tokens, 160 ms at
    # 15 (the tree [2, 2, 1, 1] and its root). Extrapolated from 1 and 5 tokens the tree looks as
    # cheap as the chain and wins; timed at its size, speculative does.
    def timed(model, tokens, threads, compiled=False):
        steps = {1: 0.1, 2: 0.1, 5: 0.1, 15: 0.16} if model is target else {1: 0.01, 2: 0.0105, 4: 0.011}
        return CostCurve({t: steps.get(t, 0.012) for t in tokens})

    monkeypatch.setattr(auto, "_timed", timed)
    target, draft = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    choice = auto.choose(target, draft, 4, [2, 2, 1, 1], ThreadSplit(2, 0), False, 0.8, 0.8)
    calibration = auto.calibrate(target, draft, 4, ThreadSplit(2, 0))
    assert sorted(calibration.target_alone.points) == [1, 5, 15]
    assert choice.method == "speculative"
    del calibration.target_alone.points[15]
    extrapolated = auto.predict(calibration, 4, [2, 2, 1, 1], 0.8, 0.8, concurrent=False)
    assert max(extrapolated, key=extrapolated.get) == "tree"


def test_with_compile_each_model_is_timed_through_the_steps_it_runs(monkeypatch):
    # compile=True: the target (every method verifies on its compiled runner) and the chain drafter
    # of speculative run compiled graphs, and greedy decoding runs blocks; the tree drafter and the
    # Saguaro worker stay eager. Each prediction must come from the steps its method runs.
    timings = []

    def timed(model, tokens, threads, compiled=False):
        timings.append((model is target, compiled))
        step = (0.01 if compiled else 0.05) if model is target else (0.001 if compiled else 0.01)
        return CostCurve({t: step for t in tokens})

    monkeypatch.setattr(auto, "_timed", timed)
    monkeypatch.setattr(auto, "_timed_greedy", lambda model, threads: 0.002)
    target, draft = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    compiled = auto.calibrate(target, draft, 4, ThreadSplit(2, 1), compiled=True)
    # target alone, target beside: compiled; draft alone, draft beside: eager; draft chain: compiled
    assert timings == [(True, True), (True, True), (False, False), (False, False), (False, True)]
    eager = auto.calibrate(target, draft, 4, ThreadSplit(2, 1))
    assert eager is not compiled and eager.draft_chain is None and eager.greedy_token is None
    fast = auto.predict(compiled, 4, None, 0.8, 0.8, concurrent=True)
    slow = auto.predict(eager, 4, None, 0.8, 0.8, concurrent=True)
    assert fast["autoregressive"] == pytest.approx(500) and slow["autoregressive"] == pytest.approx(20)
    sampled = auto.predict(compiled, 4, None, 0.8, 0.8, concurrent=True, greedy=False)
    assert sampled["autoregressive"] == pytest.approx(100)  # one-token compiled steps: no blocks
    # Speculative drafts through the compiled chain (1 ms a step), saguaro's worker eagerly (10 ms).
    assert fast["speculative"] > 4 * slow["speculative"]
    assert fast["saguaro"] < 2 * slow["saguaro"]


def test_tree_rounds_count_a_rejection_only_where_the_path_stops_short(monkeypatch):
    # auto learns acceptance from every round; a tree round's accepted path can never be as long as
    # its node count, so the refusals counted are the rounds that stopped above the tree's depth.
    tree_wins = calibration(0.0, 0.01)
    tree_wins.target_alone.points[15] = 0.1
    monkeypatch.setattr(auto, "calibrate", lambda *args: tree_wins)
    target = tiny_model("llama", seed=0)
    draft = perturbed_copy(target, 0.005)
    constant = {"speculation_schedule": "constant"}  # every round drafts the whole tree
    with saguaro.SpeculativeGenerator(target, draft, method="auto", **constant) as generator:
        out = generator.generate(PROMPT, max_new_tokens=40, eos_token_id=[], return_dict_in_generate=True)
        assert generator.method == "tree"
    drafted = [r for r in out.stats.round_log if r["drafted"]]
    assert all(r["depth"] == 4 < r["drafted"] for r in drafted[:-1])  # the last may be cut short
    assert any(r["accepted"] == r["depth"] for r in drafted)  # full depth accepted: no refusal
    assert generator.policy.counts[1] == sum(r["accepted"] < r["depth"] for r in drafted) < len(drafted)
