"""How many bonus-token guesses to prepare for each verification outcome (Saguaro's fan-out).

Outcome k (k drafts accepted, 0 <= k <= K) has probability a^k (1 - a) for k < K and a^K for
k = K, with a the per-token acceptance rate. The miss rate at a position falls roughly as F^-r
in its fan-out F (r ~ 1). Minimising the expected miss rate under sum(F_k) = B gives a capped
geometric series (Kumar, Dao, May 2026, Theorem 12):
    c = a^(1/(1+r));  F_k ~ c^k for k < K;  F_K ~ c^K (1 - a)^(-1/(1+r)).
High acceptance spreads the budget to deep positions; low acceptance piles it on k = 0.
A budget below K + 1 (a drafter whose every pre-speculated branch costs the target compute, as
on two shared cores) guesses once for each of the `budget` likeliest outcomes and not at all for
the rest: their rounds are misses, served by a backup draft.
"""

from __future__ import annotations

import math


def geometric_fanout(budget: int, lookahead: int, acceptance: float, r: float = 1.0) -> list[int]:
    """Integer fan-outs F_0..F_K summing to `budget`: each >= 1 while budget >= K + 1, below that
    1 for the `budget` likeliest outcomes and 0 for the others."""
    positions = lookahead + 1
    if budget < 1:
        raise ValueError(f"a budget of {budget} prepares nothing: use at least 1")
    a = min(max(acceptance, 1e-3), 1 - 1e-3)  # the formula degenerates at 0 and 1
    if budget < positions:
        chances = [a**k * (1 - a) for k in range(lookahead)] + [a**lookahead]
        likeliest = sorted(range(positions), key=lambda k: -chances[k])[:budget]
        return [int(k in likeliest) for k in range(positions)]
    c = a ** (1 / (1 + r))
    weights = [c**k for k in range(lookahead)] + [c**lookahead * (1 - a) ** (-1 / (1 + r))]
    # One guess per position first, then the rest in proportion to the weights: floors, and the
    # leftovers to the largest fractional parts.
    spare = budget - positions
    shares = [spare * w / sum(weights) for w in weights]
    fanout = [1 + math.floor(s) for s in shares]
    by_fraction = sorted(range(positions), key=lambda i: shares[i] - math.floor(shares[i]), reverse=True)
    for i in by_fraction[: budget - sum(fanout)]:
        fanout[i] += 1
    return fanout
