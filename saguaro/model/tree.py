"""Token trees: the shape of a speculation, as a parent array.

Node i of a tree of T nodes has parent `parents[i]` < i, or -1 when it hangs directly off the
committed context. From the parent array follow everything a forward pass needs:
  * depth    - the node's distance from the context (0 for the first level); its position id is
               context length + depth,
  * ancestor mask - node i may attend node j iff j is i itself or one of its ancestors,
  * paths    - the nodes from the first level down to a node; verifying a tree means choosing one
               such path, and committing it keeps exactly those nodes' KV entries.
A chain of K tokens is the tree with parents [-1, 0, 1, ..., K-2]; every engine goes through this
one representation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenTree:
    parents: tuple[int, ...]

    def __post_init__(self):
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise ValueError(f"tree node {i} has parent {p}; parents must be -1 or an earlier node")

    @classmethod
    def chain(cls, length: int) -> TokenTree:
        return cls(tuple(range(-1, length - 1)))

    def __len__(self) -> int:
        return len(self.parents)

    @property
    def is_chain(self) -> bool:
        return self.parents == tuple(range(-1, len(self) - 1))

    def depths(self) -> list[int]:
        depth: list[int] = []
        for p in self.parents:
            depth.append(0 if p < 0 else depth[p] + 1)
        return depth

    def ancestor_mask(self) -> torch.Tensor:
        """[T, T] bool: row i is True at i and at each ancestor of i."""
        size = len(self)
        mask = torch.zeros(size, size, dtype=torch.bool)
        for i, p in enumerate(self.parents):
            if p >= 0:
                mask[i] = mask[p]
            mask[i, i] = True
        return mask

    def path_to(self, node: int) -> list[int]:
        """Node indices from the first level down to `node` (inclusive); [] for node -1."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def children(self, node: int) -> list[int]:
        """Children of `node` (-1 for the first level), in index order."""
        return [i for i, p in enumerate(self.parents) if p == node]

    def under_root(self) -> TokenTree:
        """This tree hung below one new root node 0: the shape the target verifies, whose root is the
        last committed token (its logits judge the first level)."""
        return TokenTree((-1,) + tuple(p + 1 for p in self.parents))

    def extend(self, parents) -> TokenTree:
        return TokenTree(self.parents + tuple(parents))


@dataclass(frozen=True)
class DynamicTree:
    """A tree shaped while drafting, where the drafter is confident (EAGLE-2 style).

    Level by level, every frontier node offers its top_k children; the offers with the highest
    cumulative draft probability (the product of q along the path) are kept: at most top_k per
    level, at most budget nodes in all, over at most `depth` levels.
    """

    depth: int = 4
    top_k: int = 4
    budget: int = 16

    def __post_init__(self):
        if min(self.depth, self.top_k, self.budget) < 1:
            raise ValueError(f"DynamicTree needs depth, top_k and budget >= 1, got {self}")


def static_tree(branching: list[int]) -> TokenTree:
    """Every node at depth d gets branching[d] children: [4, 2, 1] -> 4 + 8 + 8 nodes."""
    parents: list[int] = []
    frontier = [-1]
    for width in branching:
        level = []
        for node in frontier:
            for _ in range(width):
                parents.append(node)
                level.append(len(parents) - 1)
        frontier = level
    return TokenTree(tuple(parents))
