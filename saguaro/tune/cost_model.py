"""How fast a speculative round is, from what its steps cost and how often drafts are accepted.

One set of formulas, two uses:
  * online - `LookaheadController` picks each round's draft length K (0 turns speculation off)
    from running measurements of target verify time vs tokens, drafting time and acceptance;
  * offline - the benchmark predicts each method's tokens/s from separately measured step costs
    (`CostCurve`s) and the acceptance its runs measured, and reports predicted vs measured.

With per-position acceptance a_i (the chance draft i is accepted given drafts 1..i-1 were), a
round that drafts K tokens emits on average
    E_K = 1 + a_1 + a_1 a_2 + ... + a_1 ... a_K
tokens (the accepted drafts plus the target's own token) and costs verify(K + 1) + draft(K), so
    tokens/s(K) = E_K / (verify(K + 1) + draft(K)).
Speculation pays only where verify(K + 1) stays close to verify(1): on a GPU, or a CPU with fast
low-precision matrix units. Where verifying T tokens costs ~T steps, the best K is 0.
"""

from __future__ import annotations

import bisect
import copy
from collections.abc import Sequence

from saguaro.draft.stream import DraftSource

PRIOR_ACCEPTANCE = 0.7  # per draft token, until this generator has measured its own
PRIOR_HIT_RATE = 0.7  # Saguaro cache hits, likewise


def expected_tokens(acceptance: Sequence[float], k: int) -> float:
    """E_K: mean tokens a round emits when it drafts k tokens with per-position acceptance rates."""
    total = reach = 1.0
    for rate in acceptance[:k]:
        reach *= rate
        total += reach
    return total


class CostCurve:
    """Seconds of a forward vs the number of new tokens it processes, piecewise linear between
    measured points. Below the first point it scales proportionally (a lower bound). Past the last
    it extrapolates linearly (offline, from complete tables) or stays flat (`optimistic`, online:
    an untried length looks as cheap as the longest tried, so it gets tried once and measured)."""

    def __init__(
        self, points: dict[int, float] | None = None, optimistic: bool = False, smoothing: float = 0.3
    ):
        self.points = dict(points or {})
        self.optimistic = optimistic
        self.smoothing = smoothing

    def observe(self, tokens: int, seconds: float) -> None:
        """A new measurement, blended into an exponential moving average per length."""
        old = self.points.get(tokens)
        self.points[tokens] = (
            seconds if old is None else (1 - self.smoothing) * old + self.smoothing * seconds
        )

    def __bool__(self) -> bool:
        return bool(self.points)

    def __call__(self, tokens: float) -> float:
        xs = sorted(self.points)
        if not xs:
            raise ValueError("no measurement yet")
        ys = [self.points[x] for x in xs]
        if tokens <= xs[0]:  # shorter than anything measured: assume proportional (a lower bound)
            return ys[0] * tokens / xs[0]
        i = bisect.bisect_left(xs, tokens)
        if i < len(xs):
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)
        if self.optimistic or len(xs) == 1:
            return ys[-1]
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return ys[-1] + max(slope, 0.0) * (tokens - xs[-1])

    def as_dict(self) -> dict[str, float]:
        return {str(k): v for k, v in sorted(self.points.items())}


class AcceptanceCounter:
    """Per-position acceptance a_i = accepted_i / reached_i, with a weak prior of 1/2."""

    def __init__(self, positions: int, prior: float = 1.0):
        self.reached = [0] * positions
        self.accepted = [0] * positions
        self.prior = prior

    def observe(self, drafted: int, accepted: int) -> None:
        for i in range(min(accepted, len(self.reached))):
            self.reached[i] += 1
            self.accepted[i] += 1
        if accepted < drafted and accepted < len(self.reached):
            self.reached[accepted] += 1

    def rates(self) -> list[float]:
        return [(a + self.prior) / (r + 2 * self.prior) for a, r in zip(self.accepted, self.reached)]

    def rates_near(self, pooled: Sequence[float], weight: float = 2.0) -> list[float]:
        """These counts' rates shrunk toward `pooled` (a batch's rates) by `weight` observations
        per position: a row's few rounds alone would swing its estimate from one round to the next."""
        return [(a + weight * p) / (r + weight) for a, r, p in zip(self.accepted, self.reached, pooled)]


MAX_PROBE_INTERVAL = 256  # rounds between probes, at most, while speculation stays off


class LookaheadController:
    """Chooses each round's draft length K in [0, max_k] to maximise E_K / round time.

    draft_cost says how drafting time grows with K: "per_token" (a model drafting one token per
    step), "per_round" (Saguaro: the target waits for a draft that was prepared in parallel,
    whatever its length) or "free" (prompt lookup). When K = 0 wins, speculation is off; every
    `probe_every` rounds one speculative round re-measures acceptance and cost, in case the text
    turns predictable (copying code, say); each probe that leaves speculation off doubles the
    interval to the next (up to 256 rounds), so a machine where it never pays stops paying for probes;
    where not even drafts that are all accepted would pay, probes wait the full 256 rounds at once.
    While speculating below the limit, every `probe_every`-th round drafts one token deeper than the
    best K: acceptance there is only measured by drafting there, and an estimate left from a few
    early rounds (another prompt, say) would otherwise hold K below what the text now allows.
    """

    def __init__(self, max_k: int, draft_cost: str = "per_token", probe_every: int = 16):
        if draft_cost not in ("per_token", "per_round", "free"):
            raise ValueError(f"draft_cost must be per_token, per_round or free, got {draft_cost!r}")
        self.max_k, self.probe_every = max_k, probe_every
        self.draft_cost = draft_cost
        self.verify = CostCurve(optimistic=True)
        self.acceptance = AcceptanceCounter(max_k)
        self.draft_seconds_per_unit = 0.0  # per token or per round, by draft_cost
        self.catch_up_seconds_per_token = 0.0  # a drafter feeding many tokens at once (decode/batched.py)
        self._rounds_off = self._rounds_on = 0
        self._probe_interval = probe_every
        self._probe_acceptance = 1.0  # a probe's premise: drafts accepted this often could pay
        self._last_choice: int | None = None  # the K choose() gave last

    def observe(
        self, drafted: int, accepted: int, verify_seconds: float, draft_seconds: float | None
    ) -> None:
        self.observe_rows([drafted], [accepted], verify_seconds, draft_seconds)

    def observe_rows(
        self, drafted: list[int], accepted: list[int], verify_seconds: float, draft_seconds: float | None
    ) -> None:
        """A round of a batch (decode/batched.py): every row's acceptance counts, the round's costs once.
        A row's tokens/s is then proportional to the batch's, so one choice serves all rows.
        draft_seconds None: this round's drafting time says nothing about a usual round's."""
        for row_drafted, row_accepted in zip(drafted, accepted):
            if row_drafted:
                self.acceptance.observe(row_drafted, row_accepted)
        deepest = max(drafted)
        self.verify.observe(deepest + 1, verify_seconds)
        units = {"per_token": deepest, "per_round": 1 if deepest else 0, "free": 0}[self.draft_cost]
        if units and draft_seconds is not None:
            sample = draft_seconds / units
            old = self.draft_seconds_per_unit
            self.draft_seconds_per_unit = sample if old == 0 else 0.7 * old + 0.3 * sample

    def seed(self, verify_seconds: dict[int, float], acceptance: float = 1.0) -> bool:
        """Start from step costs timed beforehand (tokens -> seconds of a verification) where they
        say that no draft accepted token by token with chance `acceptance` (1: all of it) would beat
        a plain step (verification costing about K+1 steps, a CPU without native bf16): the very
        first round is then a plain step, not a full-length draft that finds it out. Otherwise
        nothing is seeded, and the first rounds draft the full length, which measures acceptance
        at every position soonest. Returns whether it seeded; lengths already observed keep their
        measurement."""
        known = dict(self.verify.points)
        for tokens, seconds in verify_seconds.items():
            self.verify.points.setdefault(tokens, seconds)
        if self._could_pay(self.max_k, acceptance):
            self.verify.points = known
            return False
        self._probe_acceptance = acceptance  # probes, too, need a draft that could pay at it
        return True

    def observe_catch_up(self, tokens: int, seconds: float) -> None:
        """A drafter fed `tokens` it lacked (a prefill, the tokens of plain steps) in `seconds`."""
        sample = seconds / tokens
        old = self.catch_up_seconds_per_token
        self.catch_up_seconds_per_token = sample if old == 0 else 0.7 * old + 0.3 * sample

    def worth_catching_up(self, tokens: int, remaining: int) -> bool:
        """Whether speculating for the `remaining` tokens saves more than a drafter's catch-up over
        `tokens` costs. Speculation pays per round, the catch-up once: a short generation may not
        earn it back (a batch's draft prefill, say). Unmeasured, it is tried, which measures it."""
        if not self.catch_up_seconds_per_token or not self.verify or tokens == 0:
            return True
        best = max(range(1, self.max_k + 1), key=self.tokens_per_second)
        saved = remaining * (1 / self.tokens_per_second(0) - 1 / self.tokens_per_second(best))
        if saved > tokens * self.catch_up_seconds_per_token:
            return True
        self._last_choice = 0  # the round goes plain: see `drafting`
        return False

    def round_seconds(self, k: int) -> float:
        units = {"per_token": k, "per_round": 1 if k else 0, "free": 0}[self.draft_cost]
        return self.verify(k + 1) + units * self.draft_seconds_per_unit

    def tokens_per_second(self, k: int) -> float:
        return expected_tokens(self.acceptance.rates(), k) / self.round_seconds(k)

    def batch_seconds(self, k: int, rows: Sequence[tuple], round_seconds) -> float:
        """Expected seconds until every row of a batch is done, drafting k from now on. `rows`: each
        row's tokens left, its own acceptance counts and, optionally, the most it can draft (a
        suffix copy's length: None for no limit); `round_seconds(live rows, k)`: a round's
        cost. The batch waits for its slowest row, while rows that finish leave and make later
        rounds cheaper: rounds are summed between the rows' expected finishes, each at the cost
        of the rows still live. (Pooled tokens per round would let fast rows pull K deeper than
        the slow rows, which decide the batch, can use.)"""
        pooled = self.acceptance.rates()
        finishes = sorted(
            left
            / expected_tokens(counts.rates_near(pooled), k if not cap or cap[0] is None else min(k, cap[0]))
            for left, counts, *cap in rows
        )
        total = done = 0.0
        for finished, rounds in enumerate(finishes):
            total += (rounds - done) * round_seconds(len(finishes) - finished, k)
            done = rounds
        return total

    def choose(self, limit: int, rows: Sequence[tuple] = (), round_seconds=None) -> int:
        """The best K for the next round, at most `limit` (what max_new_tokens still allows); for
        a batch's `rows` the K that finishes them soonest (`batch_seconds`; `round_seconds` by
        live rows, this controller's own cost by default)."""
        self._last_choice = self._choose(limit, rows, round_seconds)
        return self._last_choice

    def skip(self) -> None:
        """This round goes without this controller's drafts (another drafter's promise more): see
        `drafting`."""
        self._last_choice = 0

    @property
    def drafting(self) -> bool:
        """Whether rounds draft at all here: nothing chosen yet, or the last round drafted (chose
        K > 0 and, if asked, found the catch-up worth it). A drafter that must prepare for new rows
        (a batch's draft model) prepares only then."""
        return self._last_choice is None or self._last_choice > 0

    def _choose(self, limit: int, rows, round_seconds) -> int:
        top = min(self.max_k, limit)
        if not self.verify or top == 0:
            return top  # nothing measured yet: start at full length, which measures the most
        if rows:
            cost = round_seconds or (lambda live, k: self.round_seconds(k))
            rate = lambda k: 1 / self.batch_seconds(k, rows, cost)  # noqa: E731
        else:
            rate = self.tokens_per_second
        best = max(range(top + 1), key=rate)
        if best > 0:
            self._rounds_off, self._probe_interval = 0, self.probe_every
            self._rounds_on += 1
            deeper = best < top and self._rounds_on % self.probe_every == 0
            return best + 1 if deeper else best
        self._rounds_off += 1
        if self._rounds_off < self._probe_interval:
            return 0
        if not self._could_pay(top, self._probe_acceptance) and self._probe_interval < MAX_PROBE_INTERVAL:
            # Not even drafts that are all accepted (or, seeded, accepted as often as is typical)
            # would beat a plain step (verification costing about K+1 steps): a probe has nothing
            # to learn but whether that cost changed, which is worth one round in
            # MAX_PROBE_INTERVAL, not one in 16 (a probe also pays the drafter's catch-up).
            self._rounds_off, self._probe_interval = 0, MAX_PROBE_INTERVAL
            return 0
        self._rounds_off, self._probe_interval = 0, min(2 * self._probe_interval, MAX_PROBE_INTERVAL)
        return max(range(1, top + 1), key=rate)

    def _could_pay(self, top: int, acceptance: float = 1.0) -> bool:
        """Whether some K <= top would beat a plain step if each draft were accepted with chance
        `acceptance` (1: every draft accepted)."""
        return any(
            expected_tokens([acceptance] * k, k) / self.round_seconds(k) > 1 / self.round_seconds(0)
            for k in range(1, top + 1)
        )


class BatchLookaheads:
    """One `LookaheadController` per live batch size (decode/batched.py): a round's cost depends on rows x
    tokens, so each size measures its own, kept across calls. A new size starts from the nearest
    measured size's estimates: starting from nothing would draft at full length, and when rows drop
    out mid-call with speculation off, the drafter would first have to catch up on every token made
    meanwhile."""

    def __init__(self, max_k: int, draft_cost: str = "per_token"):
        self.max_k, self.draft_cost = max_k, draft_cost
        self.by_size: dict[int, LookaheadController] = {}

    def __call__(self, rows: int) -> LookaheadController:
        if rows not in self.by_size:
            if self.by_size:
                nearest = min(self.by_size, key=lambda size: abs(size - rows))
                self.by_size[rows] = copy.deepcopy(self.by_size[nearest])
            else:
                self.by_size[rows] = LookaheadController(self.max_k, self.draft_cost)
        return self.by_size[rows]

    def round_seconds(self, rows: int, k: int, current: LookaheadController) -> float:
        """A round's cost at `rows` live rows: measured at that size, else `current`'s (the cost at
        the batch's size now, an upper bound for fewer rows)."""
        known = self.by_size.get(rows)
        return (known if known is not None and known.verify else current).round_seconds(k)


class TreeDepthController(LookaheadController):
    """LookaheadController for a token tree: chooses the depth the tree is cut to (0 to its full
    depth) from measured round costs and per-depth acceptance.

    The engine reports a tree round as (nodes drafted, path length accepted); this controller
    books it under the depth it chose, so acceptance is per depth, a "per_token" draft cost is per
    level (one draft forward each), and the verify curve is indexed by depth + 1 (a fixed tree
    shape cut to a depth always has the same node count, so cost per depth is what the choice needs).
    """

    def __init__(self, max_k: int, draft_cost: str = "per_token", probe_every: int = 16):
        super().__init__(max_k, draft_cost, probe_every)
        self._depth = 0

    def choose(self, limit: int) -> int:
        self._depth = super().choose(limit)
        return self._depth

    def observe(
        self, drafted: int, accepted: int, verify_seconds: float, draft_seconds: float | None
    ) -> None:
        super().observe(self._depth if drafted else 0, accepted, verify_seconds, draft_seconds)


# -- offline: predicted time of measured runs, and projections -------------------------------------
def predict_run_seconds(
    method: str, trace: dict, target: CostCurve, draft: CostCurve, lookahead: int
) -> float:
    """Wall time of one generation predicted from step costs and what the run did.

    `trace` holds the new-token counts of every target forward (`target_tokens`) and, for in-process
    drafters, every drafter forward (`draft_tokens`): how many there were and how wide follows from
    acceptance. Those forwards run one after the other, so their costs add up. Saguaro's drafter
    works beside the target, so only the target's waits count (from `rounds`, the run's round log):
    pre-speculating B branches takes a feed plus `lookahead` batched steps, hidden behind the
    previous verification as far as it fits; a miss backed up by the model adds a fresh draft.
    """
    seconds = sum(target(t) for t in trace["target_tokens"])
    if method != "saguaro":
        return seconds + sum(draft(t) for t in trace.get("draft_tokens", []))
    fresh_draft = draft(2) + (lookahead - 1) * draft(1)
    rounds = trace["rounds"]
    seconds += draft(trace["prompt_tokens"] + 1) + (lookahead - 1) * draft(1)  # the first draft
    rounds_off = 0  # speculation switched off: plain target steps, the drafter idles
    for previous, current in zip(rounds, rounds[1:]):
        if current["source"] == DraftSource.OFF:
            rounds_off += 1
        elif previous["source"] == DraftSource.OFF:
            # Catching up: feed the tokens made meanwhile, draft afresh.
            seconds += draft(rounds_off + 1) + (lookahead - 1) * draft(1)
            rounds_off = 0
        else:
            work = draft(2) + lookahead * draft(max(current["branches"], 1))
            seconds += max(0.0, work - target(previous["drafted"] + 1))
            seconds += fresh_draft if current["source"] == DraftSource.MODEL else 0.0
    return seconds


def project_tokens_per_second(
    method: str,
    k: int,
    target: CostCurve,
    draft: CostCurve,
    acceptance: Sequence[float],
    hit_rate: float = 0.0,
    branches: int = 0,
    tree_tokens: float = 0.0,
    tree_nodes: int = 0,
    tree_levels: Sequence[int] = (),
) -> float:
    """Steady-state decode tokens/s (no prefill) of a method drafting k tokens per round."""
    if method == "autoregressive":
        return 1.0 / target(1)
    fresh_draft = draft(2) + (k - 1) * draft(1)
    tokens = expected_tokens(acceptance, k)
    if method == "speculative":
        return tokens / (target(k + 1) + fresh_draft)
    if method == "saguaro":
        verify = target(k + 1)
        prespeculation = draft(2) + k * draft(max(branches, 1))
        return tokens / (verify + max(0.0, prespeculation - verify) + (1 - hit_rate) * fresh_draft)
    if method == "tree":
        return tree_tokens / (target(tree_nodes + 1) + draft(2) + sum(draft(w) for w in tree_levels[:-1]))
    raise ValueError(f"no projection for method {method!r}")


def largest_budget_within(verify_seconds: float, draft: CostCurve, k: int, most: int = 64) -> int:
    """The most branches whose pre-speculation (a feed, then k batched steps) fits in one verification."""
    fits = [b for b in range(1, most + 1) if draft(2) + k * draft(b) <= verify_seconds]
    return max(fits, default=0)
