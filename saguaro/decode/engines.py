"""Decoding loops. Each takes a prompt and returns the new token ids, exactly as the target alone
would produce them (greedy) or distributed as the target alone would sample them.

`autoregressive` is the baseline; `speculative` serves every drafting method (speculative, tree,
prompt_lookup, saguaro) through the one draft protocol (draft/stream.py). Round structure
(positions are explicit: the target cache holds the committed sequence minus its last token
`token`, which every round feeds first, as the root of the tree):
    logits     = target.forward([token, *draft])        # the root and every node, one forward
    path, next = verify(...)                            # accepted nodes, then the target's `next`
    target keeps token + the path's entries; `next` becomes the new `token`
    k          = lookahead.choose(...)                  # the next round's depth (0: a plain step)
    draft      = drafts.resolve(path, next, ..., k)     # a tree (or chain) of depth <= k
"""

from __future__ import annotations

import time

import torch

from saguaro.decode.sampling import BrokenDraft, TokenSampler, pad_vocab
from saguaro.decode.stats import GenerationStats
from saguaro.decode.verify import (
    one_hot_probs,
    verify_chain_greedy,
    verify_chain_sampled,
    verify_tree_greedy,
    verify_tree_sampled,
)
from saguaro.decode.verify_walk import verify_tree_sampled_walk
from saguaro.draft.stream import CatchUp, Draft, DraftRequest, DraftSource, DraftStream, Reset, Resolve
from saguaro.faults import WorkerFailed, warn
from saguaro.model.placement import NoSplit, ThreadSplit
from saguaro.model.runner import ModelRunner
from saguaro.model.static_cache import growth_count
from saguaro.tune.cost_model import LookaheadController


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


def warn_broken_draft(error: BrokenDraft) -> None:
    """Once per call: drafting stops, decoding goes on with plain target steps."""
    warn(
        f"saguaro: {error}; decoding without drafts for the rest of this call (the output stays "
        "exact, only speed is lost). Check the draft model: its weights, or a dtype it overflows in",
        stacklevel=5,
    )


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
    blocks = target.greedy_steps and sampler.greedy and not sampler.uses_history
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
    drafts: DraftStream,
    prompt: list[int],
    sampler: TokenSampler,
    stop: StopRule,
    stats: GenerationStats,
    max_depth: int,
    lookahead: LookaheadController | None = None,
    threads: ThreadSplit | None = None,
    fallback=None,
) -> list[int]:
    """Speculative decoding, whoever drafts: `drafts` hands over a chain or a tree, the target checks
    it in one forward, and the outcome goes back to `drafts`, which hands over the next draft.

    `drafts` is a DraftStream: a drafter drafting inline when asked (speculative, tree,
    prompt_lookup) or the Saguaro worker, whose next draft was prepared while the target verified.
    With a `lookahead` controller each round's depth is chosen from measured costs and acceptance
    before the draft is asked for (0: a plain target step; the stream idles, and catches up with the
    sequence when drafting pays again); without one every round drafts max_depth. While a
    concurrent stream drafts, `threads` gives the target the cores the drafter leaves (all of
    them while it idles). If the worker fails, `fallback(error)` returns the stream to use from
    then on (drafting inline), and generation goes on with no token lost: the target's state never
    depends on the drafter.
    """
    threads = threads or NoSplit()
    threads.alone()
    broken = False  # the draft's probabilities were not finite: no drafts for the rest of the call
    no_draft = object()  # the ticket of a request the broken draft could not answer

    def drafting_broke(error: BrokenDraft) -> Draft:
        nonlocal broken
        if not broken:
            warn_broken_draft(error)
        broken = True
        return Draft.off()

    def replace(error: WorkerFailed) -> None:
        nonlocal drafts
        if fallback is None:
            raise error
        stats.worker_failures += 1
        drafts = fallback(error)

    def request(call: DraftRequest):
        """Send a call to the stream: its ticket, or None if the worker failed."""
        try:
            return drafts.begin(call)
        except WorkerFailed as error:
            replace(error)
            return None
        except BrokenDraft as error:
            drafting_broke(error)
            return no_draft

    def collect(ticket, depth: int) -> Draft:
        """The draft of call `ticket`; after a failure, the fallback's draft for the committed sequence."""
        if ticket is no_draft:
            return Draft.off()
        try:
            if ticket is not None:
                try:
                    draft = drafts.end(ticket)
                except WorkerFailed as error:
                    replace(error)
                    ticket = None
            if ticket is None:
                draft = drafts.reset(prompt + generated, depth)
        except BrokenDraft as error:
            return drafting_broke(error)
        stats.drafter_busy_seconds += draft.busy_seconds
        return draft

    # Never draft past max_new_tokens: a round emits at most depth + 1 tokens.
    limit = max(0, min(max_depth, stop.max_new_tokens - 2))
    depth = lookahead.choose(limit) if lookahead else limit
    # Where speculation does not pay (as measured so far), the call starts with plain steps: the
    # stream first hears of this sequence if a probe drafts.
    synced = depth > 0  # whether the stream follows this call's sequence
    waited = 0.0  # the target waiting for the next draft
    if synced:  # the drafter prefills the prompt meanwhile (a worker, on its own cores)
        tick = time.perf_counter()
        prefill = request(Reset(prompt, depth, False))
        waited = time.perf_counter() - tick
        if drafts.concurrent:
            threads.beside_drafter()
    start = time.perf_counter()
    logits, stats.reused_prompt_tokens = target.feed(prompt)
    stats.prefill_seconds = time.perf_counter() - start
    generated = [sampler.choose(logits, prompt)]
    stop.stream(generated)
    draft, resolved = Draft.off(), False
    if synced:
        tick = time.perf_counter()
        draft = collect(prefill, depth)  # no draft, unless the worker failed meanwhile
        if draft.source == DraftSource.OFF:
            draft = collect(request(CatchUp(prompt + generated, depth)), depth)
        waited += time.perf_counter() - tick  # a drafter prefill outlasting the target's is waited for
    grown = growth_count()  # a static cache growing (compile=True) recompiles within a round
    while not stop.finished(generated):
        # The worker pre-speculates during this verification, or is still finishing the last one
        # before a plain step: beside it, the target keeps to the cores it leaves (taking them back
        # between layers once it is done, placement.hand_back_when_idle), instead of both
        # oversubscribing the cores (a plain step then took 3.5x as long on two, and the adaptive
        # length measured it so).
        worker_busy = drafts.working is not None and drafts.working.value
        if drafts.concurrent and (draft.source != DraftSource.OFF or worker_busy):
            threads.beside_drafter()
        else:
            threads.alone()
        tick = time.perf_counter()
        base = target.length
        logits = target.forward([generated[-1], *draft.tokens], draft.tree.under_root())
        path, next_token = verify_proposal(logits, draft, sampler, prompt + generated)
        target.commit_path(base, [0] + [1 + node for node in path])
        verify_seconds = time.perf_counter() - tick
        stats.record_round(
            len(draft.tokens),
            len(path),
            draft.source,
            waited,
            verify_seconds,
            draft.prepared_branches,
            depth=max(draft.tree.depths(), default=-1) + 1,
        )
        if lookahead and growth_count() == grown:
            # Only a resolved round's wait is a usual round's drafting: a first draft after the
            # prefill or a run of plain steps (reset, catch_up) also fed what the drafter lacked.
            # A round in which a static cache grew (its draft or its verification) timed mostly
            # compiling: measured, it would hold speculation off for long after.
            lookahead.observe(len(draft.tokens), len(path), verify_seconds, waited if resolved else None)
        grown = growth_count()
        generated += [draft.tokens[node] for node in path] + [next_token]
        # The next round's depth is chosen now, so that a worker prepares drafts of that depth.
        depth = 0
        if not stop.finished(generated) and not broken:
            limit = min(max_depth, stop.remaining(generated) - 1)
            depth = lookahead.choose(limit) if lookahead else limit
        if depth == 0:  # the end, or speculation loses here: a plain target step, the stream idles
            if draft.source != DraftSource.OFF:  # a worker prepares for an outcome it will not get
                drafts.pause()
            stop.stream(generated)
            draft, waited, resolved = Draft.off(), 0.0, False
            continue
        tick = time.perf_counter()
        resolved = draft.source != DraftSource.OFF
        if resolved:
            ticket = request(Resolve(path, next_token, verify_seconds, depth))
        elif synced:
            ticket = request(CatchUp(prompt + generated, depth))
        else:  # the first draft of this call
            ticket, synced = request(Reset(prompt + generated, depth, True)), True
        waited = time.perf_counter() - tick
        stop.stream(generated)  # the caller's streamer runs while the drafter answers
        tick = time.perf_counter()
        draft = collect(ticket, depth)
        waited += time.perf_counter() - tick
    return stop.trim(generated)


def verify_proposal(
    target_logits: torch.Tensor, draft: Draft, sampler: TokenSampler, history: list[int]
) -> tuple[list[int], int]:
    """Greedy or sampled verification of a draft (chain or tree) against target logits [1 + T, V].

    `history` is the committed sequence (its last token is the root); logits processors that look
    at earlier tokens score each node with history + the draft tokens down to it.
    """
    tokens, tree = torch.tensor(draft.tokens, dtype=torch.long), draft.tree
    histories = None
    if sampler.uses_history:
        histories = [history] + [
            history + [draft.tokens[n] for n in tree.path_to(node)] for node in range(len(tree))
        ]
    chain = tree.is_chain
    if sampler.greedy:
        scores = sampler.scores(target_logits, histories) if sampler.uses_history else target_logits
        if chain:
            return verify_chain_greedy(scores, tokens)
        return verify_tree_greedy(scores, tokens, tree)
    p = sampler.probs(target_logits, histories)
    q = draft.probs
    if q is None:
        q = one_hot_probs(tokens, max([p.shape[-1], *(tokens + 1).tolist()]))
    width = max(p.shape[-1], q.shape[-1])
    p, q = pad_vocab(p, width), pad_vocab(q.to(p.device), width)
    if chain:
        return verify_chain_sampled(p, q, tokens, sampler)
    if p.device.type == "cpu":
        # The tensor version computes a residual for every parent and sibling rank, the walk only
        # along its path; where a host read costs nothing that wins (a 44-node tree over 152k ids:
        # 3 ms against 57 ms on one core). Both give identical results (tests/test_verify_tree.py).
        return verify_tree_sampled_walk(p, q, tokens, tree, sampler)
    return verify_tree_sampled(p, q, tokens, tree, sampler)
