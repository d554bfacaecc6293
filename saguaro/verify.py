"""Lossless verification of drafted tokens against the target's distributions.

The draft is a token tree (a chain is a tree with one child per node). The target scored the last
committed token (the root) and every node in one forward: row 0 of its output judges the first
level, row 1 + i judges the children of node i. Verification walks down from the root:

  * Greedy: move to the child whose token equals the target's argmax; when no child matches,
    emit the argmax itself and stop. On a chain this is the classic rule - accept while the draft
    equals argmax p_i, then the target's own token (a free bonus when all K match) - and the output
    is exactly greedy decoding.
  * Sampling (Leviathan et al. 2023; Chen et al. 2023; for siblings, SpecInfer / EAGLE's recursive
    rejection sampling). Node children x_1..x_m were drawn one after another, x_i from q_i (the
    draft's q with x_1..x_{i-1} removed and renormalised). With target distribution p_1 = p:
    accept x_i with probability min(1, p_i(x_i) / q_i(x_i)); on rejection continue with the
    residual p_{i+1} = norm(max(0, p_i - q_i)); if every child is rejected, draw from the last
    residual. Per sibling, P(emit t) = min(p_i, q_i)(t) + (1 - sum min(p_i, q_i)) p_{i+1}(t) = p_i(t),
    so by induction the emitted token has exactly distribution p, whatever the q_i - provided x_i
    really was drawn from q_i.
  * Deterministic proposals (top-k children, prompt lookup) are the case q_i = one-hot(x_i):
    accept with p_i(x_i), else remove x_i from p_i. Verifying them by "argmax match" while
    sampling would not be exact.

A chain (one child per node) is verified by `verify_chain_greedy` / `verify_chain_sampled` as
whole-tensor operations on the logits' device, as gpt-fast and vLLM's rejection sampler do: every
position is judged at once, the accepted length is the first failure, and the host reads the
accepted length and the next token together, once per round (a GPU waits once, not per node).
"""

from __future__ import annotations

import torch

from .sampling import TokenSampler
from .tree import TokenTree


def verify_tree_greedy(
    target_logits: torch.Tensor, tokens: torch.Tensor, tree: TokenTree
) -> tuple[list[int], int]:
    """target_logits [1 + T, V], tokens [T] -> (accepted node path, token that follows it)."""
    choice = target_logits.argmax(-1).tolist()
    tokens = tokens.tolist()
    path, node = [], -1
    while True:
        want = choice[node + 1]
        node = next((c for c in tree.children(node) if tokens[c] == want), None)
        if node is None:
            return path, want
        path.append(node)


def verify_tree_sampled(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    tokens: torch.Tensor,
    tree: TokenTree,
    sampler: TokenSampler,
) -> tuple[list[int], int]:
    """target_probs [1 + T, V]; draft_probs [T, V], row i = the q_i node i was drawn from."""
    tokens = tokens.tolist()
    path, node = [], -1
    while True:
        p = target_probs[node + 1]
        for child in tree.children(node):
            x, q = tokens[child], draft_probs[child]
            # u < p/q written as u*q < p: no division by a zero q.
            if sampler.uniform() * q[x] < p[x]:
                path.append(child)
                node = child
                break
            p = residual(p, q)
        else:
            return path, int(sampler.draw(p))


def verify_chain_greedy(target_scores: torch.Tensor, tokens: torch.Tensor) -> tuple[list[int], int]:
    """target_scores [1 + K, V], tokens [K] (a chain) -> (accepted positions, the target's next token)."""
    choice = target_scores.argmax(-1)
    accepted = _leading_true(tokens.to(choice.device) == choice[:-1])
    return _read(accepted, choice[accepted])


def verify_chain_sampled(
    target_probs: torch.Tensor, draft_probs: torch.Tensor, tokens: torch.Tensor, sampler: TokenSampler
) -> tuple[list[int], int]:
    """target_probs [1 + K, V], draft_probs [K, V] (row i: what tokens[i] was drawn from), a chain.

    Draft i is accepted iff u_i q_i(x_i) < p_i(x_i) and every draft before it was; the first
    rejected position's residual norm(max(0, p - q)), or p_K after K acceptances, gives the next
    token. One uniform per position is drawn up front: those after the first rejection go unused,
    as independent draws that are never looked at change no outcome's probability.
    """
    count = len(tokens)
    tokens = tokens.to(target_probs.device)
    uniforms = sampler.uniforms(count).to(target_probs.device)
    p_x = target_probs[:count].gather(1, tokens[:, None])[:, 0]
    q_x = draft_probs.gather(1, tokens[:, None])[:, 0]
    accepted = _leading_true(uniforms * q_x < p_x)  # u < p/q without dividing by a zero q
    candidates = torch.cat([residual(target_probs[:count], draft_probs), target_probs[count:]])
    return _read(accepted, sampler.draw(candidates.index_select(0, accepted[None]))[0])


def _leading_true(flags: torch.Tensor) -> torch.Tensor:
    """How many of `flags` are True before the first False (a 0-d tensor, on their device)."""
    return flags.long().cumprod(0).sum()


def _read(accepted: torch.Tensor, next_token: torch.Tensor) -> tuple[list[int], int]:
    """The round's one host read: the accepted length and the next token together."""
    length, token = torch.stack([accepted, next_token.long()]).tolist()
    return list(range(length)), token


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) along the last dimension (per row of [..., V]): the part of p that a
    rejected proposal drawn from q did not cover. Tensor ops only: no host read."""
    rest = (p - q).clamp_min_(0)
    total = rest.sum(-1, keepdim=True)
    # A rejection means p(x) < q(x), so the residual has mass sum(max(0, p-q)) = TV(p, q) > 0;
    # only float rounding can make it vanish, and then p itself is the right distribution.
    return torch.where(total > 0, rest / total.clamp_min(torch.finfo(rest.dtype).tiny), p)


def one_hot_probs(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The 'distribution' a deterministic proposal was drawn from."""
    return torch.nn.functional.one_hot(tokens.long(), vocab_size).float()
