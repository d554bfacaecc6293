"""Lossless verification of drafted tokens against the target's distributions.

Chain (Leviathan et al. 2023; Chen et al. 2023). The draft proposed x_1..x_K, x_i drawn from q_i;
the target scored every prefix in one forward, giving p_1..p_{K+1}.
  * Greedy: accept while x_i == argmax p_i; the first mismatch is replaced by argmax p_i, and if
    all match, argmax p_{K+1} is a free bonus token. The output is exactly greedy decoding.
  * Sampling: accept x_i with probability min(1, p_i(x_i) / q_i(x_i)). On the first rejection
    draw from the residual r_i = norm(max(0, p_i - q_i)) and stop; if all K are accepted draw the
    bonus from p_{K+1}. Per position, P(emit t) = min(p, q)(t) + (1 - sum min(p, q)) * r(t) = p(t),
    so the output has exactly the target's distribution, whatever q is - provided x_i really was
    drawn from q_i.
  * Deterministic proposals (prompt lookup, cached branches used while sampling) are the special
    case q_i = one-hot(x_i): accept with p_i(x_i), else draw from p_i with x_i removed.
"""
from __future__ import annotations

import torch

from .sampling import TokenSampler


def verify_greedy(target_logits: torch.Tensor, draft_tokens: torch.Tensor) -> tuple[int, int]:
    """target_logits [K+1, V], draft_tokens [K] -> (accepted count, token that follows them)."""
    choice = target_logits.argmax(-1)
    k = len(draft_tokens)
    mismatch = (choice[:k] != draft_tokens.to(choice.device)).nonzero()
    accepted = int(mismatch[0]) if len(mismatch) else k
    return accepted, int(choice[accepted])


def one_hot_probs(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The 'distribution' a deterministic proposal was drawn from."""
    return torch.nn.functional.one_hot(tokens.long(), vocab_size).float()


def verify_sampled(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    sampler: TokenSampler,
) -> tuple[int, int]:
    """target_probs [K+1, V], draft_probs [K, V] (what each draft token was drawn from), draft_tokens [K]."""
    for i, x in enumerate(draft_tokens.tolist()):
        p, q = target_probs[i], draft_probs[i]
        # u < p/q written as u*q < p: no division by a zero q.
        if sampler.uniform() * q[x] < p[x]:
            continue
        return i, residual_draw(p, q, sampler)
    return len(draft_tokens), int(sampler.draw(target_probs[len(draft_tokens)]))


def residual_draw(p: torch.Tensor, q: torch.Tensor, sampler: TokenSampler) -> int:
    """Draw from norm(max(0, p - q)), the part of p the rejected proposal did not cover."""
    residual = (p - q).clamp_min_(0)
    total = residual.sum()
    # A rejection means p(x) < q(x), so the residual has mass sum(max(0, p-q)) = TV(p, q) > 0;
    # only float rounding can make it vanish, and then p itself is the right distribution.
    return int(sampler.draw(residual / total if total > 0 else p))
