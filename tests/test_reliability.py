"""Failure modes that must cost speed or give a clear error, never a crash or a wrong answer (issue 31)."""

import os
import signal
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch
from conftest import perturbed_copy, tiny_model
from transformers import StoppingCriteria

import saguaro
from saguaro import distributed
from saguaro.draft.stream import Reset
from saguaro.ssd.prespeculation import PreSpeculator
from saguaro.ssd.worker import DraftWorker, WorkerFailed

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


def test_options_that_would_fail_later_are_rejected_when_the_generator_is_built(pair):
    target, draft = pair

    def build(method="saguaro", **options):
        return saguaro.SpeculativeGenerator(target, draft, method=method, **options)

    # inf reached the worker's waits, which raised OverflowError on every call.
    for timeout in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="worker_timeout .* must be a finite number"):
            build(worker_timeout=timeout)
    with pytest.raises(ValueError, match="num_speculative_tokens must be a positive int, got True"):
        build(num_speculative_tokens=True)
    for method in ("tree", "auto"):  # auto may choose the tree
        for branching in ((2, True), 2, "22"):
            with pytest.raises(ValueError, match="tree_branching must be"):
                build(method, tree_branching=branching)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="draft_device='cuda' but CUDA is not available"):
            build(draft_device="cuda")
    with pytest.raises(ValueError, match="draft_device='meta' but draft_model is on cpu"):
        build(draft_device="meta")
    with pytest.raises(ValueError, match="draft_device='gpu0' is not a device"):
        build(draft_device="gpu0")
    assert build(worker_timeout=3600.0, draft_device="cpu").options.worker_timeout == 3600.0


def test_prompt_ids_outside_the_vocabulary_are_rejected_not_fed_as_id_0(pair):
    target, draft = pair
    for method in ("speculative", "autoregressive"):
        for bad in (150, 96, -1):
            with pytest.raises(ValueError, match=f"token id {bad}, outside the target's 96-token vocabulary"):
                saguaro.generate(target, torch.tensor([[1, 17, bad, 5]]), draft, method=method)
    # Padding is not fed, so whatever it holds is not checked; the last id of the vocabulary is fine.
    out = saguaro.generate(
        target, torch.tensor([[-7, 1, 95]]), draft, attention_mask=torch.tensor([[0, 1, 1]]), max_new_tokens=2
    )
    assert out.shape == (1, 5)


def test_a_wrong_shaped_attention_mask_names_the_argument_and_both_shapes(pair):
    target, draft = pair
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 3\) but input_ids \(1, 4\)"):
        saguaro.generate(target, PROMPT, draft, attention_mask=torch.ones(1, 3, dtype=torch.long))


ORPHAN_SCRIPT = """
import os, signal, sys, time
sys.path.insert(0, {tests!r})
from conftest import perturbed_copy, tiny_model
import saguaro
target = tiny_model("llama", seed=0)
draft = perturbed_copy(target, 0.02)
generator = saguaro.SpeculativeGenerator(target, draft, method="saguaro", placement="process")
generator.generate([[1, 17, 50, 5]], max_new_tokens=8)
print(generator.drafts.worker._process.pid, flush=True)
if {how!r} == "exit":
    os._exit(0)  # no atexit, no finalizers: the worker is never told to stop
time.sleep(120)  # the test SIGKILLs this process
"""


def _running(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for init to reap it has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads process states from /proc")
@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_the_worker_process_exits_soon_after_its_program_dies_abruptly(how):
    # The forked worker held both ends of its pipe, so it never saw EOF: it lived on with parent 1.
    script = ORPHAN_SCRIPT.format(tests=os.path.dirname(__file__), how=how)
    program = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        worker = int(program.stdout.readline())
        if how == "sigkill":
            program.send_signal(signal.SIGKILL)
        program.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _running(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(worker), f"the drafter worker {worker} outlived its program"
    finally:
        program.kill()
        program.wait()
        if worker is not None and _running(worker):
            os.kill(worker, signal.SIGKILL)


@pytest.mark.parametrize(
    "placement, fate",
    [("process", "it was killed"), ("thread", "a thread cannot be killed: it is left running")],
)
def test_a_stalled_worker_is_reported_as_stalled_with_what_became_of_it(pair, monkeypatch, placement, fate):
    target, draft = pair
    here = os.getpid()
    real_reset = PreSpeculator.reset

    def stalled_reset(self, *args):
        if os.getpid() != here or threading.current_thread() is not threading.main_thread():
            time.sleep(3)  # the worker stalls; the inline drafter (here) does not
        return real_reset(self, *args)

    monkeypatch.setattr(PreSpeculator, "reset", stalled_reset)
    expected = target.generate(PROMPT, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    with saguaro.SpeculativeGenerator(
        target, draft, method="saguaro", placement=placement, worker_timeout=0.5
    ) as generator:
        with pytest.warns(saguaro.SaguaroWarning, match=f"stalled: no answer within 0.5s; {fate}"):
            out = generator.generate(PROMPT, max_new_tokens=10, eos_token_id=[])
    assert out.tolist() == expected.tolist()


def test_a_stalled_drafter_rank_is_reported_unresponsive_not_killed(pair, monkeypatch):
    # The rank is another process on another host, maybe: nothing here kills it.
    class SilentRank:
        last_seq, failed = 0, False

        def send(self, message):
            pass

        def poll(self, timeout):
            time.sleep(timeout)
            return False

        def close(self):
            pass

    monkeypatch.setattr(distributed, "claim_drafter_rank", lambda worker: SilentRank())
    worker = DraftWorker(pair[1], "rank", timeout=0.2, lookahead=3, vocab_size=96)
    with pytest.raises(WorkerFailed, match="stalled: .* the drafter rank is unresponsive, not killed"):
        worker.end(worker.begin(Reset([1, 17, 50, 5], 3, True)))
    assert not worker.concurrent  # drafting inline from now on


class ScoresSeen(StoppingCriteria):
    """Records the `scores` each call gets; stops after the 3rd new token."""

    def __init__(self, prompt_length: int):
        self.prompt_length, self.seen = prompt_length, []

    def __call__(self, input_ids, scores, **kwargs):
        self.seen.append(scores if scores is None else type(scores).__name__)
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.prompt_length + 3)


def test_a_stopping_criterion_gets_the_scores_hf_gives_it(pair):
    # HF's sampling loop passes scores=None to stopping criteria unless output_scores=True (then the
    # tuple of every step's scores, a call saguaro leaves to HF): a criterion reading scores.softmax
    # fails under HF alike, and one that checks for None works under both.
    target, draft = pair
    expected = ScoresSeen(PROMPT.shape[1])
    hf_out = target.generate(PROMPT, max_new_tokens=10, stopping_criteria=[expected], pad_token_id=0)
    with saguaro.enable(target, draft_model=draft, method="speculative"):
        seen = ScoresSeen(PROMPT.shape[1])
        out = target.generate(PROMPT, max_new_tokens=10, stopping_criteria=[seen], pad_token_id=0)
        assert out.tolist() == hf_out.tolist() and out.shape[1] == PROMPT.shape[1] + 3
        assert set(seen.seen) == set(expected.seen) == {None}
        with pytest.warns(saguaro.SaguaroWarning, match="output_scores=True"):
            scored = ScoresSeen(PROMPT.shape[1])
            target.generate(
                PROMPT,
                max_new_tokens=10,
                stopping_criteria=[scored],
                pad_token_id=0,
                output_scores=True,
                return_dict_in_generate=True,
            )
        assert set(scored.seen) == {"tuple"}  # HF served it, as HF does


@pytest.mark.parametrize("method", ["speculative", "saguaro", "tree"])
def test_a_draft_with_nan_probabilities_costs_speed_not_the_answer(pair, method):
    # Sampling drew from the draft's NaN q: "probability tensor contains either inf, nan or element < 0".
    target, _ = pair
    broken = perturbed_copy(target, 0.02)
    with torch.no_grad():
        broken.lm_head.weight[:] = float("nan")
    expected = target.generate(PROMPT, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    with saguaro.SpeculativeGenerator(
        target, broken, method=method, speculation_schedule="constant", draft_quantization=None
    ) as generator:
        for _ in range(2):  # the Saguaro worker survives the first call and serves the second
            with pytest.warns(saguaro.SaguaroWarning, match="probabilities are not finite") as caught:
                sampled = generator.generate(
                    PROMPT, max_new_tokens=12, do_sample=True, eos_token_id=[], return_dict_in_generate=True
                )
            assert len([w for w in caught if "not finite" in str(w.message)]) == 1  # once per call
            assert sampled.sequences.shape == (1, PROMPT.shape[1] + 12)
            assert sampled.stats.drafted == 0 and sampled.stats.worker_failures == 0
        with pytest.warns(saguaro.SaguaroWarning, match="probabilities are not finite"):
            greedy = generator.generate(PROMPT, max_new_tokens=12, eos_token_id=[])
            # A batch too: plain batched steps once the draft is found broken.
            batch = generator.generate(
                torch.cat([PROMPT, PROMPT]), max_new_tokens=12, do_sample=True, eos_token_id=[]
            )
        assert greedy.tolist() == expected.tolist()
        assert batch.shape == (2, PROMPT.shape[1] + 12)
        if method == "saguaro":
            assert generator.drafts.worker.concurrent and generator.drafts.worker.failures == 0
