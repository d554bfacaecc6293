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

Both rules run as whole-tensor operations on the logits' device, as gpt-fast and vLLM's
rejection sampler do for chains: every node is judged at once, the path is the deepest node whose
whole root path was accepted, and the host reads that node and the next token together, once per
round (a GPU waits once, not per node). A chain takes the shortcut `verify_chain_greedy` /
`verify_chain_sampled` (the accepted length is the first failure); a tree, `verify_tree_greedy` /
`verify_tree_sampled`, whose node-by-node walks stay in `decode/verify_walk.py` as the definition
the tests hold them to.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from saguaro.decode.sampling import TokenSampler, greedy_choice
from saguaro.model.tree import TokenTree


def verify_tree_greedy(
    target_scores: torch.Tensor, tokens: torch.Tensor, tree: TokenTree
) -> tuple[list[int], int]:
    """target_scores [1 + T, V], tokens [T] -> (accepted node path, token that follows it).

    The walk of `verify_walk.verify_tree_greedy_walk`, every node judged at once: a node
    matches when its token is the argmax of its parent's row, and is taken when it is the first
    matching child of its parent (the walk's choice among equal siblings); the path ends at the
    deepest node whose every ancestor was taken, and the argmax after it is the next token.
    """
    layout = tree_layout(tree, target_scores.device)
    return _read_tree(*tree_greedy_outcome(target_scores, tokens.to(target_scores.device), layout), tree)


def tree_greedy_outcome(
    target_scores: torch.Tensor, tokens: torch.Tensor, layout: TreeLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """The device side of `verify_tree_greedy`: (the path's last node or -1, the next token), 0-d."""
    choice = greedy_choice(target_scores)
    matches = tokens == choice.index_select(0, layout.parent_rows)
    taken = matches & ~(layout.earlier_siblings & matches[None, :]).any(1)
    end = _deepest_reached(taken, layout)
    return end, choice.index_select(0, end + 1)[0]


def verify_tree_sampled(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    tokens: torch.Tensor,
    tree: TokenTree,
    sampler: TokenSampler,
) -> tuple[list[int], int]:
    """target_probs [1 + T, V]; draft_probs [T, V], row i = the q_i node i was drawn from.

    The recursive rejection sampling of `verify_walk.verify_tree_sampled_walk`, run for
    every parent at once: a parent's children are tried in order, so the k-th children of all
    parents are judged together, each against its parent's running residual (k = 0, 1, ... up to
    the widest node: a loop over the tree's shape, not its outcome). Every parent thus knows which
    child it accepts (at most one) or, if none, the residual to draw from; the walk's path is the
    chain of accepted children from the root, and the next token is drawn from where it ends.
    Node c is judged with uniform u[c], as in the reference: results are identical.
    """
    device = target_probs.device
    uniforms = sampler.uniforms(len(tree)).to(device)
    layout = tree_layout(tree, device)
    end, rest = tree_rejection_outcome(target_probs, draft_probs, tokens.to(device), uniforms, layout)
    return _read_tree(end, sampler.draw(rest)[0], tree)


def tree_rejection_outcome(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    tokens: torch.Tensor,
    uniforms: torch.Tensor,
    layout: TreeLayout,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The device side of `verify_tree_sampled`: (the path's last node or -1, 0-d; the distribution
    the next token is drawn from, [1, V])."""
    running = target_probs.clone()  # row r: the distribution parent row r draws from next
    open_rows = torch.ones(len(running), dtype=torch.bool, device=running.device)  # none accepted yet
    accepted = torch.zeros(len(tokens), dtype=torch.bool, device=running.device)
    for nodes, rows in layout.sibling_ranks:
        p, q = running.index_select(0, rows), draft_probs.index_select(0, nodes)
        x = tokens.index_select(0, nodes)[:, None]
        p_x, q_x = p.gather(1, x)[:, 0], q.gather(1, x)[:, 0]
        was_open = open_rows.index_select(0, rows)
        accept = was_open & (uniforms.index_select(0, nodes) * q_x < p_x)  # u < p/q, no division
        rejected = was_open & ~accept
        accepted[nodes] = accept
        running[rows] = torch.where(rejected[:, None], residual(p, q), p)
        open_rows[rows] = rejected
    end = _deepest_reached(accepted, layout)
    return end, running.index_select(0, end + 1)


@dataclass(frozen=True)
class TreeLayout:
    """A tree's shape as tensors on one device, for judging every node at once."""

    parent_rows: torch.Tensor  # [T] long: the row of [1 + T, V] scores that judges node i (parent + 1)
    depths: torch.Tensor  # [T] long
    ancestors: torch.Tensor  # [T, T] bool: i itself and its ancestors
    earlier_siblings: torch.Tensor  # [T, T] bool: j < i with i's parent
    # Per sibling rank k: (the k-th children of all parents, [n] long; their parents' rows, [n] long).
    sibling_ranks: tuple[tuple[torch.Tensor, torch.Tensor], ...]


@functools.lru_cache(maxsize=256)
def tree_layout(tree: TokenTree, device: torch.device) -> TreeLayout:
    """Made once per tree shape and device, so a round sends no tree structure to the device."""
    parents = torch.tensor(tree.parents, dtype=torch.long).reshape(-1)
    index = torch.arange(len(tree))
    same_parent = parents[:, None] == parents[None, :]
    ranks: dict[int, list[tuple[int, int]]] = {}
    for node, parent in enumerate(tree.parents):
        rank = sum(1 for earlier in tree.parents[:node] if earlier == parent)
        ranks.setdefault(rank, []).append((node, parent + 1))
    sibling_ranks = tuple(
        tuple(torch.tensor(column, dtype=torch.long, device=device) for column in zip(*ranks[rank]))
        for rank in sorted(ranks)
    )
    return TreeLayout(
        parent_rows=(parents + 1).to(device),
        depths=torch.tensor(tree.depths(), dtype=torch.long).reshape(-1).to(device),
        ancestors=tree.ancestor_mask().to(device),
        earlier_siblings=(same_parent & (index[None, :] < index[:, None])).to(device),
        sibling_ranks=sibling_ranks,
    )


def _deepest_reached(taken: torch.Tensor, layout: TreeLayout) -> torch.Tensor:
    """The deepest node whose whole path from the root was taken, or -1 (a 0-d tensor). There is
    at most one per depth: a parent takes at most one child."""
    reached = ~(layout.ancestors & ~taken[None, :]).any(1)
    # Index 0 stands for "no node" (depth key 0); argmax picks the only node of the deepest level.
    key = torch.cat([reached.new_zeros(1, dtype=torch.long), reached * (layout.depths + 1)])
    return key.argmax() - 1


def _read_tree(end: torch.Tensor, next_token: torch.Tensor, tree: TokenTree) -> tuple[list[int], int]:
    """The round's one host read: the path's last node and the next token together."""
    node, token = torch.stack([end, next_token.long()]).tolist()
    return tree.path_to(node), token


def verify_chain_greedy(target_scores: torch.Tensor, tokens: torch.Tensor) -> tuple[list[int], int]:
    """target_scores [1 + K, V], tokens [K] (a chain) -> (accepted positions, the target's next token)."""
    choice = greedy_choice(target_scores)
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
