"""Batched speculative decoding with ragged acceptance over a live batch: every live row verified
in one target forward per round, each row accepting its own count; rows join between rounds and
leave the moment they finish.

Round structure (rows of a `BatchedRunner`; see decode/engines.py for one row):
    drafts       = drafter.propose(depth per row)             # one batched draft forward per level
    logits       = target.forward([[token_b, *drafts_b]])     # all rows, one forward, [B, 1 + T, V]
    path_b, next = verify_proposal(logits[b], ...)            # per row, as engines.speculative does
    target.keep(1 + len(path_b)) per row: the rest of the row's slots become holes
The depth is chosen for the batch by a `LookaheadController` per live batch size (verify cost
grows with rows x tokens): 0 is a plain batched target step, so where speculation loses the loop
is HF's batched greedy.

`LiveBatch.prefill` feeds waiting prompts (packed, in chunks of a token budget if asked, each on
top of its prefix-cache hit) and joins the complete ones to the running caches; `leave` drops
finished, failed or cancelled rows from both caches, storing their KV for later prompts that
start like them. A fixed batch (`batched_speculative`) is one prefill and rounds until every row
has left; the serving engine (saguaro/engine/) keeps one running as requests come and go. A row's
own failure (its sampler or stopping rule raising) is its `error`: it leaves, the others go on.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

from saguaro.decode.batched_drafters import BatchedModelDrafter, PerRowDrafters
from saguaro.decode.engines import StopRule, verify_proposal, warn_broken_draft
from saguaro.decode.sampling import BrokenDraft, TokenSampler
from saguaro.decode.stats import GenerationStats
from saguaro.draft.stream import Draft
from saguaro.model.batched_runner import BatchedRunner
from saguaro.model.prefix_cache import KV
from saguaro.tune.cost_model import AcceptanceCounter, BatchLookaheads

# A compaction (every row's entries copied afresh, right-aligned) pays once it would cut the cache's
# width (what every later forward attends over) by more than this share and this many slots.
COMPACT_SHRINK = 0.5
COMPACT_MIN_SLOTS = 64


@dataclass(eq=False)
class Sequence:
    """One row's request: its prompt, how it samples and stops, and what it has generated."""

    prompt: list[int]
    sampler: TokenSampler
    stop: StopRule
    stats: GenerationStats
    generated: list[int] = field(default_factory=list)
    error: BaseException | None = None  # what failed in this row alone
    prefilled: int | None = None  # prompt tokens whose target KV exists (None: not looked up yet)
    entries: KV = field(default_factory=list)  # that KV, while the prompt is not in the batch
    acceptance: AcceptanceCounter | None = None  # its own: the batch lasts as long as its slowest row
    copy_acceptance: AcceptanceCounter | None = None  # that of its suffix copies
    started: float = 0.0  # when its prefill began (perf_counter)

    @property
    def finished(self) -> bool:
        if self.error is None:
            try:
                return self.stop.finished(self.generated)
            except Exception as error:  # a stopping criterion of this row's failed
                self.error = error
        return True

    def output(self) -> list[int]:
        """The new tokens, trimmed where the sequence ended."""
        return self.stop.trim(self.generated)


class LiveBatch:
    """The rows decoding together on `target` (a `BatchedRunner`) and `drafter` (from
    decode/batched_drafters.py, or None for plain batched steps).

    With `eager_draft` a joining row's draft prefill runs as it joins, not when speculation first
    needs it (see `BatchedModelDrafter.add_rows`), where the draft model drafts at the batch's new
    size. With `copy_lookaheads` (a draft model's drafter, which keeps a suffix index), each round
    also weighs the rows' suffix copies (free) with their own controller for this size, and they
    serve the round where they promise to finish the batch sooner than the model's drafts or a
    plain step: on a CPU, a few rows cost about one row's step but every token a row verifies adds
    to it, and there a draft model's forwards and prefills often cost more than its drafts save,
    while copies of repeated text cost nothing."""

    def __init__(
        self,
        target: BatchedRunner,
        drafter: BatchedModelDrafter | PerRowDrafters | None,
        max_depth: int,
        lookaheads: BatchLookaheads | None = None,
        eager_draft: bool = False,
        copy_lookaheads: BatchLookaheads | None = None,
    ):
        self.target, self.drafter, self.max_depth, self.lookaheads = target, drafter, max_depth, lookaheads
        self.eager_draft, self.copy_lookaheads = eager_draft, copy_lookaheads
        self.rows: list[Sequence] = []
        target.start(0)
        if drafter is not None:
            drafter.reset([])

    def prefill(self, waiting: list[Sequence], budget: int | None = None) -> list[Sequence]:
        """Feed up to `budget` prompt tokens (None: all) of the `waiting` sequences, in order, each
        on top of what it has (its prefix-cache hit, its earlier chunks), in one packed forward;
        those whose prompt is complete join the batch with their first token and are returned.

        Each prompt's KV so far goes into the prefix cache after every chunk, and a prompt looks
        the cache up whenever it gets its turn: requests behind one system prompt that arrive
        together compute it once, chunk by chunk, whoever is first."""
        tick = time.perf_counter()
        fed, chunks = [], []
        for sequence in waiting:
            if budget is not None and sum(map(len, chunks)) >= budget:
                break
            (hit,), (kv,) = self.target.lookup([sequence.prompt])
            if sequence.prefilled is None:
                sequence.started, sequence.prefilled = tick, 0
            if hit > sequence.prefilled:
                sequence.stats.reused_prompt_tokens += hit - sequence.prefilled
                sequence.prefilled, sequence.entries = hit, kv
            take = len(sequence.prompt) - sequence.prefilled
            if budget is not None:
                take = min(take, budget - sum(map(len, chunks)))
            fed.append(sequence)
            chunks.append(sequence.prompt[sequence.prefilled : sequence.prefilled + take])
        if not fed:
            return []
        logits, entries = self.target.extend([sequence.entries for sequence in fed], chunks)
        seconds = time.perf_counter() - tick
        joining, first_logits = [], []
        for sequence, chunk, row_logits, kv in zip(fed, chunks, logits, entries):
            sequence.prefilled += len(chunk)
            sequence.entries = kv
            sequence.stats.prefill_seconds += seconds
            if sequence.prefilled == len(sequence.prompt):
                joining.append(sequence)
                first_logits.append(row_logits)
        self.target.store([s.prompt[: s.prefilled] for s in fed], [s.entries for s in fed])
        if joining:
            self._join(joining, first_logits)
        return joining

    def _join(self, joining: list[Sequence], logits: list) -> None:
        self.target.join([s.entries for s in joining])
        for sequence, row_logits in zip(joining, logits):
            sequence.entries = []
            sequence.acceptance = AcceptanceCounter(self.max_depth)
            sequence.copy_acceptance = AcceptanceCounter(self.max_depth)
            try:
                sequence.generated = [sequence.sampler.choose(row_logits, sequence.prompt)]
                sequence.stop.stream(sequence.generated)
            except Exception as error:
                sequence.error = error
        self.rows += joining
        if self.drafter is not None:
            eager = self.eager_draft and (self.lookaheads is None or self.lookaheads(len(self.rows)).drafting)
            self.drafter.add_rows(
                [s.prompt + s.generated for s in joining], [s.sampler.drafting() for s in joining], eager
            )

    def leave(self, going: set[Sequence] = frozenset()) -> list[Sequence]:
        """Drop the rows that finished or failed, and those in `going` (cancelled); return them.
        A row's KV (prompt + what it generated) goes to the prefix caches first, unless it failed."""
        leaving = [sequence for sequence in self.rows if sequence in going or sequence.finished]
        if not leaving:
            return []
        now = time.perf_counter()
        for index, sequence in enumerate(self.rows):
            if sequence not in leaving:
                continue
            sequence.stats.total_seconds = now - sequence.started
            if sequence.error is None:
                self.target.remember(index, sequence.prompt + sequence.output())
                if self.drafter is not None:
                    self.drafter.remember(index)
        staying = [index for index, sequence in enumerate(self.rows) if sequence not in leaving]
        self.rows = [self.rows[index] for index in staying]
        if not self.rows:  # an empty batch starts afresh: no holes carried over
            self.target.start(0)
            if self.drafter is not None:
                self.drafter.reset([])
            return leaving
        self.target.keep_rows(staying)
        if self.drafter is not None:
            self.drafter.keep_rows(staying)
        target = self.target
        cut = target.slots - int(target.visible.sum(1).max())  # the width a compaction would save
        if cut > max(COMPACT_MIN_SLOTS, COMPACT_SHRINK * target.slots):
            target.compact()
            if self.drafter is not None:
                self.drafter.compact()
        return leaving

    def round(self) -> None:
        """One speculative round (or plain step) over every live row; `leave` drops those it finished."""
        rows, drafter = self.rows, self.drafter
        # Never draft past a row's max_new_tokens: its round emits at most depth + 1 tokens.
        limits = [min(self.max_depth, row.stop.remaining(row.generated) - 1) for row in rows]
        lookahead, depth, seconds = self._depth(self.lookaheads, max(limits), copying=False)
        if depth and lookahead and drafter is not None:
            # The drafter first feeds what it lacks (the prompts, the tokens of plain steps): worth
            # it only if speculation saves more than that over what the longest row has left.
            longest = max(row.stop.remaining(row.generated) for row in rows)
            if not lookahead.worth_catching_up(drafter.catch_up_tokens(), longest):
                depth = 0
        copies = None
        if lookahead and self.copy_lookaheads is not None and drafter is not None:
            # Copies cost nothing to find: the depth is chosen knowing which rows have one, and how
            # long (a row without one gains nothing from a wider round, which all rows pay for);
            # they serve the round if they promise to finish the batch sooner than the model's drafts.
            found = drafter.copies(limits)
            caps = [len(copy.tokens) for copy in found]
            copy_lookahead, copy_depth, copy_seconds = self._depth(
                self.copy_lookaheads, max(caps), copying=True, caps=caps
            )
            if copy_depth and (not depth or copy_seconds < seconds):
                lookahead.skip()
                copies, lookahead, depth = found, copy_lookahead, copy_depth
        copying = copies is not None
        depths = [min(depth, limit) for limit in limits] if drafter is not None else [0] * len(rows)
        tick = time.perf_counter()
        try:
            if not max(depths):
                proposals = [Draft.off()] * len(rows)
            elif copying:
                proposals = [Draft(c.tokens[:d], None, c.source) for c, d in zip(copies, depths)]
            else:
                proposals = drafter.propose(depths)
        except BrokenDraft as error:
            warn_broken_draft(error)
            self.drafter = drafter = None  # plain batched steps for the rest of the batch
            lookahead = None
            proposals = [Draft.off()] * len(rows)
        tock = time.perf_counter()
        mark = self.target.mark()
        fed = [[row.generated[-1], *proposal.tokens] for row, proposal in zip(rows, proposals)]
        logits = self.target.forward(fed)
        emitted = []
        for i, (row, proposal) in enumerate(zip(rows, proposals)):
            try:
                path, next_token = verify_proposal(
                    logits[i, : 1 + len(proposal.tokens)], proposal, row.sampler, row.prompt + row.generated
                )
                emitted.append([proposal.tokens[node] for node in path] + [next_token])
            except Exception as error:  # this row's own (its sampler): it emits nothing and leaves
                row.error = error
                emitted.append([])
        self.target.keep(mark, [len(tokens) for tokens in emitted])
        if drafter is not None:  # after a plain step it catches up on its next propose
            drafter.commit(emitted)
        verify_seconds = time.perf_counter() - tock
        for row, proposal, tokens in zip(rows, proposals, emitted):
            row.generated += tokens
            if proposal.tokens and tokens:
                counter = row.copy_acceptance if copying else row.acceptance
                counter.observe(len(proposal.tokens), len(tokens) - 1)
            row.stats.record_round(
                len(proposal.tokens), max(len(tokens) - 1, 0), proposal.source, tock - tick, verify_seconds
            )
            if row.error is None:
                try:
                    row.stop.stream(row.generated)
                except Exception as error:
                    row.error = error
        if lookahead:
            drafted = [len(proposal.tokens) for proposal in proposals]
            draft_seconds = drafter.round_seconds if max(depths) and not copying else 0.0
            accepted = [max(len(tokens) - 1, 0) for tokens in emitted]
            lookahead.observe_rows(drafted, accepted, verify_seconds, draft_seconds)
            for lookaheads in (self.lookaheads, self.copy_lookaheads):
                other = lookaheads(len(rows)) if lookaheads is not None else lookahead
                if other is not lookahead:  # a round of this width costs the same whoever drafted it
                    other.verify.observe(max(drafted) + 1, verify_seconds)
            if max(depths) and not copying and drafter.catch_up is not None:
                lookahead.observe_catch_up(*drafter.catch_up)

    def _depth(self, lookaheads: BatchLookaheads | None, limit: int, copying: bool, caps=None):
        """(the controller for this batch size or None, the draft depth it chooses up to `limit`,
        the seconds it expects the batch to take at that depth: 0 before it has measured any),
        from each row's acceptance of the model's drafts or, `copying`, of its suffix copies, each
        row drafting at most its cap (None: the depth)."""
        if lookaheads is None:
            return None, limit, 0.0
        lookahead = lookaheads(len(self.rows))
        remaining = [
            (row.stop.remaining(row.generated), row.copy_acceptance if copying else row.acceptance, cap)
            for row, cap in zip(self.rows, caps or [None] * len(self.rows))
        ]
        cost = functools.partial(lookaheads.round_seconds, current=lookahead)
        depth = lookahead.choose(limit, remaining, cost)
        return lookahead, depth, lookahead.batch_seconds(depth, remaining, cost) if lookahead.verify else 0.0


def batched_speculative(
    target: BatchedRunner,
    drafter: BatchedModelDrafter | PerRowDrafters | None,
    prompts: list[list[int]],
    samplers: list[TokenSampler],
    stops: list[StopRule],
    stats: list[GenerationStats],
    max_depth: int,
    lookaheads: BatchLookaheads | None = None,
) -> list[list[int]]:
    """Every row's new tokens, each exactly as the row alone would get them.

    `drafter` None decodes with plain batched steps. `lookaheads(live rows)` gives the
    `LookaheadController` for a batch of that size (None: every round drafts max_depth), which
    chooses the depth that finishes every live row soonest. A row's own error is raised once
    the other rows are done.
    """
    batch = LiveBatch(target, drafter, max_depth, lookaheads)
    sequences = [Sequence(*row) for row in zip(prompts, samplers, stops, stats)]
    batch.prefill(sequences)
    batch.leave()
    while batch.rows:
        batch.round()
        batch.leave()
    for sequence in sequences:
        if sequence.error is not None:
            raise sequence.error
    return [sequence.output() for sequence in sequences]
