"""Saguaro's pieces as small pure functions and two dataclasses (the confidence calibration and
the speculation cache).

The drafter side of speculative speculative decoding (ssd/prespeculation.py) is a loop around these:
  * `predict_outcomes` - which verification outcomes (k accepted, bonus token t) to prepare: the
    likeliest, under a budget, by each draft token's chance of acceptance, which
    `ConfidenceCalibration` learns from the drafter's confidence (`draft_confidence`);
  * `saguaro_reshape`  - Saguaro sampling: damp the draft's top tokens so that a rejection leaves
    its residual mass on exactly the tokens prepared as bonus guesses;
  * `branch_node`      - where each prepared branch's tokens sit in the drafter's token tree;
  * `SpeculationCache` - outcome -> the branch drafted for it, as far as pre-speculation got.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def draft_confidence(position_probs: torch.Tensor, drafts: list[int]) -> list[float]:
    """The drafter's probability of each draft token d_i under its q at that position
    (position_probs [positions, V]; 0 for a token its vocabulary lacks, copied by prompt lookup).
    One host read."""
    if not drafts:
        return []
    probs = position_probs[: len(drafts)]
    vocab = probs.shape[-1]
    ids = torch.tensor([min(d, vocab - 1) for d in drafts], dtype=torch.long, device=probs.device)
    mass = probs.gather(-1, ids[:, None])[:, 0].float().tolist()
    return [m if d < vocab else 0.0 for d, m in zip(drafts, mass)]


def predict_outcomes(
    position_probs: torch.Tensor,
    drafts: list[int],
    confidence: list[float],
    acceptance: list[float],
    budget: int,
    spread: bool = False,
) -> list[tuple[int, int]]:
    """The `budget` likeliest verification outcomes (k, t) to pre-speculate, ordered by k.

    Outcome (k, t): d_1..d_k accepted, then the target's token t. Its chance is the chance of k,
    a_1 ... a_k (1 - a_{k+1}) (a_1 ... a_K for k = K; a_i = acceptance[i - 1]), times the chance
    of t after k, read from the drafter's q at position k (position_probs[k], of [K + 1, V]). For
    k < K that q is renormalised without d_{k+1} (`confidence` holds q(d_{k+1})): a rejected
    draft can never be the correction, the residual max(0, p - q) is zero there. Tokens with no mass are never
    guessed; a draft token the drafter's vocabulary lacks has no entry to exclude.

    With one rate a everywhere the chance of k is the paper's geometric a^k (1 - a), and its
    fan-out (Kumar, Dao, May 2026, Theorem 12) spreads the budget as if each position's miss rate
    fell as a power law in its number of guesses; here q gives each guess's own chance, so the
    budget goes to whichever (k, t) are likeliest. With `spread` (while the acceptances are only
    a prior), each outcome gets its likeliest guess before any gets a second, as far as the budget
    goes, like the paper's fan-out. Two host reads, whatever K.
    """
    if budget < 1:
        raise ValueError(f"a budget of {budget} prepares nothing: use at least 1")
    probs = position_probs[: len(drafts) + 1]
    vocab = probs.shape[-1]
    top = probs.topk(min(budget + 1, vocab))
    candidates = []  # (chance, k, t)
    reach = 1.0  # the chance that d_1..d_k are all accepted
    for k, (tokens, masses) in enumerate(zip(top.indices.tolist(), top.values.tolist())):
        if k < len(drafts):
            outcome, reach = reach * (1 - acceptance[k]), reach * acceptance[k]
            excluded = drafts[k] if drafts[k] < vocab else None
            chance = outcome / max(1 - confidence[k], 1e-12)
        else:
            excluded, chance = None, reach
        candidates += [(chance * p, k, t) for t, p in zip(tokens, masses) if t != excluded and p > 0]
    candidates.sort(key=lambda c: -c[0])
    if spread:  # each k's likeliest guess first, then the rest
        firsts = list({k: (chance, k, t) for chance, k, t in reversed(candidates)}.values())
        candidates = sorted(firsts, key=lambda c: -c[0]) + [c for c in candidates if c not in firsts]
    return sorted((k, t) for _, k, t in candidates[:budget])


def saguaro_reshape(probs: torch.Tensor, top: int, c: float) -> torch.Tensor:
    """q' = q with each row's `top` likeliest tokens scaled by c, renormalised (Saguaro sampling).

    Drafts are then drawn from q', and verification must use q' - the distribution actually
    sampled - which keeps the output exactly the target's.
    """
    if c >= 1.0:
        return probs
    top_ids = probs.topk(top, dim=-1).indices
    reshaped = probs.scatter(-1, top_ids, probs.gather(-1, top_ids) * c)
    return reshaped / reshaped.sum(-1, keepdim=True)


def branch_node(chain_length: int, branches: int, step: int, branch: int) -> int:
    """The tree node that pre-speculation step `step` fed for `branch`.

    Layout of the drafter's token tree during pre-speculation: nodes 0..chain_length-1 are the
    draft d_1..d_K under verification; then one level per step, all branches side by side:
    step 0 feeds every branch's bonus guess t, step s > 0 feeds every branch's token b_s. So
    the node of (step, branch) is chain_length + step * branches + branch.
    """
    return chain_length + step * branches + branch


@dataclass
class ConfidenceCalibration:
    """The chance a draft token is accepted, by the drafter's confidence in it (its q(d)), learned
    from verification outcomes in `bins` equal bins of confidence, each starting from the running
    acceptance rate (`prior` pseudo-tokens at it).

    A trained drafter's confidence tracks the target's agreement token by token (on the demo pair
    it lifted the hit rate from 0.79 to 0.88), but how closely depends on the pair: a drafter
    that is the target itself, or a random one, can be unsure and always right or sure and wrong.
    Learning the mapping keeps both cases right.
    """

    bins: int = 10
    prior: float = 4.0
    accepted: list[float] = field(default_factory=list)
    judged: list[float] = field(default_factory=list)

    def __post_init__(self):
        self.accepted = self.accepted or [0.0] * self.bins
        self.judged = self.judged or [0.0] * self.bins

    @property
    def empty(self) -> bool:
        return not any(self.judged)

    def _bin(self, confidence: float) -> int:
        return min(int(confidence * self.bins), self.bins - 1)

    def chance(self, confidence: float, rate: float) -> float:
        b = self._bin(confidence)
        return (self.accepted[b] + self.prior * rate) / (self.judged[b] + self.prior)

    def record(self, confidences: list[float], accepted: int) -> None:
        """d_1..d_accepted were accepted and d_{accepted+1} (if any) rejected; later drafts were
        never judged."""
        for i, confidence in enumerate(confidences[: accepted + 1]):
            b = self._bin(confidence)
            self.judged[b] += 1
            self.accepted[b] += i < accepted


@dataclass
class SpeculationCache:
    """What pre-speculation prepared while the target verified: outcome -> branch.

    `steps` is how many steps every branch got (pre-speculation may be interrupted by the
    outcome): branch i holds `steps` draft tokens, the q each was drawn from (sampling only), and
    the drafter's q at each of its positions. Its fed nodes are branch_node(chain_length, ., s, i)
    for s < steps.
    """

    outcomes: dict[tuple[int, int], int] = field(default_factory=dict)
    tokens: list[list[int]] = field(default_factory=list)
    drawn_from: list[list[torch.Tensor]] = field(default_factory=list)
    position_probs: list[list[torch.Tensor]] = field(default_factory=list)
    chain_length: int = 0
    steps: int = 0

    def lookup(self, accepted: int, next_token: int) -> int | None:
        """The branch prepared for this outcome, if it got at least one token."""
        return self.outcomes.get((accepted, next_token)) if self.steps else None

    def fed_nodes(self, branch: int) -> list[int]:
        return [branch_node(self.chain_length, len(self.tokens), s, branch) for s in range(self.steps)]
