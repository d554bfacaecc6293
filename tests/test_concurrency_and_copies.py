"""One generator (or one enabled model) used from several threads, copied and pickled."""

import copy
import multiprocessing
import pickle
import threading
import warnings

import pytest
import torch
from conftest import perturbed_copy, tiny_model

import saguaro
from saguaro.generator.decoding import Decoder

PROMPTS = [torch.tensor([[1, 17, 33, 5, 80, 42, 9, 64, 23]]), torch.tensor([[1, 13, 51, 16, 20, 79]])]
pytestmark = pytest.mark.timeout(300)


def hf_greedy(model, prompt, max_new_tokens):
    return model.generate(
        prompt, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    ).tolist()


def race_two_calls(generator):
    """Two threads released together, each generating one of PROMPTS with `generator` (a
    SpeculativeGenerator or an enabled model): [(sequences, worker failures)] per thread, and the
    exceptions raised (a SaguaroWarning counts as one)."""
    start = threading.Barrier(2)
    results, errors = [None, None], []

    def call(i):
        try:
            start.wait()
            out = generator.generate(
                PROMPTS[i], max_new_tokens=12, eos_token_id=[], return_dict_in_generate=True
            )
            results[i] = (out.sequences.tolist(), out.stats.worker_failures)
        except BaseException as error:
            errors.append(error)

    with warnings.catch_warnings():
        warnings.simplefilter("error", saguaro.SaguaroWarning)  # a worker failure is an error here
        threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    return results, errors


@pytest.fixture
def most_in_flight(monkeypatch):
    """[n]: the most generations (rows) ever running at once on any generator during the test."""
    inside, most, lock = [0], [0], threading.Lock()
    real_generate_one = Decoder._one

    def counted(self, *args):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            return real_generate_one(self, *args)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(Decoder, "_one", counted)
    return most


@pytest.mark.parametrize("method", ["saguaro", "speculative"])
def test_concurrent_calls_on_one_generator_are_serialised_and_exact(method, most_in_flight):
    target = tiny_model("llama", seed=0)
    expected = [hf_greedy(target, prompt, 12) for prompt in PROMPTS]
    options = {"placement": "process", "worker_timeout": 30.0} if method == "saguaro" else {}
    with saguaro.SpeculativeGenerator(
        target, perturbed_copy(target, 0.005), method=method, **options
    ) as generator:
        for race in range(10):
            results, errors = race_two_calls(generator)
            assert not errors, (race, errors)
            assert results == [(expected[0], 0), (expected[1], 0)], race
    assert most_in_flight == [1]
    assert multiprocessing.active_children() == []


def test_concurrent_calls_on_one_enabled_model_are_serialised_and_exact(most_in_flight):
    target = tiny_model("llama", seed=0)
    expected = [hf_greedy(target, prompt, 12) for prompt in PROMPTS]
    with saguaro.enable(
        target, draft_model=perturbed_copy(target, 0.005), method="saguaro", placement="process"
    ):
        for race in range(5):
            results, errors = race_two_calls(target)
            assert not errors, (race, errors)
            assert results == [(expected[0], 0), (expected[1], 0)], race
    assert most_in_flight == [1]
    assert multiprocessing.active_children() == []


def test_deepcopy_and_pickle_of_an_enabled_model_leave_the_original_working():
    target = tiny_model("llama", seed=0)
    expected = hf_greedy(target, PROMPTS[0], 16)
    handle = saguaro.enable(
        target, draft_model=perturbed_copy(target, 0.005), method="saguaro", placement="process"
    )
    try:
        assert target.generate(PROMPTS[0], max_new_tokens=16, eos_token_id=None).tolist() == expected
        worker = handle.generator.drafts.worker._process
        assert worker.is_alive()

        copied = copy.deepcopy(target)
        # The copy's generate is its own: bound to the copy, with a generator of its own and no worker yet.
        assert copied.generate.__self__.model is copied and copied._saguaro.generator.target is copied
        assert copied._saguaro.generator.drafts.worker is None
        assert copied.generate(PROMPTS[0], max_new_tokens=16, eos_token_id=None).tolist() == expected
        assert copied._saguaro.generator.drafts.worker._process.pid != worker.pid

        unpickled = pickle.loads(pickle.dumps(target))
        assert unpickled.generate(PROMPTS[0], max_new_tokens=16, eos_token_id=None).tolist() == expected

        # The original is untouched: same worker, still exact.
        assert handle.generator.drafts.worker._process is worker and worker.is_alive()
        assert target.generate(PROMPTS[0], max_new_tokens=16, eos_token_id=None).tolist() == expected
        for model in (copied, unpickled):
            assert saguaro.disable(model)
            assert model.generate.__func__ is type(model).generate  # HF's own, bound to the copy
            assert (
                model.generate(
                    PROMPTS[0], max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
                ).tolist()
                == expected
            )
    finally:
        saguaro.disable(target)
    assert multiprocessing.active_children() == []


def test_a_pickled_handle_alone_rebinds_hf_generate_to_its_model():
    # Unpickled before its model's state, the handle must not take its own wrapper for HF's generate.
    target = tiny_model("llama", seed=0)
    handle = saguaro.enable(target, draft_model=perturbed_copy(target, 0.005))
    copied = pickle.loads(pickle.dumps(handle))
    assert copied.original.__func__ is type(target).generate and copied.original.__self__ is copied.model
    assert copied.model.generate(PROMPTS[1], max_new_tokens=8, eos_token_id=None).tolist() == hf_greedy(
        target, PROMPTS[1], 8
    )
    saguaro.disable(target)
