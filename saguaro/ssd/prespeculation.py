"""The drafter side of Saguaro: pre-speculate the next draft for each likely verification outcome.

While the target verifies draft d_1..d_K, the drafter already knows its own distributions at
every position, so it can guess the outcome v = (k, t*): k drafts accepted, then the target's
token t*. Within a budget of B guesses it takes the likeliest (k, t): k's chance from each draft
token's acceptance, t's from its own distribution at position k without d_{k+1} (a rejected
draft can never be the correction: the residual max(0, p - q) is 0 there). It drafts K tokens
continuing prefix + d_1..d_k + t for every such guess. All B branches advance
together, one batched forward per step, each attending to the shared prefix up to its own k plus
its own tokens (a tree mask over the drafter's cache). When the outcome arrives:
  * hit  - the branch's K tokens are the next draft, ready now; its KV entries are kept;
  * miss - the drafter rolls back to prefix + d_1..d_k + t* and a backup proposes the next draft:
    prompt lookup (copying from the sequence, free) or the model drafting afresh, whichever
    promises more tokens per second. A model backup is drafted serially while the target waits,
    so its length is chosen the same way: as many tokens as pay for their drafting steps at the
    acceptance seen so far (few where drafts are often rejected).
Each draft carries the distributions its tokens were drawn from, which sampled verification needs.

Saguaro sampling (do_sample=True): drafts are drawn from q' = q with its top-F tokens scaled by C
and renormalised, so rejections leave residual mass on exactly the tokens cached as guesses.
Verification uses q', the distribution actually sampled, so the output stays exact.

This class is placement-agnostic: `ssd/worker.py` runs it in a process, a thread or inline. With
`prefix_cache_bytes` it keeps a `PrefixCache` of its own: each reset stores the sequence it leaves
and prefills the new one from the longest stored prefix.
"""

from __future__ import annotations

import time

import torch

from saguaro.decode.sampling import BrokenDraft, SamplingConfig, TokenSampler, check_drafted, drawable
from saguaro.draft.chain import draft_chain
from saguaro.draft.drafters import lookup_continuation
from saguaro.draft.stream import Draft, DraftSource
from saguaro.model.prefix_cache import PrefixCache
from saguaro.model.runner import ModelRunner
from saguaro.model.tree import TokenTree
from saguaro.ssd.outcomes import (
    ConfidenceCalibration,
    SpeculationCache,
    draft_confidence,
    predict_outcomes,
    saguaro_reshape,
)
from saguaro.tune.cost_model import expected_tokens

# Model backups: lengths whose promised tokens per second are this close to the best count as tied.
BACKUP_RATE_TOLERANCE = 0.02


class PreSpeculator:
    def __init__(
        self,
        model,
        lookahead: int,
        budget: int | None = None,
        vocab_size: int | None = None,
        capacity: int = 256,
        reshape_c: float = 1.0,
        reshape_top: int = 3,
        prefix_cache_bytes: int | None = None,
    ):
        # Its own prefix cache (None: off), in whatever process it runs: KV never crosses processes.
        prefixes = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes is not None else None
        self.runner = ModelRunner(model, capacity, prefixes)
        self.sampler = TokenSampler(SamplingConfig())
        self.lookahead = lookahead
        self.budget = budget or 3 * (lookahead + 1)  # the paper's default: 3 guesses per position
        self.adaptive_budget = budget is None
        self.vocab_size = vocab_size
        self.reshape_c, self.reshape_top = reshape_c, reshape_top
        self.accepted_total, self.rejected_total = 1, 1  # a weak prior: acceptance 0.5
        self.calibration = ConfidenceCalibration()
        self._confidence: list[float] = []  # q(d_i) of the draft under verification, once known
        self._finite: list[torch.Tensor] = []  # whether each q since the last host read was finite
        self._broken = False  # a q was not finite: resolve and catch_up raise BrokenDraft
        # Copied backups: [rounds, accepted drafts], with one optimistic pseudo-round.
        self.lookup_record = [1, 1.0]
        self.verify_seconds = self.model_step_seconds = 0.0
        self.committed: list[int] = []
        self.draft: Draft | None = None
        self._position_probs: list[torch.Tensor] = []  # shaped q at the draft positions the drafter made
        self._cache = SpeculationCache()
        self._busy = 0.0
        self._prespeculation_start = 0.0
        self.prespeculation_seconds = 0.0
        self.prespeculation_finished = True  # False when the outcome arrived before every step ran

    # -- sequence control -------------------------------------------------------------------
    def reset(
        self,
        committed: list[int],
        sampling: SamplingConfig,
        seed: int,
        draft: bool = True,
        depth: int | None = None,
    ) -> Draft:
        """A new sequence: `committed` tokens, drafts shaped by `sampling`, drawn with an RNG from
        `seed`; the first draft cut to `depth`.

        With draft=False the drafter only feeds `committed` (its prefill, overlapping the target's)
        and answers with no draft; `catch_up` then drafts once the target's first token is known.
        """
        start = time.perf_counter()
        # On the drafter's device: its draws come from its own probabilities, wherever they live.
        generator = torch.Generator(device=self.runner.device).manual_seed(seed)
        self.sampler = TokenSampler(sampling, generator)
        # The cache starts with the previous sequence's committed tokens (drafts and branches after them).
        self.runner.remember(self.committed)
        self.runner.reset()
        self.committed = list(committed)
        self._cache = SpeculationCache()
        self._broken, self._finite = False, []
        if not draft:
            self.runner.feed(self.committed)
            return self._hand_over(Draft.off(), start)
        return self._hand_over(self._model_draft(), start, depth)

    def resolve(
        self, accepted: int, next_token: int, verify_seconds: float | None = None, depth: int | None = None
    ) -> Draft:
        """The target accepted `accepted` drafts, then emitted `next_token`: return the next draft,
        cut to the `depth` the target will verify (pre-speculation then plans for that depth)."""
        self._check_not_broken()
        start = time.perf_counter()
        self._learn(accepted, verify_seconds)
        cache, self._cache = self._cache, SpeculationCache()
        branch = cache.lookup(accepted, next_token)
        base = len(self.committed)
        self.committed += self.draft.tokens[:accepted] + [next_token]
        if branch is None:
            self.runner.rollback(base + accepted)
            draft = self._backup(depth or self.lookahead)
        else:
            # Keep d_1..d_k, then the branch's fed nodes: its guess t and b_1..b_{steps-1}.
            self.runner.commit_path(base, list(range(accepted)) + cache.fed_nodes(branch))
            self._position_probs = cache.position_probs[branch]
            draft = _branch_draft(cache, branch)
        draft.prepared_branches = len(cache.outcomes) if cache.steps else 0
        return self._hand_over(draft, start, depth)

    def answer_early(
        self, accepted: int, next_token: int, verify_seconds: float | None = None, depth: int | None = None
    ) -> Draft | None:
        """What `resolve` will answer, now, while a pre-speculation step is still running: the draft
        of a hit whose branch already holds `depth` tokens (None for anything else). Changes
        nothing: after the step, `resolve` does the bookkeeping and hands over this same draft (a
        branch only grows, and both are cut to `depth`). Its busy time is the pre-speculation's
        so far."""
        depth = depth or self.lookahead
        branch = self._cache.lookup(accepted, next_token)
        if branch is None or self._cache.steps < depth:
            return None
        draft = _branch_draft(self._cache, branch).cut(depth)
        draft.prepared_branches = len(self._cache.outcomes)
        draft.busy_seconds = time.perf_counter() - self._prespeculation_start
        return draft

    def catch_up(self, committed: list[int], depth: int | None = None) -> Draft:
        """The target went on without drafts (speculation was off): continue from `committed`, which
        extends the sequence this drafter last saw, feeding only the tokens its cache lacks."""
        self._check_not_broken()
        start = time.perf_counter()
        self.runner.rollback(min(self.runner.length, len(self.committed)))
        self.committed = list(committed)
        self._cache = SpeculationCache()
        return self._hand_over(self._model_draft(), start, depth)

    def _hand_over(self, draft: Draft, start: float, depth: int | None = None) -> Draft:
        if depth is not None:
            draft.cut(depth)
        draft.busy_seconds = self._busy + time.perf_counter() - start
        self._busy = 0.0
        self.draft, self._confidence = draft, []
        return draft

    def _learn(self, accepted: int, verify_seconds: float | None) -> None:
        self.accepted_total += accepted
        self.rejected_total += accepted < len(self.draft.tokens)
        self.calibration.record(self._confidence, accepted)
        if self.draft.source == DraftSource.LOOKUP:
            self.lookup_record[0] += 1
            self.lookup_record[1] += accepted
        if verify_seconds:
            self.verify_seconds = verify_seconds
            # Keep pre-speculation within one verification: that is what makes a hit free. An
            # outcome that cut it short says the branches were too many to reach full depth; a
            # quarter fewer then, so an overloaded drafter (two shared cores) finds its size in a
            # few rounds. The branches go to the likeliest outcomes (ssd.predict_outcomes), and
            # a drafter done early gives the target its core back (placement.hand_back_when_idle).
            if self.adaptive_budget and self.prespeculation_seconds:
                if not self.prespeculation_finished or self.prespeculation_seconds > verify_seconds:
                    self.budget = max(1, self.budget - max(1, self.budget // 4))
                elif self.prespeculation_seconds < 0.8 * verify_seconds:
                    self.budget = min(8 * (self.lookahead + 1), self.budget + 1)

    @property
    def acceptance(self) -> float:
        return self.accepted_total / (self.accepted_total + self.rejected_total)

    # -- drafting ---------------------------------------------------------------------------
    def _shaped(self, logits: torch.Tensor) -> torch.Tensor:
        # Non-finite rows drawn from as uniform (drawing and calibration cannot fail), flagged for
        # the next host read to report (check_drafted).
        q, finite = drawable(self.sampler.probs(logits[..., : self.vocab_size]))
        self._finite.append(finite)
        return q

    def _check_not_broken(self) -> None:
        if self._broken:
            raise BrokenDraft("the draft model's probabilities were not finite (NaN or inf) pre-speculating")

    def _draw(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens for rows of shaped q, and the (reshaped) rows they were drawn from."""
        if self.sampler.greedy:
            return probs.argmax(-1), None
        probs = saguaro_reshape(probs, self.reshape_top, self.reshape_c)
        return self.sampler.draw(probs), probs

    def _backup(self, depth: int) -> Draft:
        """After a miss: copy from the sequence (free) or draft with the model, whichever promises
        more tokens per second, (accepted per round + 1) / round time. The target waits for a
        model backup step by step, so it drafts the length (at most `depth`) that maximises that
        rate at the acceptance seen so far."""
        copied = lookup_continuation(self.committed, self.lookahead)
        a = self.acceptance
        lengths = range(1, max(1, min(depth, self.lookahead)) + 1)
        rates = [
            expected_tokens([a] * d, d) / (self.verify_seconds + d * self.model_step_seconds + 1e-9)
            for d in lengths
        ]
        rate = max(rates)
        # The longest draft within BACKUP_RATE_TOLERANCE of the best: where lengths tie within the
        # step cost's timing noise, the length must not flicker from round to round.
        steps = max(d for d, r in zip(lengths, rates) if r >= (1 - BACKUP_RATE_TOLERANCE) * rate)
        rounds, accepted = self.lookup_record
        if copied and (accepted / rounds + 1) / (self.verify_seconds + 1e-9) >= rate:
            self._position_probs = []
            return Draft(copied, None, DraftSource.LOOKUP)
        return self._model_draft(steps)

    def _model_draft(self, steps: int | None = None) -> Draft:
        """`steps` tokens (default K), one drafter forward each, continuing the committed sequence
        (draft.chain: read by the host once)."""
        start = time.perf_counter()
        steps = steps or self.lookahead
        pending = self.committed[self.runner.length :]
        logits = self.runner.feed(pending)[0][None]
        chain = draft_chain(
            self.runner, logits, steps, self.sampler, self._draw, self.vocab_size, self._finite
        )
        self._finite, self._position_probs = [], chain.position_probs
        if len(pending) <= 2:  # a backup's feed (t*); a prefill or catch-up says nothing of its steps
            self.model_step_seconds = (time.perf_counter() - start) / steps
        return Draft(chain.tokens, chain.drawn_from, DraftSource.MODEL)

    def _distributions_along_draft(self) -> list[torch.Tensor]:
        """The drafter's shaped q at positions 0..len(draft): after the last committed token and
        after each draft token. Feeds whatever the cache lacks (all of it for a copied draft)."""
        drafts = self.draft.tokens
        known = self._position_probs
        pending = self.committed[self.runner.length :]
        if pending:
            known = [self._shaped(self.runner.forward(pending, last_only=True)[-1])]
        fed = self.runner.length - len(self.committed)
        if fed > len(drafts):  # a hit's branch fed more tokens than the target will verify
            self.runner.rollback(len(self.committed) + len(drafts))
            fed = len(drafts)
        if fed == len(drafts):  # every position's distribution is known already
            return known[: fed + 1]
        logits = self.runner.forward(drafts[fed:], TokenTree.chain(len(drafts)), cached_nodes=fed)
        return known[: fed + 1] + list(self._shaped(logits))

    def _likeliest_outcomes(
        self, position_probs: list[torch.Tensor], drafts: list[int]
    ) -> list[tuple[int, int]]:
        """The `budget` outcomes to prepare, each draft token's acceptance judged by the drafter's
        confidence in it as calibrated by earlier outcomes (measured on the demo pair, one thread
        each: hit rate 0.79 -> 0.88, +4% tokens/s, against the paper's fan-out)."""
        probs = torch.stack(position_probs[: len(drafts) + 1])  # [K + 1, V], once for both reads
        self._confidence = draft_confidence(probs, drafts)
        acceptance = [self.calibration.chance(c, self.acceptance) for c in self._confidence]
        spread = self.calibration.empty  # no outcome judged yet: the chances are only a prior
        return predict_outcomes(probs, drafts, self._confidence, acceptance, self.budget, spread)

    def prespeculate(self, outcome_arrived=lambda: False) -> None:
        """Draft ahead for each likely outcome of verifying self.draft; one batched forward per step.

        `outcome_arrived` is polled before every step: once the verification outcome (or any other
        request) is in, pre-speculation stops and the cache keeps the steps done so far, so the
        target never waits for branches deeper than its verification gave time for.
        """
        start = self._prespeculation_start = time.perf_counter()
        self.prespeculation_finished = not self.draft.tokens  # nothing to verify, nothing to prepare
        if self.prespeculation_finished or outcome_arrived():
            return
        drafts = self.draft.tokens
        position_probs = self._distributions_along_draft()
        outcomes = self._likeliest_outcomes(position_probs, drafts)
        tree = TokenTree.chain(len(drafts)).extend([k - 1 for k, _ in outcomes])
        feed = [t for _, t in outcomes]
        cache = SpeculationCache(
            {outcome: i for i, outcome in enumerate(outcomes)},
            [[] for _ in outcomes],
            [[] for _ in outcomes],
            [[] for _ in outcomes],
            chain_length=len(drafts),
        )
        self._cache = cache
        for step in range(self.lookahead):
            if outcome_arrived():
                break
            shaped = self._shaped(self.runner.forward(feed, tree, cached_nodes=len(tree) - len(feed)))
            tokens, drawn_from = self._draw(shaped)
            try:
                step_tokens = check_drafted([tokens.reshape(-1)], self._finite)
            except BrokenDraft:
                # Reported at the outcome (resolve): the branches drafted from it are dropped.
                self._broken, self._cache = True, SpeculationCache()
                break
            finally:
                self._finite = []
            for i, token in enumerate(step_tokens):
                cache.tokens[i].append(token)
                cache.position_probs[i].append(shaped[i])
                if drawn_from is not None:
                    cache.drawn_from[i].append(drawn_from[i])
            cache.steps = step + 1
            if step + 1 < self.lookahead:  # b_K is fed after a hit, with the next pre-speculation
                first_new = len(tree)
                tree = tree.extend(range(first_new - len(feed), first_new))
                feed = step_tokens
        else:
            self.prespeculation_finished = True
        self.prespeculation_seconds = time.perf_counter() - start
        self._busy += self.prespeculation_seconds


def _branch_draft(cache: SpeculationCache, branch: int) -> Draft:
    """A hit's draft: the branch's tokens so far (a copy: pre-speculation may still append to them)
    and, sampling, the q each was drawn from."""
    drawn_from = cache.drawn_from[branch]
    probs = torch.stack(drawn_from) if drawn_from else None
    return Draft(list(cache.tokens[branch]), probs, DraftSource.CACHE)
