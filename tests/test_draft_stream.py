"""The one draft protocol (saguaro.draft.stream): speculative, tree and saguaro all get their drafts
through it, and what a stream hands over is exactly what the target verifies."""

import pytest
import torch
from conftest import perturbed_copy, slow_verification, tiny_model

import saguaro
from saguaro.decode import engines
from saguaro.draft.stream import Draft, DraftSource, DraftStream
from saguaro.generator import decoding
from saguaro.model.compiled_runner import CompiledRunner
from saguaro.model.runner import ModelRunner
from saguaro.model.tree import TokenTree, static_tree
from saguaro.tune.cost_model import TreeDepthController

PROMPT = torch.tensor([[1, 17, 33, 5, 80, 42, 9, 64, 23]])
METHODS = ["speculative", "tree", "saguaro"]


class RecordingStream(DraftStream):
    """Passes every call on to the stream the generator built, noting the calls and the drafts."""

    def __init__(self, inner: DraftStream):
        self.inner, self.calls, self.drafts = inner, [], []

    @property
    def concurrent(self) -> bool:
        return self.inner.concurrent

    def begin(self, request):
        self.calls.append(request.kind)
        return self.inner.begin(request)

    def end(self, ticket):
        draft = self.inner.end(ticket)
        self.drafts.append(draft)
        return draft


class ScriptedDepths(TreeDepthController):
    """Full depth every round except the `off` ones (counted from 1): plain target steps, after
    which the stream must catch up with the tokens made meanwhile."""

    def __init__(self, max_k: int, off: set[int]):
        super().__init__(max_k)
        self.off, self.calls = off, 0

    def choose(self, limit: int) -> int:
        self.calls += 1
        self._depth = 0 if self.calls in self.off else min(self.max_k, limit)
        return self._depth


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("llama", seed=0)
    return target, perturbed_copy(target, 0.005)


def hf_greedy(target, new_tokens):
    out = target.generate(
        PROMPT, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, PROMPT.shape[1] :].tolist()


def record(monkeypatch, target):
    """Wrap the stream of every engine call; note each draft the target verifies and each tree the
    target's verification forward is given."""
    streams, verified, forwards = [], [], []
    real_engine, real_verify = decoding.speculative, engines.verify_proposal

    def engine(runner, drafts, *args):
        streams.append(RecordingStream(drafts))
        return real_engine(runner, streams[-1], *args)

    def verify(logits, draft, *args):
        verified.append(draft)
        return real_verify(logits, draft, *args)

    def recording(real_forward):
        def forward(self, tokens, tree=None, *args, **kwargs):
            if self.model is target and tree is not None:
                forwards.append((list(tokens), tree))
            return real_forward(self, tokens, tree, *args, **kwargs)

        return forward

    monkeypatch.setattr(decoding, "speculative", engine)
    monkeypatch.setattr(engines, "verify_proposal", verify)
    for runner in (ModelRunner, CompiledRunner):  # CompiledRunner: pytest --compile
        monkeypatch.setattr(runner, "forward", recording(runner.forward))
    return streams, verified, forwards


def generator_for(method, pair, **options):
    target, draft = pair
    return saguaro.SpeculativeGenerator(
        target,
        draft,
        method=method,
        placement="thread",
        speculation_schedule="constant",
        num_speculative_tokens=3,
        **options,
    )


@pytest.mark.parametrize("method", METHODS)
def test_every_drafting_method_gets_its_drafts_through_the_one_stream(pair, monkeypatch, method):
    target, _ = pair
    if method == "saguaro":
        slow_verification(monkeypatch)  # time for the worker to pre-speculate, as with a large target
    streams, verified, forwards = record(monkeypatch, target)
    with generator_for(method, pair) as generator:
        out = generator.generate(PROMPT, max_new_tokens=24, eos_token_id=[], return_dict_in_generate=True)
    assert out.sequences[0, PROMPT.shape[1] :].tolist() == hf_greedy(target, 24)
    assert 0 < out.stats.accepted < out.stats.drafted  # drafts were made, some kept, some not
    (stream,) = streams
    assert stream.calls[0] == "reset" and stream.calls.count("resolve") >= 3
    # Every draft the stream handed over was verified, in order, and nothing else was.
    handed_over = [draft for draft in stream.drafts if draft.source != DraftSource.OFF]
    assert [id(draft) for draft in verified if draft.source != DraftSource.OFF] == list(map(id, handed_over))
    # The target's verification forward fed the last token, then exactly the draft's nodes, hung
    # below it in the draft's own layout: a tree for `tree`, a chain otherwise.
    assert len(forwards) == len(verified) == out.stats.rounds
    for (tokens, tree), draft in zip(forwards, verified):
        assert tokens[1:] == draft.tokens and tree == draft.tree.under_root()
    assert any(not draft.tree.is_chain for draft in handed_over) == (method == "tree")
    if method == "saguaro":
        assert any(draft.source == DraftSource.CACHE for draft in handed_over)  # pre-speculated


@pytest.mark.parametrize("method", METHODS)
def test_rounds_with_speculation_off_idle_the_stream_then_catch_it_up(pair, monkeypatch, method):
    target, _ = pair
    streams, verified, _ = record(monkeypatch, target)
    with generator_for(method, pair) as generator:
        depth = generator.policy.tree_extent()[0]
        generator.policy.lookahead = ScriptedDepths(depth, off={1, 4, 5, 8})
        out = generator.generate(PROMPT, max_new_tokens=30, eos_token_id=[], return_dict_in_generate=True)
    assert out.sequences[0, PROMPT.shape[1] :].tolist() == hf_greedy(target, 30)
    sources = [round_["source"] for round_ in out.stats.round_log]
    assert [sources[i] for i in (0, 3, 4, 7)] == [DraftSource.OFF] * 4
    (stream,) = streams
    # One call per drafted round, none while speculation is off: the stream first hears of the
    # sequence when the first round that drafts comes, and catches up after each off spell.
    assert stream.calls[0] == "reset" and stream.calls.count("reset") == 1
    assert stream.calls.count("catch_up") == 2
    assert len(stream.drafts) == len(stream.calls) == sum(source != DraftSource.OFF for source in sources)
    assert 0 < out.stats.accepted < out.stats.drafted


def test_a_draft_cut_to_a_depth_keeps_the_shallower_nodes_in_order():
    tree = static_tree([2, 2])  # nodes 0, 1 on the first level; 2, 3 under 0 and 4, 5 under 1
    probs = torch.eye(6)
    draft = Draft([10, 11, 12, 13, 14, 15], probs, tree=tree)
    assert draft.cut(2) is draft and draft.tokens == [10, 11, 12, 13, 14, 15]
    draft.cut(1)
    assert draft.tokens == [10, 11] and draft.tree == TokenTree((-1, -1))
    assert torch.equal(draft.probs, probs[:2])
    chain = Draft([5, 6, 7]).cut(2)
    assert chain.tokens == [5, 6] and chain.tree == TokenTree.chain(2) and chain.probs is None
    with pytest.raises(ValueError, match="3 draft tokens but 2 tree nodes"):
        Draft([1, 2, 3], tree=TokenTree.chain(2))


class BusyWorker(RecordingStream):
    """A concurrent stream whose worker says it is still working (its flag up) at every round."""

    concurrent = True
    working = type("Flag", (), {"value": 1})()


class RecordingThreads:
    def __init__(self):
        self.calls = []

    def beside_drafter(self):
        self.calls.append("beside")

    def alone(self):
        self.calls.append("alone")


@pytest.mark.parametrize("busy", [True, False])
def test_a_plain_step_keeps_beside_a_worker_that_is_still_working(pair, monkeypatch, busy):
    # After a drafted round the worker may still be pre-speculating for an outcome it will not be
    # sent: a plain step on every core would then oversubscribe them with it (3.5x as slow on the
    # demo pair), so it keeps to the target's share until the worker's flag drops.
    threads = RecordingThreads()
    real_engine = decoding.speculative

    def engine(runner, drafts, prompt, sampler, stop, stats, max_depth, lookahead, _threads, fallback):
        stream = BusyWorker(drafts)
        stream.working = type("Flag", (), {"value": int(busy)})()
        return real_engine(
            runner, stream, prompt, sampler, stop, stats, max_depth, lookahead, threads, fallback
        )

    monkeypatch.setattr(decoding, "speculative", engine)
    with generator_for("speculative", pair) as generator:
        generator.policy.lookahead = ScriptedDepths(3, off={2, 3})
        out = generator.generate(PROMPT, max_new_tokens=20, eos_token_id=[], return_dict_in_generate=True)
    sources = [round_["source"] for round_ in out.stats.round_log]
    assert sources[1:3] == [DraftSource.OFF] * 2 and sources[0] != DraftSource.OFF
    # Before the loop: alone, then beside for the prefill (the worker prefills meanwhile); then one
    # call per round.
    assert threads.calls[:2] == ["alone", "beside"]
    per_round = threads.calls[2:]
    assert per_round[0] == "beside" and per_round[1:3] == (["beside"] * 2 if busy else ["alone"] * 2)
    assert out.sequences[0, PROMPT.shape[1] :].tolist() == hf_greedy(pair[0], 20)
