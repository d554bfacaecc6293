"""Saguaro's pieces as small pure functions and one dataclass (the speculation cache).

The drafter side of speculative speculative decoding (prespeculation.py) is a loop around these:
  * `predict_outcomes` - which verification outcomes (k accepted, bonus token t) to prepare;
  * `saguaro_reshape`  - Saguaro sampling: damp the draft's top tokens so that a rejection leaves
    its residual mass on exactly the tokens prepared as bonus guesses;
  * `branch_node`      - where each prepared branch's tokens sit in the drafter's token tree;
  * `SpeculationCache` - outcome -> the branch drafted for it, as far as pre-speculation got.
The fan-out per outcome (how many bonus guesses for each k) is `fanout.geometric_fanout`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def predict_outcomes(
    position_probs: list[torch.Tensor], drafts: list[int], fanout: list[int]
) -> list[tuple[int, int]]:
    """The outcomes (k, t) to pre-speculate: for each k, the fanout[k] likeliest bonus tokens.

    position_probs[k] is the drafter's q after d_1..d_k. A rejected d_{k+1} is never the bonus
    token (the residual max(0, p - q) is zero there), so it is excluded; for k = K nothing is.
    Tokens with no mass are never guessed. A draft token the drafter's vocabulary lacks (copied
    from the sequence by prompt lookup) has no entry to exclude.
    """
    outcomes = []
    for k, fan in enumerate(fanout):
        probs = position_probs[k].clone()
        if k < len(drafts) and drafts[k] < probs.shape[-1]:
            probs[drafts[k]] = 0
        top = probs.topk(min(fan, probs.shape[-1]))
        outcomes += [(k, int(t)) for t, p in zip(top.indices.tolist(), top.values.tolist()) if p > 0]
    return outcomes


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
