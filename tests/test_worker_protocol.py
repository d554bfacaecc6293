"""The Saguaro worker protocol: numbered requests that cannot desynchronise, faults that come back
visible, restarts, interruptible pre-speculation, and the pure pieces of ssd/outcomes.py."""

import logging
import multiprocessing
import os
import signal
import threading
import time

import pytest
import torch
from conftest import perturbed_copy, slow_verification, tiny_model
from test_saguaro import PROMPT, hf_greedy, saguaro_generator, worker_process

import saguaro
from saguaro.decode.sampling import SamplingConfig
from saguaro.draft.stream import DraftSource, Reset, Resolve
from saguaro.model.placement import ThreadSplit
from saguaro.ssd import prespeculation
from saguaro.ssd.outcomes import (
    SpeculationCache,
    branch_node,
    draft_confidence,
    predict_outcomes,
    saguaro_reshape,
)
from saguaro.ssd.prespeculation import PreSpeculator

pytestmark = pytest.mark.timeout(180)


def run(generator, tokens=40):
    return generator.generate(PROMPT, max_new_tokens=tokens, eos_token_id=[], return_dict_in_generate=True)


def test_ctrl_c_mid_generation_leaves_the_worker_in_step(monkeypatch):
    slow_verification(monkeypatch)  # pre-speculation always completes: hits are deterministic
    target = tiny_model("llama", seed=0)
    with saguaro_generator(target) as generator:
        before = run(generator)
        worker = generator.drafts.worker
        connection = worker._conn

        class CtrlCWhileWaiting:  # Ctrl-C lands while the generator waits for the worker's answer
            polls = 0

            def __getattr__(self, name):
                return getattr(connection, name)

            def poll(self, *args):
                self.polls += 1
                if self.polls == 4:
                    raise KeyboardInterrupt
                return connection.poll(*args)

        worker._conn = CtrlCWhileWaiting()
        with pytest.raises(KeyboardInterrupt):
            run(generator)
        worker._conn = connection
        after = run(generator)
        process = worker_process(generator)
    # The interrupted request's answer was still queued; read as the next answer it would have
    # desynchronised every later call (drafts for the wrong sequence, acceptance near zero).
    assert after.sequences.tolist() == before.sequences.tolist() == hf_greedy(target, 40)
    # In step, acceptance and hits are as before, give or take a round: which outcomes miss, and
    # how long a miss's backup drafts, follow the branch budget and measured times.
    assert before.stats.accepted > 0 and after.stats.accepted >= before.stats.accepted - 2
    assert before.stats.hits > 0 and after.stats.hits >= before.stats.hits - 1
    assert after.stats.worker_failures == 0 and not process.is_alive()


def test_a_worker_exception_comes_back_visible_and_the_worker_restarts(monkeypatch, caplog):
    target = tiny_model("llama", seed=0)
    real_resolve = PreSpeculator.resolve
    calls, parent = [], os.getpid()

    def resolve_failing_once(self, *args):
        calls.append(1)
        if os.getpid() != parent and len(calls) == 3:  # the forked worker's third resolve
            raise IndexError("planted drafter bug")
        return real_resolve(self, *args)

    monkeypatch.setattr(prespeculation.PreSpeculator, "resolve", resolve_failing_once)
    with saguaro_generator(target) as generator:
        first = worker_process(generator) if generator.drafts.worker else None
        assert first is None  # started lazily, on the first call
        with caplog.at_level(logging.WARNING, logger="saguaro"), pytest.warns(Warning) as warned:
            out = run(generator)
        crashed = worker_process(generator)
        assert crashed is None  # killed at once, not left to linger
        monkeypatch.setattr(prespeculation.PreSpeculator, "resolve", real_resolve)
        again = run(generator)  # the next call starts a fresh worker
        restarted = worker_process(generator)
        assert restarted is not None and restarted.is_alive()
        assert generator.drafts.worker.restarts == 1
    assert out.sequences.tolist() == again.sequences.tolist() == hf_greedy(target, 40)
    assert out.stats.worker_failures == 1 and again.stats.worker_failures == 0
    assert again.stats.hits > 0  # pre-speculation is back
    text = " ".join(str(w.message) for w in warned)
    assert "IndexError: planted drafter bug" in text and "resolve_failing_once" in text  # the traceback
    assert any("planted drafter bug" in record.getMessage() for record in caplog.records)
    assert multiprocessing.active_children() == []


def test_a_stalled_worker_is_killed_at_its_timeout_not_waited_on():
    target = tiny_model("llama", seed=0)
    with saguaro_generator(target, worker_timeout=1.0) as generator:
        run(generator, 5)
        stalled = worker_process(generator)
        os.kill(stalled.pid, signal.SIGSTOP)
        with pytest.warns(Warning, match="stalled"):
            out = run(generator, 30)
        # Killed when the timeout ran out, before the call went on inline.
        assert not stalled.is_alive()
    assert out.sequences.tolist() == hf_greedy(target, 30) and out.stats.worker_failures == 1


def test_backoff_grows_with_repeated_failures():
    target = tiny_model("llama", seed=0)
    worker = saguaro.ssd.worker.DraftWorker(target, "thread", lookahead=2)
    try:
        for failures, skipped in [(1, 0), (2, 1), (3, 3)]:
            worker._fail("planted")
            assert worker.failures == failures and not worker.concurrent
            assert [worker.heal() for _ in range(skipped + 1)] == [False] * skipped + [True]
            assert worker.concurrent
    finally:
        worker.close()


def prepared_speculator(target, steps_before_outcome: int | None):
    speculator = PreSpeculator(
        perturbed_copy(target, 0.005), lookahead=4, vocab_size=target.config.vocab_size
    )
    speculator.reset(PROMPT[0].tolist(), SamplingConfig(), seed=0)
    polls = []

    def outcome_arrived():
        polls.append(1)
        return steps_before_outcome is not None and len(polls) > steps_before_outcome + 1

    speculator.prespeculate(outcome_arrived)
    return speculator


def test_an_outcome_mid_prespeculation_is_answered_from_the_steps_done():
    target = tiny_model("llama", seed=0)
    full = prepared_speculator(target, None)
    assert full.prespeculation_finished and full._cache.steps == 4
    cut = prepared_speculator(target, 2)  # the outcome arrives after two of the four steps
    assert not cut.prespeculation_finished and cut._cache.steps == 2
    # Same branches, as far as they got.
    outcome = next(iter(full._cache.outcomes))
    branch = full._cache.outcomes[outcome]
    assert cut._cache.tokens[branch] == full._cache.tokens[branch][:2]
    draft = cut.resolve(*outcome, verify_seconds=0.01)
    assert draft.source == DraftSource.CACHE and draft.tokens == full._cache.tokens[branch][:2]
    # The kept KV is the committed sequence plus the branch's fed guess and b_1.
    assert cut.runner.length == len(cut.committed) + 1


def test_an_outcome_before_any_step_is_a_miss_with_a_backup_draft():
    target = tiny_model("llama", seed=0)
    cut = prepared_speculator(target, 0)
    assert cut._cache.steps == 0
    outcome = next(iter(cut._cache.outcomes))
    draft = cut.resolve(*outcome, verify_seconds=0.01)
    assert draft.source in (DraftSource.MODEL, DraftSource.LOOKUP) and len(draft.tokens) > 0


def test_a_deep_enough_hit_is_answered_mid_step(monkeypatch):
    # The worker's second (last) pre-speculation step is held twice: before its first layer until
    # the outcome is sent, and after its last layer until the test has the answer (10 s at most).
    # An outcome hitting a branch of one token, asked for one, must be answered in between:
    # between the step's layers, not after the step.
    model = tiny_model("llama", seed=0)
    speculators, held = [], {}
    in_step_two, sent, answered = threading.Event(), threading.Event(), threading.Event()
    real_prespeculate = PreSpeculator.prespeculate

    def recorded(self, outcome_arrived):
        speculators.append(self)
        held["on"] = True
        try:
            real_prespeculate(self, outcome_arrived)
        finally:
            held["on"] = False

    def step_two() -> bool:
        return held.get("on") and speculators[-1]._cache.steps == 1

    def until_sent(module, args):
        if step_two():
            in_step_two.set()
            sent.wait(10)

    def until_answered(module, args, output):
        if step_two():
            held["timed_out"] = not answered.wait(10)

    monkeypatch.setattr(PreSpeculator, "prespeculate", recorded)
    handles = [
        model.model.layers[0].register_forward_pre_hook(until_sent),
        model.model.layers[-1].register_forward_hook(until_answered),
    ]
    worker = saguaro.ssd.worker.DraftWorker(model, "thread", lookahead=2)
    try:
        prompt = PROMPT[0].tolist()
        draft = worker.reset(prompt, 2)
        with torch.no_grad():
            bonus = int(model(torch.tensor([prompt + draft.tokens])).logits[0, -1].argmax())
        assert in_step_two.wait(10)
        ticket = worker.begin(Resolve(list(range(2)), bonus, 0.01, 1))  # all accepted, then the top
        sent.set()
        answer = worker.end(ticket)
        answered_mid_step = "timed_out" not in held
        answered.set()
        assert answered_mid_step and answer.source == DraftSource.CACHE and len(answer.tokens) == 1
        with torch.no_grad():
            expected = int(model(torch.tensor([prompt + draft.tokens + [bonus]])).logits[0, -1].argmax())
        assert answer.tokens == [expected]
        # The step then ended and resolve did the bookkeeping: the protocol goes on in step.
        assert worker.catch_up(prompt + draft.tokens + [bonus, expected], 2).tokens
        assert not held["timed_out"]
    finally:
        sent.set()
        answered.set()
        for handle in handles:
            handle.remove()
        worker.close()


@pytest.mark.parametrize(
    "counts, step_seconds, length",
    [((50, 50), 0.001, 4), ((1, 9), 0.05, 1)],
    ids=["cheap-steps-full-length", "dear-steps-rare-acceptance-one-token"],
)
def test_a_model_backup_drafts_the_length_that_pays(monkeypatch, counts, step_seconds, length):
    # The target waits for a backup step by step: at acceptance 0.5 and 1 ms steps beside a 100 ms
    # verification all K tokens pay; at acceptance 0.1 and 50 ms steps only the first does.
    monkeypatch.setattr(prespeculation, "lookup_continuation", lambda *args: [])  # no copied backup
    target = tiny_model("llama", seed=0)
    speculator = prepared_speculator(target, 0)  # no step ran: every outcome misses
    speculator.accepted_total, speculator.rejected_total = counts
    speculator.model_step_seconds = step_seconds
    draft = speculator.resolve(*next(iter(speculator._cache.outcomes)), verify_seconds=0.1)
    assert draft.source == DraftSource.MODEL and len(draft.tokens) == length


def test_predict_outcomes_excludes_the_draft_token():
    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.6, 0.1, 0.2, 0.1], [0.25] * 4])
    # d_1 = 1 and d_2 = 0 are never guessed as their position's correction, however likely.
    outcomes = predict_outcomes(probs, [1, 0], draft_confidence(probs, [1, 0]), [0.5, 0.5], budget=6)
    assert (0, 1) not in outcomes and (1, 0) not in outcomes and len(outcomes) == 6
    # k = 0 (chance 0.5): 2 takes 0.3 / 0.5 of the rest, 0 and 3 0.1 / 0.5 each; k = 1 (0.25): 2
    # takes 0.2 / 0.4; every other guess has chance 1/16.
    assert outcomes[:3] == [(0, 0), (0, 2), (0, 3)] and (1, 2) in outcomes


def test_saguaro_reshape_damps_the_top_tokens_and_stays_a_distribution():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    reshaped = saguaro_reshape(probs, top=2, c=0.5)
    assert torch.allclose(reshaped.sum(-1), torch.ones(1))
    assert reshaped[0, 0] < probs[0, 0] and reshaped[0, 3] > probs[0, 3]
    assert torch.equal(saguaro_reshape(probs, top=2, c=1.0), probs)


def test_branch_layout_matches_the_drafter_tree():
    # Chain of 3 drafts, 4 branches: step 0 feeds the guesses (nodes 3..6), step 1 each b_1 (7..10).
    assert [branch_node(3, 4, 0, b) for b in range(4)] == [3, 4, 5, 6]
    assert [branch_node(3, 4, 1, b) for b in range(4)] == [7, 8, 9, 10]
    cache = SpeculationCache({(0, 5): 2}, [[1, 2]] * 4, [[]] * 4, [[]] * 4, chain_length=3, steps=2)
    assert cache.fed_nodes(2) == [5, 9] and cache.lookup(0, 5) == 2 and cache.lookup(1, 5) is None
    assert SpeculationCache({(0, 5): 0}, [[]], [[]], [[]]).lookup(0, 5) is None  # no step ran


def test_saguaro_splits_cpu_threads_and_restores_the_callers(monkeypatch):
    seen, generators = [], []
    real_forward = saguaro.model.runner.ModelRunner.forward

    def forward(self, tokens, *args, **kwargs):
        worker = generators[0].drafts.worker if generators else None
        working = bool(worker and worker.working and worker.working.value)
        seen.append((torch.get_num_threads(), len(tokens), working))
        return real_forward(self, tokens, *args, **kwargs)

    monkeypatch.setattr(saguaro.model.runner.ModelRunner, "forward", forward)
    target = tiny_model("llama", seed=0)
    torch.set_num_threads(1)
    try:
        # Eager runners even under `pytest --compile`: a compiled runner also runs warm-up forwards
        # (right after the prefill, which hands the cores back), and those verify nothing.
        with saguaro_generator(target, compile=False) as generator:
            generator.policy.threads = ThreadSplit(total=4, drafter=1)  # as on a 4-core machine
            generators.append(generator)
            run(generator, 20)
        assert torch.get_num_threads() == 1  # the caller's setting, restored
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    # The prefill overlaps the drafter's own prefill, and every verification its pre-speculation:
    # the target keeps to the cores the drafter leaves. Only a plain step (one token, no draft: the
    # last round when one token is left) may have them all, and only once the worker has finished
    # (its flag, read here after the engine chose the threads, cannot rise again without a request).
    assert {threads for threads, fed, _ in seen if fed > 1} == {3} and len(seen) > 3
    assert all(threads in (3, 4) for threads, fed, _ in seen if fed == 1)
    assert not any(threads == 4 and working for threads, fed, working in seen if fed == 1)
    assert ThreadSplit.for_cpu(2).target == 1 and ThreadSplit.for_cpu(16).drafter == 4


def test_the_split_stays_within_the_threads_the_caller_gave_torch():
    """A caller that keeps cores for other work (torch.set_num_threads) gets no more during a call:
    the target never runs on more threads than it was given, even while the drafter idles."""
    target = tiny_model("llama", seed=0)
    seen = []
    hook = target.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    torch.set_num_threads(1)
    try:
        assert ThreadSplit.for_cpu().total == 1
        with saguaro_generator(target) as generator:
            out = run(generator, 20)
        assert torch.get_num_threads() == 1
    finally:
        hook.remove()
        torch.set_num_threads(os.cpu_count() or 1)
    assert out.sequences.tolist() == hf_greedy(target, 20)
    assert seen and set(seen) == {1}
    assert ThreadSplit.for_cpu(2).total == 2  # an explicit budget is the caller's to give


def test_thread_split_gives_the_target_every_core_while_the_drafter_idles():
    torch.set_num_threads(1)
    try:
        with ThreadSplit(total=4, drafter=1) as split:
            split.beside_drafter()
            assert torch.get_num_threads() == 3
            split.alone()
            assert torch.get_num_threads() == 4
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(os.cpu_count() or 1)


def test_the_target_takes_the_drafters_core_back_between_layers_once_it_idles():
    model = tiny_model("llama", seed=0)
    flag = multiprocessing.Value("b", 1, lock=False)  # up: the worker works
    layers = model.model.layers
    seen = []

    def record(index):
        def hook(module, args):
            seen.append(torch.get_num_threads())
            if index == 0:
                flag.value = 0  # the worker idles from inside the target's first layer on

        return hook

    torch.set_num_threads(1)
    try:
        with ThreadSplit(total=2, drafter=1) as split:
            with split.hand_back_when_idle(model, flag):
                handles = [layer.register_forward_pre_hook(record(i)) for i, layer in enumerate(layers)]
                split.beside_drafter()
                model(torch.tensor([[1, 2, 3]]))
                assert seen[0] == 1 and set(seen[1:]) == {2}  # from the next layer on: every core
                seen.clear()
                flag.value, _ = 1, split.beside_drafter()
                model(torch.tensor([[1, 2, 3]]))
                assert seen[0] == 1  # raised again: the target keeps to its share until it drops
            split.beside_drafter()
            flag.value = 0
            seen.clear()
            model(torch.tensor([[1, 2, 3]]))
            assert set(seen) == {1}  # outside the context nothing watches the flag
            for handle in handles:
                handle.remove()
    finally:
        torch.set_num_threads(os.cpu_count() or 1)


def test_a_pause_ends_the_prespeculation_of_an_outcome_that_will_not_come(monkeypatch):
    # Each pre-speculation step is held until a request is in (10 s at most), so the worker would
    # pre-speculate for 30 s; a pause must end it before its first step, and the worker must
    # still answer the next request (a catch_up: plain steps followed) with a draft.
    steps = []
    original = PreSpeculator.prespeculate

    def held(self, outcome_arrived=lambda: False):
        def arrived():
            deadline = time.monotonic() + 10
            while not outcome_arrived() and time.monotonic() < deadline:
                time.sleep(0.01)
            return outcome_arrived()

        original(self, arrived)
        steps.append(self._cache.steps)

    monkeypatch.setattr(PreSpeculator, "prespeculate", held)
    target = tiny_model("llama", seed=0)
    worker = saguaro.ssd.worker.DraftWorker(perturbed_copy(target, 0.05, seed=1), "thread", lookahead=3)
    try:
        committed = PROMPT[0].tolist()
        assert len(worker.reset(committed, 3).tokens) == 3
        start = time.monotonic()
        worker.pause()
        while not steps and time.monotonic() - start < 30:
            time.sleep(0.01)
        assert steps == [0] and time.monotonic() - start < 5
        assert len(worker.catch_up(committed + [4, 8], 3).tokens) == 3
    finally:
        worker.close()


def test_the_engine_pauses_the_worker_after_each_drafted_round_with_no_outcome_to_send(monkeypatch):
    # A drafted round followed by a plain step, or by the end of the call, sends no outcome: the
    # worker must hear a pause there, and only there.
    pauses = []
    original = saguaro.ssd.worker.DraftWorker.pause
    monkeypatch.setattr(
        saguaro.ssd.worker.DraftWorker, "pause", lambda self: pauses.append(1) or original(self)
    )
    target = tiny_model("llama", seed=0)
    with saguaro_generator(target) as generator:
        for tokens in (40, 13):
            pauses.clear()
            log = run(generator, tokens).stats.round_log
            drafted = [entry["source"] != DraftSource.OFF for entry in log]
            ends = sum(d and (i + 1 == len(log) or not drafted[i + 1]) for i, d in enumerate(drafted))
            assert any(drafted) and len(pauses) == ends


def test_a_worker_process_flags_its_work(monkeypatch):
    # The flag goes up with a request as it is sent (the worker's prefill overlaps the target's),
    # and down once the request and the pre-speculation after it are done.
    target = tiny_model("llama", seed=0)
    draft = perturbed_copy(target, 0.05, seed=1)
    worker = saguaro.ssd.worker.DraftWorker(draft, "process", lookahead=3)
    try:
        os.kill(worker._process.pid, signal.SIGSTOP)  # the worker cannot start before we look
        ticket = worker.begin(Reset([1, 5, 9, 2, 7, 3], 3, True))
        assert worker.working.value == 1  # raised by the sender, before the worker starts
        os.kill(worker._process.pid, signal.SIGCONT)
        worker.end(ticket)
        deadline = time.monotonic() + 30
        while worker.working.value and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.working.value == 0  # pre-speculation over, nothing else to do
    finally:
        worker.close()
    assert worker.working is None
