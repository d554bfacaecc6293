"""Decoding loops. Each takes a prompt and returns the new token ids, exactly as the target alone
would produce them (greedy) or distributed as the target alone would sample them.

Round structure of `speculative` (positions are explicit: the target cache holds the committed
sequence minus its last token `token`, which every round feeds first, as the root of the tree):
    draft      = drafter.propose(k)                    # a tree (or chain) of depth <= k
    logits     = target.forward([token, *draft])        # the root and every node, one forward
    path, next = verify(...)                            # accepted nodes, then the target's `next`
    target keeps token + the path's entries; `next` becomes the new `token`
"""

from __future__ import annotations

import time

import torch

from .cost_model import LookaheadController
from .drafters import Drafter, DraftSource, Proposal
from .placement import NoSplit, ThreadSplit
from .prespeculation import Draft
from .runner import ModelRunner
from .sampling import TokenSampler, pad_vocab
from .stats import GenerationStats
from .tree import TokenTree
from .verify import (
    one_hot_probs,
    verify_chain_greedy,
    verify_chain_sampled,
    verify_tree_greedy,
    verify_tree_sampled,
)
from .verify_reference import verify_tree_sampled_reference
from .workers import WorkerFailed


class StopRule:
    """When a generation ends: at max_new_tokens, after an end-of-sequence token, or where HF-style
    stopping `criteria` (stop strings, the user's own) first fire, judged as HF does, on the
    sequence after each new token. `streamer` (HF's streamer interface) receives the tokens that
    are final, as rounds accept them.
    """

    def __init__(
        self,
        max_new_tokens: int,
        eos_token_ids=frozenset(),
        criteria=None,
        history: list[int] = (),
        streamer=None,
    ):
        self.max_new_tokens = max_new_tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        self.criteria = criteria  # (input_ids [1, L], scores) -> bool tensor, like StoppingCriteriaList
        self.history = list(history)  # what precedes the new tokens: padding + prompt
        self.streamer = streamer
        self._scanned, self._stop_at, self._streamed = 0, None, 0

    def _scan(self, generated: list[int]) -> None:
        """Find the first new token that ends the sequence (each token is judged once)."""
        while self._stop_at is None and self._scanned < min(len(generated), self.max_new_tokens):
            i = self._scanned
            self._scanned += 1
            if generated[i] in self.eos_token_ids or (
                self.criteria is not None
                and bool(self.criteria(torch.tensor([self.history + generated[: i + 1]]), None).any())
            ):
                self._stop_at = i

    def remaining(self, generated: list[int]) -> int:
        return self.max_new_tokens - len(generated)

    def finished(self, generated: list[int]) -> bool:
        self._scan(generated)
        return self.remaining(generated) <= 0 or self._stop_at is not None

    def trim(self, generated: list[int]) -> list[int]:
        """Cut after the first token that ends the sequence, and at max_new_tokens."""
        self._scan(generated)
        end = self.max_new_tokens if self._stop_at is None else self._stop_at + 1
        return generated[:end]

    def stream(self, generated: list[int]) -> None:
        """Push the tokens that became final since the last call to the streamer."""
        if self.streamer is None:
            return
        final = self.trim(generated)
        if len(final) > self._streamed:
            self.streamer.put(torch.tensor(final[self._streamed :]))
            self._streamed = len(final)


def autoregressive(
    target: ModelRunner, prompt: list[int], sampler: TokenSampler, stop: StopRule, stats: GenerationStats
) -> list[int]:
    """The baseline: one target forward per token, on the same runner as every other method."""
    start = time.perf_counter()
    logits, stats.reused_prompt_tokens = target.feed(prompt)
    stats.prefill_seconds = time.perf_counter() - start
    generated = [sampler.choose(logits, prompt)]
    stop.stream(generated)
    # A compiled runner decodes plain greedy tokens in blocks (argmax fed back on the device).
    blocks = hasattr(target, "greedy_block") and sampler.greedy and not sampler.uses_history
    while not stop.finished(generated):
        tick = time.perf_counter()
        if blocks:
            new = target.greedy_block(generated[-1])
        else:
            new = [sampler.choose(target.forward(generated[-1:])[-1], prompt + generated)]
        before = len(generated)
        generated += new
        stop.stream(generated)
        seconds = (time.perf_counter() - tick) / len(new)
        # A round per output token, as without blocks (a block's tokens past a stop are dropped).
        for _ in range(len(stop.trim(generated)) - before):
            stats.record_round(0, 0, verify_seconds=seconds)
    return stop.trim(generated)


def speculative(
    target: ModelRunner,
    drafter: Drafter,
    prompt: list[int],
    sampler: TokenSampler,
    stop: StopRule,
    stats: GenerationStats,
    max_depth: int,
    lookahead: LookaheadController | None = None,
) -> list[int]:
    """Speculative decoding: the drafter proposes a chain or tree, the target checks it in one forward.

    With a `lookahead` controller each round's depth is chosen from measured costs and acceptance
    (0: this round is a plain target step); without one every round drafts max_depth.
    """
    start = time.perf_counter()
    logits, stats.reused_prompt_tokens = target.feed(prompt)
    stats.prefill_seconds = time.perf_counter() - start
    generated = [sampler.choose(logits, prompt)]
    stop.stream(generated)
    drafter.reset(prompt + generated)
    while not stop.finished(generated):
        # Never draft past max_new_tokens: a round emits at most depth + 1 tokens.
        depth = min(max_depth, stop.remaining(generated) - 1)
        depth = lookahead.choose(depth) if lookahead else depth
        tick = time.perf_counter()
        proposal = drafter.propose(depth) if depth else Proposal.empty()
        tock = time.perf_counter()
        base = target.length
        logits = target.forward([generated[-1], *proposal.tokens.tolist()], proposal.tree.under_root())
        path, next_token = verify_proposal(logits, proposal, sampler, prompt + generated)
        target.commit_path(base, [0] + [1 + node for node in path])
        drafter.commit(path, next_token)
        generated += proposal.tokens[path].tolist() + [next_token]
        stop.stream(generated)
        verify_seconds = time.perf_counter() - tock
        stats.record_round(len(proposal.tokens), len(path), proposal.source, tock - tick, verify_seconds)
        if lookahead:
            lookahead.observe(len(proposal.tokens), len(path), verify_seconds, tock - tick)
    return stop.trim(generated)


def verify_proposal(
    target_logits: torch.Tensor, proposal: Proposal, sampler: TokenSampler, history: list[int]
) -> tuple[list[int], int]:
    """Greedy or sampled verification of a proposal against target logits [1 + T, V].

    `history` is the committed sequence (its last token is the root); logits processors that look
    at earlier tokens score each node with history + the draft tokens down to it.
    """
    histories = None
    if sampler.uses_history:
        tokens = proposal.tokens.tolist()
        histories = [history] + [
            history + [tokens[n] for n in proposal.tree.path_to(node)] for node in range(len(tokens))
        ]
    chain = proposal.tree.is_chain
    if sampler.greedy:
        scores = sampler.scores(target_logits, histories) if sampler.uses_history else target_logits
        if chain:
            return verify_chain_greedy(scores, proposal.tokens)
        return verify_tree_greedy(scores, proposal.tokens, proposal.tree)
    p = sampler.probs(target_logits, histories)
    q = proposal.probs
    if q is None:
        q = one_hot_probs(proposal.tokens, max([p.shape[-1], *(proposal.tokens + 1).tolist()]))
    width = max(p.shape[-1], q.shape[-1])
    p, q = pad_vocab(p, width), pad_vocab(q.to(p.device), width)
    if chain:
        return verify_chain_sampled(p, q, proposal.tokens, sampler)
    if p.device.type == "cpu":
        # The tensor version computes a residual for every parent and sibling rank, the walk only
        # along its path; where a host read costs nothing that wins (a 44-node tree over 152k ids:
        # 3 ms against 57 ms on one core). Both give identical results (tests/test_verify_tree.py).
        return verify_tree_sampled_reference(p, q, proposal.tokens, proposal.tree, sampler)
    return verify_tree_sampled(p, q, proposal.tokens, proposal.tree, sampler)


def saguaro(
    target: ModelRunner,
    worker,
    prompt: list[int],
    sampler: TokenSampler,
    stop: StopRule,
    stats: GenerationStats,
    fallback,
    lookahead: LookaheadController | None = None,
    threads: ThreadSplit | None = None,
) -> list[int]:
    """Speculative speculative decoding: the next draft was prepared while the target verified.

    `worker` (a workers.DraftWorker) hands over a draft for the committed sequence and, after each
    verification, the next one: from its speculation cache on a hit, drafted afresh on a miss.
    If it fails, `fallback(error)` returns the worker to use from then on (drafting inline), and
    generation goes on with no token lost: the target's state never depends on the worker.
    `threads` gives the target every core while the drafter idles and the rest while it works.
    A `lookahead` controller may verify only a prefix of each draft, or none (speculation off: the
    worker idles, and catches up with the sequence when drafting pays again).
    """
    threads = threads or NoSplit()
    threads.alone()
    seed = int(torch.randint(0, 2**62, (), generator=sampler.generator))  # the drafter's own RNG
    # Where speculation does not pay (as measured so far), the call starts with plain steps: the
    # target prefills on every core, and the worker first hears of this sequence if a probe drafts.
    speculating = lookahead is None or lookahead.choose(stop.max_new_tokens - 1) > 0
    synced = speculating  # whether the worker follows this call's sequence
    prefill = None
    if speculating and worker.concurrent:  # the drafter prefills the prompt on its own core meanwhile
        try:
            prefill = worker.begin("reset", prompt, sampler.config, seed, False)
            threads.beside_drafter()
        except WorkerFailed as error:
            stats.worker_failures += 1
            worker = fallback(error)
    start = time.perf_counter()
    logits, stats.reused_prompt_tokens = target.feed(prompt)
    stats.prefill_seconds = time.perf_counter() - start
    generated = [sampler.choose(logits, prompt)]
    stop.stream(generated)

    def ask(call, *args):
        nonlocal worker, waited
        tick = time.perf_counter()
        try:
            draft = call(worker)(*args)
        except WorkerFailed as error:
            stats.worker_failures += 1
            worker = fallback(error)
            draft = worker.reset(prompt + generated, sampler.config, seed)
        waited = time.perf_counter() - tick  # the target waiting for a draft
        stats.drafter_busy_seconds += draft.busy_seconds
        return draft

    waited = 0.0
    if not speculating:
        draft = Draft([], None, DraftSource.OFF)
    elif prefill is not None:
        draft = ask(lambda w: w.end, prefill)  # an empty draft, unless the worker failed meanwhile
        if draft.source == DraftSource.OFF:
            prefill_wait = waited  # the drafter's prefill outlasting the target's counts as waiting too
            draft = ask(lambda w: w.catch_up, prompt + generated)
            waited += prefill_wait
    else:
        draft = ask(lambda w: w.reset, prompt + generated, sampler.config, seed)
    while not stop.finished(generated):
        depth = min(len(draft.tokens), stop.remaining(generated) - 1)
        tree = TokenTree.chain(depth)
        probs = None if draft.probs is None else draft.probs[:depth]
        proposal = Proposal(torch.tensor(draft.tokens[:depth], dtype=torch.long), probs, tree)
        if worker.concurrent and draft.source != DraftSource.OFF:
            threads.beside_drafter()  # the worker pre-speculates during this verification
        else:
            threads.alone()
        tick = time.perf_counter()
        base = target.length
        logits = target.forward([generated[-1], *draft.tokens[:depth]], tree.under_root())
        path, next_token = verify_proposal(logits, proposal, sampler, prompt + generated)
        target.rollback(base + 1 + len(path))
        verify_seconds = time.perf_counter() - tick
        stats.record_round(depth, len(path), draft.source, waited, verify_seconds, draft.prepared_branches)
        if lookahead:
            lookahead.observe(depth, len(path), verify_seconds, waited)
        generated += draft.tokens[: len(path)] + [next_token]
        stop.stream(generated)
        if not stop.finished(generated):
            # The next round's depth is chosen now, so the worker pre-speculates for that depth.
            limit = stop.remaining(generated) - 1
            depth = lookahead.choose(limit) if lookahead else limit
            if depth == 0:  # speculation loses here: a plain target step; the worker idles
                draft, waited = Draft([], None, DraftSource.OFF), 0.0
            elif draft.source == DraftSource.OFF and synced:
                draft = ask(lambda w: w.catch_up, prompt + generated, depth)
            elif draft.source == DraftSource.OFF:  # the first draft of this call
                draft = ask(lambda w: w.reset, prompt + generated, sampler.config, seed)
                synced = True
            else:
                draft = ask(lambda w: w.resolve, len(path), next_token, verify_seconds, depth)
    return stop.trim(generated)
