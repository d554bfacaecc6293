"""The drafters of a batch (decode/batched.py): one draft model drafting every row at once, or
model-free drafters one per row. Rows join (`add_rows`) and leave (`keep_rows`) between rounds."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from saguaro.decode.sampling import TokenSampler, check_drafted, drawable, greedy_choice
from saguaro.draft.stream import Draft, DraftSource
from saguaro.model.batched_runner import BatchedRunner
from saguaro.model.prefix_cache import PrefixCache

if TYPE_CHECKING:  # names for annotations only: importing them would lengthen every import chain
    from saguaro.draft.drafters import Drafter
    from saguaro.draft.suffix import SuffixHandle, SuffixIndex

# Context tokens a repeat must match before its copy replaces the model's draft: shorter matches
# (a common phrase, a bracket) predict less than the draft model does.
SUFFIX_MATCH = 8


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class BatchedModelDrafter:
    """A small causal LM drafting a chain for every row at once, on its own `BatchedRunner`.

    Its cache holds each row's committed tokens up to `fed[row]`; propose() first feeds the rest
    (ragged: one token after a rejection, two after a fully accepted chain, more after plain
    steps; a row that joined since, its whole sequence, prefilled packed from the draft's prefix
    cache), then draws one token per row per level. Each row's drafting sampler (`sampler` for
    rows given none) draws its token from the q it reports, which keeps sampled verification exact.
    """

    def __init__(
        self,
        model,
        sampler: TokenSampler,
        vocab_size: int | None = None,
        prefix_cache: PrefixCache | None = None,
        suffixes: SuffixIndex | None = None,
    ):
        self.runner = BatchedRunner(model, prefix_cache)
        # Beside the model: every row's sequence, published into `suffixes` as it becomes final; a
        # row whose context repeats what it holds (SUFFIX_MATCH tokens or more) drafts the copy.
        self.suffixes = suffixes
        self._published: list[SuffixHandle] = []
        self._drafted: list[list[int]] = []  # each row's model draft, whose levels the cache was fed
        self.sampler = sampler
        self.samplers: list[TokenSampler] = []
        self.vocab_size = vocab_size  # the draft never proposes ids the target cannot emit
        self.committed: list[list[int]] = []
        self.fed: list[int] = []
        self._mark = None
        self._drafted_fed = 0  # draft levels of the last proposal fed to the cache
        self.round_seconds: float | None = None  # see propose
        self.catch_up: tuple[int, float] | None = None  # a one-off catch-up: (tokens, seconds)

    def reset(self, rows: list[list[int]]) -> None:
        self.runner.start(0)
        self.committed, self.fed, self.samplers, self._published = [], [], [], []
        self._mark, self._drafted_fed = None, 0
        self.add_rows(rows)

    def add_rows(
        self, rows: list[list[int]], samplers: list[TokenSampler] | None = None, prefill: bool = False
    ) -> None:
        """New rows after the running ones. The draft prefills them when it first drafts for them,
        or with `prefill` now, all but their last token (fed with the next draft, as every row's).

        Lazily, a batch whose speculation is off never pays for the draft's prefill; a batch that
        rows keep joining (a serving engine) would, though, find a new row's whole prompt to catch
        up on whenever it weighs speculating, and rarely find that worth it."""
        if prefill:
            fed = [max(1, len(row) - 1) for row in rows]
            self.runner.admit([row[:n] for row, n in zip(rows, fed)])
        else:
            fed = [0] * len(rows)
            self.runner.add_empty_rows(len(rows))
        self.committed += [list(row) for row in rows]
        self.fed += fed
        self.samplers += samplers or [self.sampler] * len(rows)
        if self.suffixes is not None:
            self._published += [self.suffixes.add(row) for row in rows]

    def propose(self, depths: list[int]) -> list[Draft]:
        pending = [row[fed:] for row, fed in zip(self.committed, self.fed)]
        start = time.perf_counter()
        logits = self._catch_up()[:, : self.vocab_size]
        catch_up_seconds = time.perf_counter() - start
        self.fed = [len(row) for row in self.committed]
        self._mark = self.runner.mark()
        tokens, probs, level_seconds, finite = [], [], [], []
        for level in range(max(depths)):
            drawn, q, ok = self._draw(logits)
            tokens.append(drawn)
            probs.append(q)
            finite += ok
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
        self._drafted = tokens
        drafts = []
        for row, depth in enumerate(depths):
            row_probs = [level[row] for level in probs[:depth] if level[row] is not None]
            drafts.append(Draft(tokens[row][:depth], torch.stack(row_probs) if row_probs else None))
        if self.suffixes is not None:
            drafts = [
                self._copy_or(draft, row, depth) for row, (draft, depth) in enumerate(zip(drafts, depths))
            ]
        return drafts

    def _copy_or(self, draft: Draft, row: int, depth: int) -> Draft:
        """The continuation of the row's context where `suffixes` saw it repeated at length, else
        the model's `draft`. A copy is deterministic: verified as q = one-hot, exact when sampling.
        The choice must not look at the model's draft: a sampled draft kept only where it agrees
        with the copy (or differs from it) is no longer drawn from the q it reports."""
        found = self.suffixes.lookup(self.committed[row], depth) if depth else None
        if found is not None and found.match_length >= SUFFIX_MATCH:
            return Draft(found.tokens, None, DraftSource.LOOKUP)
        return draft

    def copies(self, depths: list[int]) -> list[Draft]:
        """Suffix copies alone, of any match length (`suffixes` must be given; empty where none),
        for a round they serve instead of the model's drafts (decode/batched.py): no draft forward
        runs, and the model's cache falls behind, to catch up when it next drafts."""
        return [
            Draft(self.suffixes.lookup(self.committed[row], depth).tokens, None, DraftSource.LOOKUP)
            for row, depth in enumerate(depths)
        ]

    def _catch_up(self) -> torch.Tensor:
        """Feed every row what it lacks; its last logits [B, V].

        Left-padded, so every row's last token is in the last column, the only one whose logits are
        needed: one or two tokens per row, more after plain steps. Rows new to the draft are
        prefilled first, packed, from the draft's prefix cache as far as it holds them.
        """
        new = [row for row, fed in enumerate(self.fed) if not fed]
        logits = None
        if new:
            prefilled, _ = self.runner.admit([self.committed[row] for row in new], new)
            for row in new:
                self.fed[row] = len(self.committed[row])
            logits = prefilled.new_zeros(self.runner.rows, prefilled.shape[-1])
            logits[new] = prefilled
        pending = [row[fed:] for row, fed in zip(self.committed, self.fed)]
        if any(pending):
            fed = self.runner.forward(pending, align_right=True, last_only=True)[:, -1]
            if logits is None:
                return fed
            waiting = [row for row, rest in enumerate(pending) if rest]
            logits[waiting] = fed[waiting]
        return logits

    def _draw(self, logits: torch.Tensor) -> tuple[torch.Tensor, list, list]:
        """Each row's draft token [B], its q per row (None where greedy: verification compares
        ids), and the finiteness flags of the q drawn from (see `drawable`).

        Rows drafting alike (one config and generator: a batch of one call) draw at once."""
        first = self.samplers[0]
        alike = all(s.config == first.config and s.generator is first.generator for s in self.samplers)
        if alike and first.greedy:
            return greedy_choice(first.scores(logits)), [None] * len(logits), []
        if alike:
            q, ok = drawable(first.probs(logits))  # a broken draft must not break the draw
            return first.draw(q), list(q), [ok]
        tokens, probs, finite = [], [], []
        for row_logits, sampler in zip(logits, self.samplers):
            if sampler.greedy:
                tokens.append(greedy_choice(sampler.scores(row_logits)))
                probs.append(None)
            else:
                q, ok = drawable(sampler.probs(row_logits))
                tokens.append(sampler.draw(q))
                probs.append(q)
                finite.append(ok)
        return torch.stack(tokens), probs, finite

    def catch_up_tokens(self) -> int:
        """What the next propose() feeds before it drafts (rows x the widest row's pending tokens)."""
        return len(self.committed) * max(len(row) - fed for row, fed in zip(self.committed, self.fed))

    def commit(self, accepted: list[list[int]]) -> None:
        """Each row's accepted drafts, then its next token (the whole of what the round emitted;
        nothing for a row that failed and leaves)."""
        if self._mark is not None:
            # The cache was fed the model's own draft: of the accepted tokens, it keeps those that
            # are that draft (all of them, unless the row drafted a copy instead).
            kept = [
                _common_prefix(emitted[:-1], drafted[: self._drafted_fed])
                for emitted, drafted in zip(accepted, self._drafted)
            ]
            self.runner.keep(self._mark, kept)
            self.fed = [fed + k for fed, k in zip(self.fed, kept)]
        for row, emitted in zip(self.committed, accepted):
            row += emitted
        if self.suffixes is not None:
            for handle, emitted in zip(self._published, accepted):
                self.suffixes.extend(handle, emitted)
        self._mark, self._drafted_fed = None, 0

    def remember(self, index: int) -> None:
        """Store what the draft's cache holds of row `index` for later calls."""
        self.runner.remember(index, self.committed[index])

    def keep_rows(self, indices: list[int]) -> None:
        self.runner.keep_rows(indices)
        self.committed = [self.committed[i] for i in indices]
        self.fed = [self.fed[i] for i in indices]
        self.samplers = [self.samplers[i] for i in indices]
        self._published = [self._published[i] for i in indices] if self.suffixes is not None else []

    def compact(self) -> None:
        self.runner.compact()


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
        self.drafters = []
        self.add_rows(rows)

    def add_rows(self, rows: list[list[int]], samplers=None, prefill: bool = False) -> None:
        """New rows after the running ones (drafts are copies: no sampler, nothing to prefill)."""
        for row in rows:
            self.drafters.append(self.make_drafter())
            self.drafters[-1].reset(row)

    def propose(self, depths: list[int]) -> list[Draft]:
        return [drafter.propose(depth) for drafter, depth in zip(self.drafters, depths)]

    def commit(self, accepted: list[list[int]]) -> None:
        for drafter, emitted in zip(self.drafters, accepted):
            if emitted:
                drafter.commit(list(range(len(emitted) - 1)), emitted[-1])

    def remember(self, index: int) -> None:
        """Nothing to store: no model, no KV."""

    def keep_rows(self, indices: list[int]) -> None:
        self.drafters = [self.drafters[i] for i in indices]

    def compact(self) -> None:
        """Nothing to compact."""
