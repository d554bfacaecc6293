"""Drafters: whatever proposes the tokens the target then verifies.

A drafter follows the committed sequence through three calls:
  reset(tokens)          - a new sequence, all of `tokens` committed;
  propose(k)             - k draft tokens continuing the committed sequence, with the distribution
                           each was drawn from (None for a deterministic proposal);
  commit(accepted, next) - the first `accepted` drafts were kept, then `next` was emitted.
The engines never look inside; later drafters (prompt lookup, the Saguaro pool) plug in here.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum

import torch

from .prefix_cache import PrefixCache
from .runner import ModelRunner
from .sampling import TokenSampler
from .tree import DynamicTree, TokenTree


class DraftSource(str, Enum):
    """Where a round's draft came from. A str, so stats and JSON read it as plain text."""

    MODEL = "model"  # drafted by the draft model for this round
    LOOKUP = "lookup"  # copied from the sequence itself (prompt lookup)
    CACHE = "cache"  # a Saguaro branch pre-speculated while the previous round was verified
    OFF = "off"  # no draft: speculation was off, the round was a plain target step

    def __str__(self) -> str:
        return self.value


@dataclass
class Proposal:
    tokens: torch.Tensor  # [T] token ids, the nodes of `tree`
    probs: torch.Tensor | None  # [T, V]: what tokens[i] was drawn from; None = deterministic
    tree: TokenTree  # a chain for plain speculative decoding
    source: DraftSource = DraftSource.MODEL

    @classmethod
    def empty(cls) -> Proposal:
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

    `shape` is None (a chain), a list of branching factors (`[4, 2, 1]`: every node at depth d
    gets shape[d] children) or a `DynamicTree`. Each level is one batched forward of the draft
    model with a tree mask. Greedy drafting offers the top tokens; sampling draws siblings one
    after another without replacement and keeps each sibling's distribution for verification.
    The cache holds the committed tokens, then the tree levels fed during the last propose();
    commit() keeps the fed nodes of the accepted path and drops the rest. With a `prefix_cache`
    (the draft model's own), the first propose() loads the longest stored prefix of the sequence.
    """

    def __init__(
        self,
        model,
        sampler: TokenSampler,
        vocab_size: int | None = None,
        capacity: int = 256,
        shape: list[int] | DynamicTree | None = None,
        prefix_cache: PrefixCache | None = None,
        runner: ModelRunner | None = None,
    ):
        # `runner`: one of the draft model's own, e.g. a CompiledRunner kept across calls.
        self.runner = runner or ModelRunner(model, capacity, prefix_cache)
        self.sampler = sampler
        # Ids the target cannot emit (a draft embedding padded beyond the target's) are never
        # proposed: they could only be rejected. q is then the distribution over the rest.
        self.vocab_size = vocab_size
        self.shape = shape
        self.committed: list[int] = []
        self._last = Proposal.empty()
        self._fed_nodes = 0

    def reset(self, tokens: list[int]) -> None:
        self.runner.reset()
        self.committed = list(tokens)
        self._last, self._fed_nodes = Proposal.empty(), 0

    def _levels(self, max_depth: int) -> list[tuple[int, int | None]]:
        """Per level: (children offered per node, most nodes kept; None = all offered)."""
        if isinstance(self.shape, DynamicTree):
            return [(self.shape.top_k, self.shape.top_k)] * min(max_depth, self.shape.depth)
        return [(width, None) for width in (self.shape or [1] * max_depth)[:max_depth]]

    def propose(self, max_depth: int) -> Proposal:
        levels = self._levels(max_depth)
        self._fed_nodes = 0
        if not levels:
            self._last = Proposal.empty()
            return self._last
        budget = self.shape.budget if isinstance(self.shape, DynamicTree) else None
        pending = self.committed[self.runner.length :]  # all of it after reset: a prefill
        if self.shape is None and self.sampler.greedy and hasattr(self.runner, "greedy_chain"):
            # A compiled runner drafts the whole greedy chain in one call, with no wait per token.
            tokens = self.runner.greedy_chain(pending, len(levels), self.vocab_size)
            if tokens is not None:
                self._fed_nodes = len(tokens) - 1  # the last draft is fed next round, as below
                self._last = Proposal(torch.tensor(tokens), None, TokenTree.chain(len(tokens)))
                return self._last
        level_logits = self.runner.feed(pending)[0][None, : self.vocab_size]
        if self.shape is None:
            self._last = self._chain(level_logits, len(levels))
            return self._last
        tree, tokens, probs, frontier, scores = TokenTree(()), [], [], [-1], [1.0]
        for depth, (offered, kept) in enumerate(levels):
            offers = [self._children(logits, offered) for logits in level_logits]
            if kept is not None:
                kept = min(kept, budget - len(tree))
            chosen = best_prefixes(offers, scores, kept)
            if not chosen:
                break
            parents = [frontier[i] for i, _ in chosen]
            tokens += [offers[i][j][0] for i, j in chosen]
            probs += [offers[i][j][1] for i, j in chosen]
            scores = [scores[i] * offers[i][j][2] for i, j in chosen]
            frontier = list(range(len(tree), len(tree) + len(chosen)))
            tree = tree.extend(parents)
            # The last level is fed next round, once we know what survived.
            if depth + 1 < len(levels) and (budget is None or len(tree) < budget):
                level_logits = self.runner.forward(tokens[-len(chosen) :], tree, cached_nodes=self._fed_nodes)
                level_logits = level_logits[:, : self.vocab_size]
                self._fed_nodes = len(tree)
        self._last = Proposal(torch.tensor(tokens), None if self.sampler.greedy else torch.stack(probs), tree)
        return self._last

    def _chain(self, logits: torch.Tensor, length: int) -> Proposal:
        """A chain of `length` drafts after the committed sequence, whose last logits are [1, V]: each
        token is chosen on the device and fed back as a tensor, and the host reads the chain once at
        the end, so a GPU drafts without waiting per token. The same tokens and draws as drafting
        it as a tree of width 1 (`_children`): top-1 when greedy, one draw from q when sampling."""
        tokens, probs = [], []
        for depth in range(length):
            q = self.sampler.probs(logits)
            tokens.append(q.topk(1).indices[:, 0] if self.sampler.greedy else self.sampler.draw(q))
            probs.append(q[0])
            if depth + 1 < length:  # the last draft is fed next round, once we know what survived
                # The newest draft sees the committed context and the drafts before it: a plain step.
                logits = self.runner.forward(tokens[-1])[:, : self.vocab_size]
                self._fed_nodes = depth + 1
        chain = torch.cat(tokens).cpu()  # the round's one host read
        return Proposal(chain, None if self.sampler.greedy else torch.stack(probs), TokenTree.chain(length))

    def _children(self, logits: torch.Tensor, width: int) -> list[tuple[int, torch.Tensor | None, float]]:
        """Up to `width` distinct children in draw order: (token, distribution it was drawn from
        (None when greedy), its draft probability)."""
        q = self.sampler.probs(logits)
        if self.sampler.greedy:
            top = q.topk(width)
            return [(int(t), None, float(p)) for t, p in zip(top.indices, top.values)]
        children, remaining = [], q
        for _ in range(width):
            if remaining.sum() <= 0:  # fewer tokens with mass than siblings asked for
                break
            token = int(self.sampler.draw(remaining))
            children.append((token, remaining, float(q[token])))
            remaining = remaining.clone()
            remaining[token] = 0
            remaining = remaining / remaining.sum() if remaining.sum() > 0 else remaining
        return children

    def commit(self, path: list[int], next_token: int) -> None:
        if len(self._last.tree):  # propose() fed the committed tokens, then self._fed_nodes nodes
            self.runner.commit_path(len(self.committed), [n for n in path if n < self._fed_nodes])
        self.committed += self._last.tokens[path].tolist() + [next_token]
        self._last, self._fed_nodes = Proposal.empty(), 0


def best_prefixes(
    offers: list[list[tuple]], parent_scores: list[float], limit: int | None
) -> list[tuple[int, int]]:
    """(node, sibling) pairs of the `limit` offers with the highest cumulative probability.

    A node's siblings are taken in draw order only: a sampled sibling's q excludes the siblings
    drawn before it, so verification is exact only for a prefix of the draw sequence. The result is
    sorted by node, then sibling, which keeps every node's children in draw order.
    """
    if limit is None:
        return [(i, j) for i, kids in enumerate(offers) for j in range(len(kids))]
    heap = [(-parent_scores[i] * kids[0][2], i, 0) for i, kids in enumerate(offers) if kids]
    heapq.heapify(heap)
    chosen = []
    while heap and len(chosen) < limit:
        _, i, j = heapq.heappop(heap)
        chosen.append((i, j))
        if j + 1 < len(offers[i]):
            heapq.heappush(heap, (-parent_scores[i] * offers[i][j + 1][2], i, j + 1))
    return sorted(chosen)


def lookup_continuation(tokens: list[int], max_tokens: int, max_ngram: int = 3) -> list[int]:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's own
    last n tokens (longest n first, up to max_ngram). Code, summaries and chat about a given text
    repeat themselves, so this model-free proposal is often right and costs nothing."""
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + max_tokens]
    return []


class PromptLookupDrafter(Drafter):
    """Drafts by copying from the sequence itself (no model). Proposals are deterministic:
    verified as q = one-hot, which keeps sampling exact."""

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram
        self.committed: list[int] = []
        self._last: list[int] = []

    def reset(self, tokens: list[int]) -> None:
        self.committed, self._last = list(tokens), []

    def propose(self, max_depth: int) -> Proposal:
        self._last = lookup_continuation(self.committed, max_depth, self.max_ngram)
        return Proposal(
            torch.tensor(self._last, dtype=torch.long),
            None,
            TokenTree.chain(len(self._last)),
            DraftSource.LOOKUP,
        )

    def commit(self, path: list[int], next_token: int) -> None:
        self.committed += [self._last[i] for i in path] + [next_token]
