"""The serving engine: concurrent requests decoded as one continuous, speculative batch, each exactly
as alone; per-request sampling; isolation (bad arguments, failures, cancellation, a full queue,
shutdown); the asyncio face."""

import asyncio
import random
import threading
import time

import pytest
import torch
from conftest import perturbed_copy, tiny_model, word_tokenizer
from stats_helpers import argmax_with_sampled_q, chi_square_pvalue
from test_sampling_exact import VOCAB, exact_joint

import saguaro
from saguaro.decode import batched
from saguaro.decode.batched import BatchedModelDrafter

pytestmark = [
    pytest.mark.timeout(120),
    # Requests meant to run until cancelled ask for more tokens than the tiny models' positions.
    pytest.mark.filterwarnings("ignore:.*max_position_embeddings:saguaro.SaguaroWarning"),
]

PLAIN_DRAFT = {"draft_quantization": None, "draft_vocab_size": None}
# Speculation every round (the adaptive schedule may turn it off on a tiny model): drafting is shown.
SPECULATING = {"method": "speculative", "speculation_schedule": "constant", **PLAIN_DRAFT}
SYSTEM = [1, *range(40, 64)]  # a shared "system prompt"


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("llama", seed=0)
    return target, perturbed_copy(target, 0.02)


def alone(model, prompt, max_new_tokens, **kwargs):
    """The target's own greedy generate() on one prompt: the reference for its request."""
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, **kwargs
    )
    return out[0, len(prompt) :].tolist()


def random_requests(count: int, seed: int):
    """(prompt, max_new_tokens) pairs: random lengths, half of them behind SYSTEM."""
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        body = [rng.randrange(4, 96) for _ in range(rng.randrange(1, 30))]
        prompt = SYSTEM + body if i % 2 else [1, *body]
        requests.append((prompt, rng.randrange(1, 40)))
    return requests


def test_every_request_equals_its_prompt_alone_under_continuous_batching(pair):
    target, draft = pair
    tokenizer = word_tokenizer()
    requests = random_requests(12, seed=3)
    # Stop strings: two words the target emits for request 0, as HF judges them.
    free = alone(target, requests[0][0], 30, eos_token_id=None)
    stop = tokenizer.decode(free[10:12])
    requests[0] = (requests[0][0], 30)
    expected = [alone(target, prompt, n, eos_token_id=None) for prompt, n in requests]
    expected[0] = alone(target, requests[0][0], 30, eos_token_id=None, stop_strings=stop, tokenizer=tokenizer)
    assert len(expected[0]) < 30
    handles, streamed = {}, {}
    cancelled = {5, 8}
    with saguaro.Engine(target, draft, max_batch_size=4, prefill_chunk_tokens=16, **SPECULATING) as engine:

        def client(i):
            time.sleep(random.Random(i).uniform(0, 0.05))  # random arrival times
            prompt, n = requests[i]
            extra = {"stop_strings": stop, "tokenizer": tokenizer} if i == 0 else {}
            handles[i] = engine.submit(torch.tensor([prompt]), max_new_tokens=n, eos_token_id=[], **extra)
            if i in cancelled:
                handles[i].cancel()
            streamed[i] = sum(handles[i], [])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        outputs = {i: handle.result(timeout=60) for i, handle in handles.items()}
        metrics = engine.metrics()
    for i, (prompt, _) in enumerate(requests):
        out = outputs[i]
        new = out.sequences[0, len(prompt) :].tolist()
        assert out.sequences[0, : len(prompt)].tolist() == prompt
        assert streamed[i] == new  # streamed tokens are the final ones, in order
        if out.stats.finish_reason == "cancelled":
            assert i in cancelled and new == expected[i][: len(new)]
        else:
            assert new == expected[i], i
            assert out.stats.finish_reason == ("stop" if i == 0 else "length")
    assert metrics["finished"] + metrics["cancelled"] == len(requests) and metrics["failed"] == 0
    # Speculation ran, with acceptances and rejections; the shared system prompt was reused.
    assert 0 < metrics["accepted"] < metrics["drafted"]
    assert metrics["reused_prompt_tokens"] >= len(SYSTEM) - 1
    assert metrics["running"] == metrics["queued"] == 0


@pytest.mark.parametrize("arch", ["mistral", "gpt2"])
def test_joined_left_and_compacted_caches_stay_exact(arch, monkeypatch):
    # mistral: a sliding window (24) that slot positions must keep through joins and compactions;
    # gpt2: learned absolute positions. Every leave compacts the caches.
    monkeypatch.setattr(batched, "COMPACT_MIN_SLOTS", 0)
    monkeypatch.setattr(batched, "COMPACT_SHRINK", 0.0)
    target = tiny_model(arch, seed=2)
    draft = perturbed_copy(target, 0.02)
    requests = random_requests(6, seed=5)
    with saguaro.Engine(target, draft, max_batch_size=3, prefill_chunk_tokens=8, **SPECULATING) as engine:
        handles = [engine.submit(prompt, max_new_tokens=n, eos_token_id=[]) for prompt, n in requests]
        outputs = [handle.result(timeout=60) for handle in handles]
    for (prompt, n), out in zip(requests, outputs):
        assert out.sequences[0, len(prompt) :].tolist() == alone(target, prompt, n, eos_token_id=None)


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode(pair):
    target, draft = pair
    shapes = []
    hook = target.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    long_prompt = [1, *[random.Random(7).randrange(4, 96) for _ in range(100)]]
    try:
        with saguaro.Engine(
            target, draft, prefill_chunk_tokens=16, prefix_cache=False, **SPECULATING
        ) as engine:
            short = engine.submit([1, 5, 6], max_new_tokens=30, eos_token_id=[])
            while not short.sequence.generated:
                time.sleep(0.001)
            long = engine.submit(long_prompt, max_new_tokens=5, eos_token_id=[])
            outs = short.result(timeout=60), long.result(timeout=60)
    finally:
        hook.remove()
    assert outs[0].sequences[0, 3:].tolist() == alone(target, [1, 5, 6], 30, eos_token_id=None)
    assert outs[1].sequences[0, 101:].tolist() == alone(target, long_prompt, 5, eos_token_id=None)
    # No forward fed more than one chunk of the long prompt (packed prefills are [1, tokens]).
    assert max(tokens for rows, tokens in shapes if rows == 1) <= 16


def test_without_a_draft_model_requests_draft_from_what_the_engine_has_seen():
    # Suffix decoding over every request: a repeated request copies the earlier one's answer.
    target = tiny_model("qwen2", seed=3)
    prompt = [1, *range(20, 32)]
    with saguaro.Engine(target, method="prompt_lookup", speculation_schedule="constant") as engine:
        first, again = (
            engine.submit(prompt, max_new_tokens=40, eos_token_id=[]).result(timeout=60) for _ in "12"
        )
    expected = alone(target, prompt, 40, eos_token_id=None)
    assert (
        first.sequences[0, len(prompt) :].tolist() == again.sequences[0, len(prompt) :].tolist() == expected
    )
    assert again.stats.accepted > first.stats.accepted and again.stats.accepted >= 30


def test_beside_the_draft_model_a_repeat_drafts_its_copy():
    # A draft model that rarely agrees; the second request repeats the first, whose answer the
    # engine saw: its rounds draft copies (source "lookup") and accept far more.
    target = tiny_model("qwen2", seed=3)
    draft = tiny_model("qwen2", seed=4)
    prompt = [1, *range(20, 32)]
    with saguaro.Engine(target, draft, **SPECULATING) as engine:
        first, again = (
            engine.submit(prompt, max_new_tokens=40, eos_token_id=[]).result(timeout=60) for _ in "12"
        )
    expected = alone(target, prompt, 40, eos_token_id=None)
    assert (
        first.sequences[0, len(prompt) :].tolist() == again.sequences[0, len(prompt) :].tolist() == expected
    )
    assert again.stats.lookup_backups > 0 and again.stats.accepted > first.stats.accepted + 10


def test_where_the_draft_model_does_not_pay_rows_draft_copies(monkeypatch):
    # A machine where a draft token costs 100 plain steps, at every batch size: the model's
    # controllers choose plain steps, so rows draft copies of what the engine has seen instead
    # (free), the draft model neither drafts nor prefills a joining row, and every answer is still
    # the target's own. (The copies' controllers draft every copy whole here: when copies pay is
    # tune/cost_model.py's, tested there.)
    target, draft = tiny_model("qwen2", seed=3), tiny_model("qwen2", seed=4)
    proposed, eager = [], []
    real_propose, real_add_rows = BatchedModelDrafter.propose, BatchedModelDrafter.add_rows

    def propose(self, depths):
        proposed.append(depths)
        return real_propose(self, depths)

    def add_rows(self, rows, samplers=None, prefill=False):
        eager.append(prefill)
        return real_add_rows(self, rows, samplers, prefill)

    monkeypatch.setattr(BatchedModelDrafter, "propose", propose)
    monkeypatch.setattr(BatchedModelDrafter, "add_rows", add_rows)
    prompts = [[1, *range(20, 32)], [1, *range(20, 32)], [1, *range(50, 58)]]
    with saguaro.Engine(target, draft, method="speculative", max_batch_size=2, **PLAIN_DRAFT) as engine:
        for rows in (1, 2):
            model = engine.policy.batch_lookaheads(rows)
            model.verify.observe(1, 0.01)
            model.draft_seconds_per_unit = 1.0
            assert model.choose(4) == 0 and not model.drafting
            engine.policy.copy_lookaheads(rows).choose = lambda limit, *rest: limit
        first = engine.submit(prompts[0], max_new_tokens=40, eos_token_id=[]).result(timeout=60)
        handles = [engine.submit(prompt, max_new_tokens=40, eos_token_id=[]) for prompt in prompts[1:]]
        outs = [first] + [handle.result(timeout=60) for handle in handles]
    for prompt, out in zip(prompts, outs):
        assert out.sequences[0, len(prompt) :].tolist() == alone(target, prompt, 40, eos_token_id=None)
    drafted = sum(out.stats.drafted for out in outs)
    accepted = sum(out.stats.accepted for out in outs)
    assert outs[1].stats.accepted >= 30  # the repeat copies the first answer
    assert 0 < accepted < drafted  # copies proposed, accepted and refused
    assert proposed == [] and eager and not any(eager)


def test_a_batch_weighs_saguaros_batched_chains_per_draft_token(pair):
    # A batch serves method="saguaro" with batched chains: one draft forward per token, which its
    # controllers must count per token (counted per round, a 1-token draft would look as dear as a
    # 4-token one, and short drafts would never run where verification grows with the tokens).
    target, draft = pair
    with saguaro.Engine(target, draft, method="saguaro", **PLAIN_DRAFT) as engine:
        assert engine.policy.batch_lookaheads(4).draft_cost == "per_token"
        assert engine.policy.copy_lookaheads(4).draft_cost == "free"


@pytest.fixture(scope="module")
def small_vocab_pair():
    target = tiny_model("llama", seed=0, vocab=VOCAB, layers=1, hidden=16, init=0.6)
    return target, tiny_model("llama", seed=5, vocab=VOCAB, layers=1, hidden=16, init=0.6)


SAMPLED_PROMPT = [1, 4, 3]


def sampled_counts(target, draft, samples: int) -> tuple[torch.Tensor, int]:
    """Counts of the first three tokens of `samples` requests, each with its own seed, sampled at
    temperature 0.9 while greedy requests share their batches."""
    counts = torch.zeros([VOCAB] * 3)
    options = {**SPECULATING, "num_speculative_tokens": 2}
    with saguaro.Engine(target, draft, max_batch_size=8, max_queue=samples * 2, **options) as engine:
        handles = []
        for i in range(samples):
            handles.append(
                engine.submit(
                    SAMPLED_PROMPT, max_new_tokens=4, do_sample=True, temperature=0.9, seed=i, eos_token_id=[]
                )
            )
            if i % 4 == 0:
                engine.submit(SAMPLED_PROMPT, max_new_tokens=6, eos_token_id=[])
        for handle in handles:
            tokens = handle.result(timeout=60).sequences[0, 3:6].tolist()
            counts[tuple(tokens)] += 1
        drafted = engine.metrics()["drafted"]
    return counts, drafted


def test_sampled_requests_have_the_target_distribution(small_vocab_pair):
    target, draft = small_vocab_pair
    counts, drafted = sampled_counts(target, draft, samples=1200)
    assert drafted > 1200
    assert chi_square_pvalue(counts, exact_joint(target, 3, prompt=SAMPLED_PROMPT, temperature=0.9)) > 1e-3


def test_sampled_requests_test_catches_draft_not_drawn_from_q(small_vocab_pair, monkeypatch):
    # Planted bug (HF #47932): propose each row's argmax while reporting the q it should be drawn from.
    real_propose = BatchedModelDrafter.propose
    monkeypatch.setattr(
        BatchedModelDrafter,
        "propose",
        lambda self, depths: list(map(argmax_with_sampled_q, real_propose(self, depths))),
    )
    target, draft = small_vocab_pair
    counts, _ = sampled_counts(target, draft, samples=1200)
    assert chi_square_pvalue(counts, exact_joint(target, 3, prompt=SAMPLED_PROMPT, temperature=0.9)) < 1e-6


def test_sampled_requests_drafting_copies_have_the_target_distribution(small_vocab_pair):
    # A prompt long enough that every request's context repeats earlier ones' (prompt, sampled
    # tokens): rows draft copies of other requests' continuations, verified as q = one-hot.
    target, draft = small_vocab_pair
    prompt = [1, 4, 3, 5, 4, 3, 5, 4, 3, 5, 2]
    counts = torch.zeros([VOCAB] * 3)
    with saguaro.Engine(target, draft, max_queue=1000, **SPECULATING, num_speculative_tokens=3) as engine:
        handles = [
            engine.submit(prompt, max_new_tokens=4, do_sample=True, temperature=0.9, seed=i, eos_token_id=[])
            for i in range(900)
        ]
        outs = [handle.result(timeout=60) for handle in handles]
    for out in outs:
        counts[tuple(out.sequences[0, len(prompt) : len(prompt) + 3].tolist())] += 1
    assert sum(out.stats.lookup_backups for out in outs) > 300
    assert chi_square_pvalue(counts, exact_joint(target, 3, prompt=prompt, temperature=0.9)) > 1e-3


def test_seeded_requests_repeat():
    target = tiny_model("llama", seed=1)
    with saguaro.Engine(target, method="autoregressive") as engine:
        runs = [
            engine.submit([1, 7, 8], max_new_tokens=12, do_sample=True, seed=seed).result(timeout=60)
            for seed in (4, 4, 5)
        ]
    first, again, other = (run.sequences.tolist() for run in runs)
    assert first == again and first != other


@pytest.mark.parametrize(
    "bad",
    [
        dict(max_new_tokens=0),
        dict(do_sample=True, temperature=0.0),
        dict(top_k=-1, do_sample=True),
        dict(num_beams=4),
        dict(stop_strings="w1"),  # without a tokenizer
        dict(seed="x"),
    ],
)
def test_bad_arguments_fail_at_submit_alone(pair, bad):
    target, draft = pair
    with saguaro.Engine(target, draft, **SPECULATING) as engine:
        good = engine.submit([1, 5, 6], max_new_tokens=8, eos_token_id=[])
        with pytest.raises(ValueError):
            engine.submit([1, 5, 6], **bad)
        assert good.result(timeout=60).sequences[0, 3:].tolist() == alone(
            target, [1, 5, 6], 8, eos_token_id=None
        )


@pytest.mark.parametrize("ids", [[], [[1, 2], [3, 4]], [1, 500], torch.tensor([[1.0, 2.0]])])
def test_bad_prompts_fail_at_submit(pair, ids):
    target, _ = pair
    with saguaro.Engine(target, method="autoregressive") as engine, pytest.raises(ValueError):
        engine.submit(ids)


class FailAfter:
    """A logits processor that raises on its `calls`-th call: a failure inside one row."""

    def __init__(self, calls: int):
        self.calls = calls

    def __call__(self, input_ids, scores):
        self.calls -= 1
        if self.calls <= 0:
            raise RuntimeError("planted failure")
        return scores


def test_a_failing_request_fails_alone(pair):
    target, draft = pair
    prompts = [[1, 5, 6], [1, 9, 10, 11], [1, 30]]
    with saguaro.Engine(target, draft, **SPECULATING) as engine:
        handles = [engine.submit(p, max_new_tokens=20, eos_token_id=[]) for p in prompts]
        failing = engine.submit([1, 7], max_new_tokens=20, logits_processor=[FailAfter(3)])
        with pytest.raises(RuntimeError, match="planted failure"):
            failing.result(timeout=60)
        with pytest.raises(RuntimeError, match="planted failure"):
            list(failing)
        for prompt, handle in zip(prompts, handles):
            assert handle.result(timeout=60).sequences[0, len(prompt) :].tolist() == alone(
                target, prompt, 20, eos_token_id=None
            )
        assert engine.metrics()["failed"] == 1


class Gate:
    """A logits processor that holds the engine's scheduler in its first call until opened."""

    def __init__(self):
        self.opened = threading.Event()

    def __call__(self, input_ids, scores):
        assert self.opened.wait(30)
        return scores


def test_cancel_frees_the_slot_and_a_full_queue_refuses(pair):
    target, _ = pair
    gate = Gate()
    with saguaro.Engine(target, method="autoregressive", max_batch_size=1, max_queue=2) as engine:
        endless = engine.submit([1, 5], max_new_tokens=400, eos_token_id=[], logits_processor=[gate])
        while engine.metrics()["queued"]:  # the scheduler took it, and waits at the gate
            time.sleep(0.001)
        waiting = [engine.submit([1, 6 + i], max_new_tokens=3, eos_token_id=[]) for i in range(2)]
        with pytest.raises(saguaro.QueueFull, match="retry later"):
            engine.submit([1, 9], max_new_tokens=3)
        waiting[1].cancel()  # a waiting request leaves the queue at once
        assert waiting[1].result(timeout=1).stats.finish_reason == "cancelled"
        endless.cancel()  # a running one leaves before the next round, freeing its row
        gate.opened.set()
        assert waiting[0].result(timeout=60).sequences[0, 2:].tolist() == alone(
            target, [1, 6], 3, eos_token_id=None
        )
        out = endless.result(timeout=60)
        assert out.stats.finish_reason == "cancelled" and out.sequences.shape[1] < 2 + 400
        assert engine.metrics()["cancelled"] == 2


def test_shutdown_finishes_or_cancels_and_refuses_new_requests(pair):
    target, _ = pair
    engine = saguaro.Engine(target, method="autoregressive")
    quick = engine.submit([1, 5, 6], max_new_tokens=4, eos_token_id=[])
    endless = engine.submit([1, 7], max_new_tokens=100_000, eos_token_id=[])
    engine.shutdown(timeout=0.5)
    assert quick.result(timeout=0).stats.finish_reason == "length"
    assert endless.result(timeout=0).stats.finish_reason == "cancelled"
    with pytest.raises(saguaro.EngineClosed):
        engine.submit([1, 5])


def test_async_engine_streams_and_returns_each_request_as_alone(pair):
    target, draft = pair
    prompts = [[1, 5, 6], SYSTEM + [7, 8], SYSTEM + [9]]

    async def main():
        async with saguaro.AsyncEngine(target, draft, **SPECULATING) as engine:
            handles = [engine.submit(p, max_new_tokens=15, eos_token_id=[]) for p in prompts]
            endless = engine.submit([1, 5], max_new_tokens=100_000, eos_token_id=[])

            async def consume(handle):
                return [token async for tokens in handle for token in tokens], await handle.result()

            async def cancel_after_first_tokens():
                async for _ in endless:
                    endless.cancel()
                return await endless.result(timeout=30)

            *outputs, cancelled = await asyncio.gather(*map(consume, handles), cancel_after_first_tokens())
            assert cancelled.stats.finish_reason == "cancelled"
            assert engine.metrics()["cancelled"] == 1
            return outputs

    for prompt, (streamed, out) in zip(prompts, asyncio.run(main())):
        new = out.sequences[0, len(prompt) :].tolist()
        assert streamed == new == alone(target, prompt, 15, eos_token_id=None)
        assert out.stats.first_token_seconds > 0 and out.stats.queue_seconds >= 0
