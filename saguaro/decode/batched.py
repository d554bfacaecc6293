"""Batched speculative decoding with ragged acceptance: every live row verified in one target
forward per round, each row accepting its own count.

Round structure (rows of a `BatchedRunner`; see decode/engines.py for one row):
    drafts       = drafter.propose(depth per row)             # one batched draft forward per level
    logits       = target.forward([[token_b, *drafts_b]])     # all rows, one forward, [B, 1 + T, V]
    path_b, next = verify_proposal(logits[b], ...)            # per row, as engines.speculative does
    target.keep(1 + len(path_b)) per row: the rest of the row's slots become holes
Finished rows drop out of both caches. The depth is chosen for the batch by a `LookaheadController`
per live batch size (verify cost grows with rows x tokens): 0 is a plain batched target step,
so where speculation loses the loop is HF's batched greedy.
"""

from __future__ import annotations

import functools
import time

import torch

from saguaro.decode.engines import StopRule, verify_proposal, warn_broken_draft
from saguaro.decode.sampling import BrokenDraft, TokenSampler, check_drafted, drawable, greedy_choice
from saguaro.decode.stats import GenerationStats
from saguaro.draft.drafters import Drafter
from saguaro.draft.stream import Draft
from saguaro.model.batched_runner import BatchedRunner
from saguaro.model.prefix_cache import PrefixCache
from saguaro.tune.cost_model import AcceptanceCounter, BatchLookaheads


class BatchedModelDrafter:
    """A small causal LM drafting a chain for every row at once, on its own `BatchedRunner`.

    Its cache holds each row's committed tokens up to `fed[row]`; propose() first feeds the rest
    (ragged: one token after a rejection, two after a fully accepted chain, more after plain
    steps), then draws one token per row per level. `sampler` (the rows' common drafting sampler)
    draws each row's token from the q it reports, which keeps sampled verification exact.
    """

    def __init__(
        self,
        model,
        sampler: TokenSampler,
        vocab_size: int | None = None,
        prefix_cache: PrefixCache | None = None,
    ):
        self.runner = BatchedRunner(model, prefix_cache)
        self.sampler = sampler
        self.vocab_size = vocab_size  # the draft never proposes ids the target cannot emit
        self.committed: list[list[int]] = []
        self.fed: list[int] = []
        self._mark = None
        self._drafted_fed = 0  # draft levels of the last proposal fed to the cache
        self.round_seconds: float | None = None  # see propose
        self.catch_up: tuple[int, float] | None = None  # a one-off catch-up: (tokens, seconds)

    def reset(self, rows: list[list[int]]) -> None:
        self.runner.start(len(rows))
        self.committed = [list(row) for row in rows]
        self.fed = [0] * len(rows)
        self._mark, self._drafted_fed = None, 0

    def propose(self, depths: list[int]) -> list[Draft]:
        pending = [row[fed:] for row, fed in zip(self.committed, self.fed)]
        # Left-padded, so every row's last token is in the last column, the only one whose logits
        # are needed: the prompt at first, then one or two tokens per row (more after plain steps).
        start = time.perf_counter()
        if any(self.fed):
            logits = self.runner.forward(pending, align_right=True, last_only=True)[:, -1]
        else:  # the prompts, from the draft's prefix cache as far as it holds them
            logits = self.runner.prefill(pending)[0]
        logits = logits[:, : self.vocab_size]
        catch_up_seconds = time.perf_counter() - start
        self.fed = [len(row) for row in self.committed]
        self._mark = self.runner.mark()
        tokens, probs, level_seconds, finite = [], [], [], []
        for level in range(max(depths)):
            if self.sampler.greedy:  # no q to report: greedy verification compares ids
                drawn = greedy_choice(self.sampler.scores(logits))
            else:
                q, ok = drawable(self.sampler.probs(logits))  # a broken draft must not break the draw
                probs.append(q)
                finite.append(ok)
                drawn = self.sampler.draw(q)
            tokens.append(drawn)
            if level + 1 < max(depths):  # the last level is fed next round, if it is kept
                start = time.perf_counter()
                logits = self.runner.forward([[int(t)] for t in drawn])[:, -1, : self.vocab_size]
                level_seconds.append(time.perf_counter() - start)
        # What drafting these depths costs a round once the drafter keeps up (a catch-up of one or
        # two tokens per row), for the draft-length controller: a prefill, or a catch-up after
        # plain steps, is a one-off that must not make every later round look expensive.
        width = max(len(row) for row in pending)
        self.catch_up = None if width <= 2 else (width * len(pending), catch_up_seconds)
        if width <= 2:
            self.round_seconds = catch_up_seconds + sum(level_seconds)
        elif level_seconds:
            self.round_seconds = sum(level_seconds) * (len(level_seconds) + 1) / len(level_seconds)
        else:
            self.round_seconds = None
        self._drafted_fed = max(max(depths) - 1, 0)
        check_drafted([], finite)
        tokens = torch.stack(tokens, 1).tolist()  # [B][levels], one host read
        probs = None if self.sampler.greedy else torch.stack(probs, 1)  # [B, levels, V]
        drafts = []
        for row, depth in enumerate(depths):
            row_probs = None if probs is None else probs[row, :depth]
            drafts.append(Draft(tokens[row][:depth], row_probs))
        return drafts

    def catch_up_tokens(self) -> int:
        """What the next propose() feeds before it drafts (rows x the widest row's pending tokens)."""
        return len(self.committed) * max(len(row) - fed for row, fed in zip(self.committed, self.fed))

    def commit(self, accepted: list[list[int]]) -> None:
        """Each row's accepted drafts, then its next token (the whole of what the round emitted)."""
        if self._mark is not None:
            kept = [min(len(emitted) - 1, self._drafted_fed) for emitted in accepted]
            self.runner.keep(self._mark, kept)
            self.fed = [fed + k for fed, k in zip(self.fed, kept)]
        for row, emitted in zip(self.committed, accepted):
            row += emitted
        self._mark, self._drafted_fed = None, 0

    def remember(self, index: int) -> None:
        """Store what the draft's cache holds of row `index` for later calls."""
        self.runner.remember(index, self.committed[index])

    def keep_rows(self, indices: list[int]) -> None:
        self.runner.keep_rows(indices)
        self.committed = [self.committed[i] for i in indices]
        self.fed = [self.fed[i] for i in indices]


class PerRowDrafters:
    """Model-free drafters (prompt lookup) batched the trivial way: one per row, no forwards."""

    round_seconds = None  # drafting is free: the controller counts no draft cost
    catch_up = None  # and there is nothing to catch up on

    def catch_up_tokens(self) -> int:
        return 0

    def __init__(self, make_drafter):
        self.make_drafter = make_drafter
        self.drafters: list[Drafter] = []

    def reset(self, rows: list[list[int]]) -> None:
        self.drafters = [self.make_drafter() for _ in rows]
        for drafter, row in zip(self.drafters, rows):
            drafter.reset(row)

    def propose(self, depths: list[int]) -> list[Draft]:
        return [drafter.propose(depth) for drafter, depth in zip(self.drafters, depths)]

    def commit(self, accepted: list[list[int]]) -> None:
        for drafter, emitted in zip(self.drafters, accepted):
            drafter.commit(list(range(len(emitted) - 1)), emitted[-1])

    def remember(self, index: int) -> None:
        """Nothing to store: no model, no KV."""

    def keep_rows(self, indices: list[int]) -> None:
        self.drafters = [self.drafters[i] for i in indices]


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
    chooses the depth that finishes every live row soonest.
    """
    start = time.perf_counter()
    logits, reused = target.prefill(prompts)
    prefill_seconds = time.perf_counter() - start
    generated = [[sampler.choose(row, prompt)] for row, sampler, prompt in zip(logits, samplers, prompts)]
    for row_stats, row_reused in zip(stats, reused):
        row_stats.prefill_seconds, row_stats.reused_prompt_tokens = prefill_seconds, row_reused
    live = list(range(len(prompts)))  # original row numbers of the rows still in the caches
    # Each row's own acceptance: the batch lasts as long as its slowest row.
    row_acceptance = [AcceptanceCounter(max_depth) for _ in prompts]
    if drafter is not None:
        drafter.reset([prompt + new for prompt, new in zip(prompts, generated)])

    def drop_finished() -> None:
        nonlocal live
        going = [i for i, row in enumerate(live) if not stops[row].finished(generated[row])]
        for i, row in enumerate(live):
            if i not in going:
                stats[row].total_seconds = time.perf_counter() - start
                # Before the row leaves the caches: its KV serves later calls that start like it.
                target.remember(i, prompts[row] + stops[row].trim(generated[row]))
                if drafter is not None:
                    drafter.remember(i)
        if len(going) < len(live):
            live = [live[i] for i in going]
            if live:
                target.keep_rows(going)
                if drafter is not None:
                    drafter.keep_rows(going)

    drop_finished()
    while live:
        # Never draft past a row's max_new_tokens: its round emits at most depth + 1 tokens.
        limits = [min(max_depth, stops[row].remaining(generated[row]) - 1) for row in live]
        lookahead = lookaheads(len(live)) if lookaheads else None
        if lookahead:
            rows = [(stops[row].remaining(generated[row]), row_acceptance[row]) for row in live]
            cost = functools.partial(lookaheads.round_seconds, current=lookahead)
            depth = lookahead.choose(max(limits), rows, cost)
        else:
            depth = max(limits)
        if depth and lookahead and drafter is not None:
            # The drafter first feeds what it lacks (the prompts, the tokens of plain steps): worth
            # it only if speculation saves more than that over what the longest row has left.
            remaining = max(stops[row].remaining(generated[row]) for row in live)
            if not lookahead.worth_catching_up(drafter.catch_up_tokens(), remaining):
                depth = 0
        depths = [min(depth, limit) for limit in limits] if drafter is not None else [0] * len(live)
        tick = time.perf_counter()
        try:
            proposals = drafter.propose(depths) if max(depths) else [Draft.off()] * len(live)
        except BrokenDraft as error:
            warn_broken_draft(error)
            drafter, lookahead = None, None  # plain batched steps for the rest of the call
            proposals = [Draft.off()] * len(live)
        tock = time.perf_counter()
        mark = target.mark()
        fed = [[generated[row][-1], *proposal.tokens] for row, proposal in zip(live, proposals)]
        logits = target.forward(fed)
        emitted = []
        for i, (row, proposal) in enumerate(zip(live, proposals)):
            width = 1 + len(proposal.tokens)
            path, next_token = verify_proposal(
                logits[i, :width], proposal, samplers[row], prompts[row] + generated[row]
            )
            emitted.append([proposal.tokens[node] for node in path] + [next_token])
        target.keep(mark, [len(tokens) for tokens in emitted])
        if drafter is not None:  # after a plain step it catches up on its next propose
            drafter.commit(emitted)
        verify_seconds = time.perf_counter() - tock
        for row, proposal, tokens in zip(live, proposals, emitted):
            generated[row] += tokens
            if proposal.tokens:
                row_acceptance[row].observe(len(proposal.tokens), len(tokens) - 1)
            stats[row].record_round(
                len(proposal.tokens), len(tokens) - 1, proposal.source, tock - tick, verify_seconds
            )
        if lookahead:
            drafted = [len(proposal.tokens) for proposal in proposals]
            draft_seconds = drafter.round_seconds if max(depths) else 0.0
            lookahead.observe_rows(drafted, [len(t) - 1 for t in emitted], verify_seconds, draft_seconds)
            if max(depths) and drafter.catch_up is not None:
                lookahead.observe_catch_up(*drafter.catch_up)
        drop_finished()
    return [stop.trim(new) for stop, new in zip(stops, generated)]
