"""Drafters: whatever proposes the tokens the target then verifies.

A drafter follows the committed sequence through three calls:
  reset(tokens)          - a new sequence, all of `tokens` committed;
  propose(k)             - k draft tokens continuing the committed sequence, with the distribution
                           each was drawn from (None for a deterministic proposal);
  commit(accepted, next) - the first `accepted` drafts were kept, then `next` was emitted.
The engines never look inside; later drafters (prompt lookup, the Saguaro pool) plug in here.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from .runner import ModelRunner
from .sampling import TokenSampler
from .tree import TokenTree


@dataclass
class Proposal:
    tokens: torch.Tensor  # [T] token ids, the nodes of `tree`
    probs: torch.Tensor | None  # [T, V]: what tokens[i] was drawn from; None = deterministic
    tree: TokenTree  # a chain for plain speculative decoding

    @classmethod
    def empty(cls) -> "Proposal":
        return cls(torch.empty(0, dtype=torch.long), None, TokenTree(()))


class Drafter(ABC):
    @abstractmethod
    def reset(self, tokens: list[int]) -> None: ...

    @abstractmethod
    def propose(self, max_depth: int) -> Proposal: ...

    @abstractmethod
    def commit(self, path: list[int], next_token: int) -> None:
        """The proposal's nodes `path` (root to leaf) were accepted, then `next_token` was emitted."""


class ModelDrafter(Drafter):
    """Drafts with a small causal LM, level by level, reusing its KV cache across rounds.

    `branching[d]` children per node at depth d: [1, 1, 1, 1] is a chain of 4 (the default when
    branching is None), [4, 2, 1] a tree. Each level is one batched forward of the draft model
    with a tree mask. Greedy drafting takes the top tokens; sampling draws siblings one after
    another without replacement and keeps each sibling's distribution for verification.
    The cache holds the committed tokens, then the tree levels fed during the last propose();
    commit() keeps the fed nodes of the accepted path and drops the rest.
    """

    def __init__(self, model, sampler: TokenSampler, vocab_size: int | None = None, capacity: int = 256,
                 branching: list[int] | None = None):
        self.runner = ModelRunner(model, capacity)
        self.sampler = sampler
        # Ids the target cannot emit (a draft embedding padded beyond the target's) are never
        # proposed: they could only be rejected. q is then the distribution over the rest.
        self.vocab_size = vocab_size
        self.branching = branching
        self.committed: list[int] = []
        self._last = Proposal.empty()
        self._fed_nodes = 0

    def reset(self, tokens: list[int]) -> None:
        self.runner.reset()
        self.committed = list(tokens)
        self._last, self._fed_nodes = Proposal.empty(), 0

    def propose(self, max_depth: int) -> Proposal:
        widths = (self.branching or [1] * max_depth)[:max_depth]
        self._fed_nodes = 0
        if not widths:
            self._last = Proposal.empty()
            return self._last
        pending = self.committed[self.runner.length :]
        level_logits = self.runner.forward(pending, last_only=True)[-1:, : self.vocab_size]
        tree, tokens, probs, frontier = TokenTree(()), [], [], [-1]
        for depth, width in enumerate(widths):
            parents = []
            for node, logits in zip(frontier, level_logits):
                for token, q in self._children(logits, width):
                    parents.append(node)
                    tokens.append(token)
                    probs.append(q)
            frontier = list(range(len(tree), len(tree) + len(parents)))
            tree = tree.extend(parents)
            if depth + 1 < len(widths):  # the last level is fed next round, once we know what survived
                level_logits = self.runner.forward(tokens[-len(parents) :], tree, cached_nodes=self._fed_nodes)
                level_logits = level_logits[:, : self.vocab_size]
                self._fed_nodes = len(tree)
        self._last = Proposal(torch.tensor(tokens), None if self.sampler.greedy else torch.stack(probs), tree)
        return self._last

    def _children(self, logits: torch.Tensor, width: int):
        """`width` distinct child tokens, each with the distribution it was drawn from (None if greedy)."""
        if self.sampler.greedy:
            return [(int(t), None) for t in logits.topk(width).indices]
        q = self.sampler.probs(logits)
        children = []
        for _ in range(width):
            if q.sum() <= 0:  # fewer tokens with mass than siblings asked for
                break
            token = int(self.sampler.draw(q))
            children.append((token, q))
            q = q.clone()
            q[token] = 0
            q = q / q.sum() if q.sum() > 0 else q
        return children

    def commit(self, path: list[int], next_token: int) -> None:
        if len(self._last.tree):  # propose() fed the committed tokens, then self._fed_nodes nodes
            self.runner.commit_path(len(self.committed), [n for n in path if n < self._fed_nodes])
        self.committed += self._last.tokens[path].tolist() + [next_token]
        self._last, self._fed_nodes = Proposal.empty(), 0
