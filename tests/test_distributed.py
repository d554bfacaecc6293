"""A tensor-parallel target (2 ranks, transformers' tp_plan) with the drafter on a third rank, on CPU
over gloo: greedy equals the unsharded target's own greedy generate, sampling with a different
seed per rank gives one agreed output, a chi-square test (which fails on a planted bug), and no
process left behind, even after the drafter rank is killed; a target rank that dies or stops
(SIGSTOP) mid-call makes rank 0 raise DistributedFailure, never hang. The ranks run tests/tp_ranks.py.
"""

import os
import time

import pytest
import torch
import torch.multiprocessing as mp
import tp_ranks
from conftest import perturbed_copy, tiny_model
from stats_helpers import chi_square_pvalue, reference_probs

from saguaro import distributed

PASS_P, FAIL_P = 1e-3, 1e-6
SCENARIO = {"llama": "lifecycle", "qwen2": "dead_target_rank"}  # the fault checks need one architecture each


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def run(request, tmp_path_factory):
    """(unsharded target, what each rank saved, exit codes) for one architecture."""
    models = tmp_path_factory.mktemp(request.param)
    target = tiny_model(request.param, seed=0)
    target.save_pretrained(models / "target")
    perturbed_copy(target, 0.003).save_pretrained(models / "draft")  # agrees often, not always
    saved, codes = tp_ranks.launch(SCENARIO[request.param], str(models))
    for rank, result in enumerate(saved):
        assert result is not None and "error" not in result, f"rank {rank}: {result and result.get('error')}"
    return request.param, target, saved, codes


def _hf_greedy(target, new_tokens: int) -> list[int]:
    ids = torch.tensor([tp_ranks.PROMPT])
    return target.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)[0].tolist()


@pytest.mark.parametrize("method", ["speculative", "tree", "saguaro"])
def test_tensor_parallel_greedy_equals_unsharded_greedy(run, method):
    _, target, saved, _ = run
    expected = _hf_greedy(target, 24)
    leader, follower = saved[0][f"greedy_{method}"], saved[1][f"greedy_{method}"]
    assert leader["sequence"] == follower["sequence"] == expected
    # Speculation really ran on the leader: drafts proposed, some accepted, some rejected.
    assert 0 < leader["accepted"] < leader["drafted"]
    if method == "saguaro":
        assert leader["hits"] > 0  # the drafter rank pre-speculated while the target ranks verified


@pytest.mark.parametrize("method", ["speculative", "saguaro"])
def test_sampling_with_a_seed_per_rank_agrees_on_every_rank(run, method):
    _, target, saved, _ = run
    assert saved[0][f"sampled_{method}"] == saved[1][f"sampled_{method}"]
    assert saved[0][f"sampled_{method}"] != _hf_greedy(target, 24)  # really sampled


def test_drop_in_and_repeated_calls_on_a_tensor_parallel_target(run):
    arch, target, saved, _ = run
    if arch != "llama":
        pytest.skip("the lifecycle scenario runs on one architecture")
    assert saved[0]["enabled"] == saved[1]["enabled"] == _hf_greedy(target, 24)
    expected = _hf_greedy(target, 8)
    assert saved[0]["repeated"] == saved[1]["repeated"] == [expected] * 20


def test_killed_drafter_rank_falls_back_inline_and_no_process_is_left(run):
    arch, target, saved, codes = run
    if arch != "llama":
        pytest.skip("the lifecycle scenario runs on one architecture")
    assert saved[0]["after_kill"]["sequence"] == saved[1]["after_kill"]["sequence"] == _hf_greedy(target, 24)
    assert saved[0]["after_kill_failures"] == 1 and saved[0]["after_kill"]["accepted"] > 0
    assert codes[:2] == [0, 0] and codes[2] == -9  # target ranks exited cleanly; the drafter was killed
    assert not mp.active_children()
    assert not any(_alive(result["pid"]) for result in saved)


def test_dead_target_rank_gives_a_clear_error_not_a_hang(run):
    arch, _, saved, codes = run
    if arch != "qwen2":
        pytest.skip("the dead_target_rank scenario runs on one architecture")
    assert "a target rank is gone" in saved[0]["dead_target_error"]
    assert saved[0]["dead_target_seconds"] < 30  # well within the 30 s collective timeout, or at it
    # The leader and the drafter rank still exit cleanly; the killed rank is gone.
    assert codes == [0, -9, 0] and saved[2].get("served")
    assert not mp.active_children()
    assert not any(_alive(result["pid"]) for result in saved)


def test_stalled_target_rank_mid_call_raises_within_the_timeout_not_a_hang(tmp_path):
    # A rank that stops (SIGSTOP) inside a forward leaves rank 0 in the model's own all-reduce, which
    # is bounded only by the timeout of the mesh's process groups (transformers' tensor parallelism).
    target = tiny_model("llama", seed=0, hidden=16)
    target.save_pretrained(tmp_path / "target")
    perturbed_copy(target, 0.003).save_pretrained(tmp_path / "draft")
    timeout = tp_ranks.COLLECTIVE_TIMEOUT["stalled_target_rank"]
    start = time.monotonic()
    saved, codes = tp_ranks.launch("stalled_target_rank", str(tmp_path), timeout=60 + 4 * timeout)
    elapsed = time.monotonic() - start
    leader = saved[0]
    assert leader is not None, f"rank 0 hung and was killed after {elapsed:.0f}s; exit codes {codes}"
    assert "error" not in leader, leader["error"]
    error = leader["stall_error"]
    assert error is not None and "rank 1" in error and "stopped" in error, error
    # Raised about the timeout after rank 1 stopped, not after torch's default of 30 min.
    assert timeout - 0.5 < leader["failed_at"] - saved[1]["stopped_at"] < timeout + 5
    # Resumed, rank 1 learns its call failed; every rank exits by itself, none is left behind.
    assert saved[1] is not None and saved[1].get("stall_error"), saved[1]
    assert codes == [0, 0, 0], (codes, [s and s.get("error") for s in saved])
    assert not mp.active_children()
    assert not any(_alive(pid) for pid in leader["pids"])


def test_a_failure_says_which_rank_is_stopped_or_gone():
    import signal
    import socket
    import subprocess

    child = subprocess.Popen(["sleep", "60"])
    try:
        host = socket.gethostname()
        topology = distributed.Topology([0, 1, 2], None, 5.0, None, None, processes=[(host, os.getpid())] * 2)
        topology.processes.append((host, child.pid))
        assert topology.describe([1]) == f"rank 1 (pid {os.getpid()}, running)"
        os.kill(child.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10  # the signal is delivered asynchronously
        while "running" in (child_state := topology.describe([2])) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert child_state.startswith(f"rank 2 (pid {child.pid}, stopped") and "kill -CONT" in child_state
        child.kill()
        child.wait()
        assert (
            topology.describe([1, 2])
            == f"rank 1 (pid {os.getpid()}, running) or rank 2 (pid {child.pid}, gone)"
        )
        topology.processes[1] = ("another-host", 7)
        assert topology.describe([1, 3]) == "rank 1 (pid 7 on another-host) or rank 3"
    finally:
        child.kill()
        child.wait()


def _exact_first_two(target) -> torch.Tensor:
    """The target's exact joint probability of the first two sampled tokens, [V, V]."""
    vocab = target.config.vocab_size
    with torch.no_grad():
        first = reference_probs(target(torch.tensor([tp_ranks.CHI_PROMPT])).logits[0, -1])
        nexts = torch.tensor([tp_ranks.CHI_PROMPT + [t] for t in range(vocab)])
        second = reference_probs(target(nexts).logits[:, -1])
    return first[:, None] * second


def test_tensor_parallel_sampling_matches_target_distribution(tmp_path):
    # Peaked, clearly different target and draft: drafts are often rejected (as in test_sampling_exact).
    target = tiny_model("llama", seed=0, vocab=6, layers=1, hidden=16, init=0.6)
    target.save_pretrained(tmp_path / "target")
    tiny_model("llama", seed=5, vocab=6, layers=1, hidden=16, init=0.6).save_pretrained(tmp_path / "draft")
    saved, codes = tp_ranks.launch("chi_square", str(tmp_path))
    assert codes == [0, 0, 0], [s and s.get("error") for s in saved]
    exact = _exact_first_two(target)
    assert torch.equal(saved[0]["counts"], saved[1]["counts"])
    assert chi_square_pvalue(saved[0]["counts"], exact) > PASS_P
    # The same test fails when drafts are not drawn from the q verification divides by.
    assert chi_square_pvalue(saved[0]["planted_counts"], exact) < FAIL_P


def test_init_rejects_a_bad_rank_count():
    with pytest.raises(ValueError, match="tp"):
        distributed.init(tp=0)


def test_auto_choices_settle_untimed_on_a_tensor_parallel_target():
    with_drafter = distributed.Topology([0, 1], 2, 30.0, None, None)
    without = distributed.Topology([0, 1], None, 30.0, None, None)
    assert distributed.settle_options(with_drafter, "auto", True, None, "auto", "auto") == (
        "saguaro",
        "rank",
        None,
        None,
    )
    assert distributed.settle_options(without, "auto", True, None, "auto", 32) == (
        "speculative",
        None,
        None,
        32,
    )
    assert distributed.settle_options(without, "auto", False, None, None, None)[0] == "prompt_lookup"
    assert distributed.settle_options(with_drafter, "tree", True, "thread", "int8", None) == (
        "tree",
        "thread",
        "int8",
        None,
    )


def test_tp_flag_must_be_positive():
    from saguaro import cli

    with pytest.raises(SystemExit):
        cli.main(["generate", "hello", "--target", "t", "--tp", "0"])


def test_rank_placement_without_a_drafter_rank_is_refused():
    import saguaro

    target = tiny_model("llama", seed=0)
    with pytest.raises(ValueError, match="drafter_rank=True"):
        saguaro.SpeculativeGenerator(
            target, perturbed_copy(target, 0.003), method="saguaro", placement="rank"
        )
