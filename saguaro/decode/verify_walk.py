"""Tree verification as a walk down the tree, node by node: slow (a host read per node), and
obviously the rule `decode/verify.py` states. `verify.verify_tree_greedy` / `verify_tree_sampled` do the
same as tensor operations on the logits' device; tests hold them to identical results.

Sampled verification takes one uniform per node, up front (`sampler.uniforms(T)`), and tests
child c with u[c]: the walk looks at each visited child's uniform once and never at the others,
so the outcome's distribution is that of fresh draws, and the tensor version, which judges every
node at once, consumes the generator identically.
"""

from __future__ import annotations

import torch

from saguaro.decode.sampling import TokenSampler
from saguaro.decode.verify import residual
from saguaro.model.tree import TokenTree


def verify_tree_greedy_walk(
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


def verify_tree_sampled_walk(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    tokens: torch.Tensor,
    tree: TokenTree,
    sampler: TokenSampler,
) -> tuple[list[int], int]:
    """target_probs [1 + T, V]; draft_probs [T, V], row i = the q_i node i was drawn from."""
    uniforms = sampler.uniforms(len(tokens)).tolist()
    tokens = tokens.tolist()
    path, node = [], -1
    while True:
        p = target_probs[node + 1]
        for child in tree.children(node):
            x, q = tokens[child], draft_probs[child]
            # u < p/q written as u*q < p: no division by a zero q.
            if uniforms[child] * q[x] < p[x]:
                path.append(child)
                node = child
                break
            p = residual(p, q)
        else:
            return path, int(sampler.draw(p))
