"""Drafters: whatever proposes the tokens the target then verifies, and `InlineDrafts`, which
serves a drafter to the decoding loop through the one draft protocol (draft/stream.py).

A drafter follows the committed sequence through three calls:
  reset(tokens)          - a new sequence, all of `tokens` committed;
  propose(k)             - a `Draft` of at most k levels continuing the committed sequence (a chain
                           or a tree), with the distribution each token was drawn from (None for a
                           deterministic proposal);
  commit(path, next)     - the draft's nodes `path` (root to leaf) were kept, then `next` was emitted.
"""

from __future__ import annotations

import heapq
import time
from abc import ABC, abstractmethod

import torch

from saguaro.decode.sampling import TokenSampler, check_drafted, drawable
from saguaro.draft.chain import draft_chain
from saguaro.draft.stream import CatchUp, Draft, DraftRequest, DraftSource, DraftStream, Reset, Resolve
from saguaro.model.prefix_cache import PrefixCache
from saguaro.model.runner import ModelRunner
from saguaro.model.tree import DynamicTree, TokenTree


class Drafter(ABC):
    @abstractmethod
    def reset(self, tokens: list[int]) -> None: ...

    @abstractmethod
    def propose(self, max_depth: int) -> Draft: ...

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
        self._last = Draft([])
        self._fed_nodes = 0
        self._finite: list[torch.Tensor] = []

    def reset(self, tokens: list[int]) -> None:
        self.runner.reset()
        self.committed = list(tokens)
        self._last, self._fed_nodes = Draft([]), 0

    def _levels(self, max_depth: int) -> list[tuple[int, int | None]]:
        """Per level: (children offered per node, most nodes kept; None = all offered)."""
        if isinstance(self.shape, DynamicTree):
            return [(self.shape.top_k, self.shape.top_k)] * min(max_depth, self.shape.depth)
        return [(width, None) for width in (self.shape or [1] * max_depth)[:max_depth]]

    def propose(self, max_depth: int) -> Draft:
        levels = self._levels(max_depth)
        self._fed_nodes = 0
        if not levels:
            self._last = Draft([])
            return self._last
        budget = self.shape.budget if isinstance(self.shape, DynamicTree) else None
        pending = self.committed[self.runner.length :]  # all of it after reset: a prefill
        if self.shape is None and self.sampler.greedy and self.runner.greedy_steps:
            # A compiled runner drafts the whole greedy chain in one call, with no wait per token.
            tokens = self.runner.greedy_chain(pending, len(levels), self.vocab_size)
            if tokens is not None:
                self._fed_nodes = len(tokens) - 1  # the last draft is fed next round, as below
                self._last = Draft(tokens)
                return self._last
        level_logits = self.runner.feed(pending)[0][None, : self.vocab_size]
        if self.shape is None:
            self._fed_nodes = len(levels) - 1  # the last draft is fed next round, as below
            chain = draft_chain(
                self.runner, level_logits, len(levels), self.sampler, self._draw, self.vocab_size
            )
            self._last = Draft(chain.tokens, chain.drawn_from)
            return self._last
        # Each level stays on the device: its children are chosen for every frontier node at once,
        # and the host reads a level only where its shape depends on it (a budgeted tree keeps the
        # likeliest offers; a sampled node may run out of mass), so a fixed greedy tree is read once.
        fixed = budget is None and self.sampler.greedy
        self._finite = []  # per level: whether its q was finite, read with the tokens
        tree, frontier, scores = TokenTree(()), [-1], torch.ones(1, device=level_logits.device)
        tokens, probs = [], []  # per level: chosen children [n], the q each was drawn from [n, V]
        for depth, (offered, kept) in enumerate(levels):
            children, drawn_from, chances = self._offers(level_logits, offered)
            cumulative = scores[:, None] * chances
            if fixed:
                chosen = [(i, j) for i in range(len(frontier)) for j in range(children.shape[1])]
            else:
                if kept is not None:
                    kept = min(kept, budget - len(tree))
                # Siblings with mass form a prefix of each node's draw order (judged by the child's
                # own chance: a deep path's product may underflow to 0 and still be drafted).
                ranked, alive = torch.stack([cumulative, chances]).tolist()
                offers = [[(None, None, c) for c, a in zip(*row) if a > 0] for row in zip(ranked, alive)]
                chosen = best_prefixes(offers, [1.0] * len(offers), kept)
            if not chosen:
                break
            rows = torch.tensor([i for i, _ in chosen], device=children.device)
            cols = torch.tensor([j for _, j in chosen], device=children.device)
            tokens.append(children[rows, cols])
            if drawn_from is not None:
                probs.append(drawn_from[rows, cols])
            scores = cumulative[rows, cols]
            first_new = len(tree)
            tree = tree.extend([frontier[i] for i, _ in chosen])
            frontier = list(range(first_new, len(tree)))
            # The last level is fed next round, once we know what survived.
            if depth + 1 < len(levels) and (budget is None or len(tree) < budget):
                level_logits = self.runner.forward(tokens[-1], tree, cached_nodes=self._fed_nodes)
                level_logits = level_logits[:, : self.vocab_size]
                self._fed_nodes = len(tree)
        drafted = check_drafted(tokens, self._finite)  # the round's one read of its tokens
        self._last = Draft(drafted, torch.cat(probs) if probs else None, tree=tree)
        return self._last

    def _draw(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A chain's next token from q [1, V] and the q it was drawn from (None when greedy): the
        same token and draw as drafting it as a tree of width 1 (`_offers`), top-1 when greedy,
        one draw from q when sampling."""
        if self.sampler.greedy:
            return q.topk(1).indices[:, 0], None
        return self.sampler.draw(q), q

    def _offers(
        self, logits: torch.Tensor, width: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Up to `width` distinct children of every node whose logits are the rows of [N, V], in
        draw order: tokens [N, width], the distribution each was drawn from ([N, width, V]; None
        when greedy) and its draft probability [N, width]. Greedy offers the top tokens; sampling
        draws siblings one after another without replacement. A sibling drawn after its node ran
        out of mass (fewer tokens with mass than siblings asked for) gets probability 0."""
        q, finite = drawable(self.sampler.probs(logits))
        self._finite.append(finite)
        if self.sampler.greedy:
            top = q.topk(min(width, q.shape[-1]), dim=-1)
            return top.indices, None, top.values
        tokens, drawn_from, chances = [], [], []
        remaining = q
        for _ in range(width):
            mass = remaining.sum(-1, keepdim=True)
            # A row with no mass left draws from a stand-in (multinomial refuses an empty row); its
            # sibling is then marked impossible and never offered.
            token = self.sampler.draw(torch.where(mass > 0, remaining, torch.ones_like(remaining)))
            chance = q.gather(-1, token[:, None])[:, 0] * (mass[:, 0] > 0)
            tokens.append(token)
            drawn_from.append(remaining)
            chances.append(chance)
            remaining = remaining.scatter(-1, token[:, None], 0.0)
            remaining = remaining / remaining.sum(-1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)
        return torch.stack(tokens, 1), torch.stack(drawn_from, 1), torch.stack(chances, 1)

    def remember(self, sequence: list[int]) -> None:
        """Store the KV of `sequence` (which extends the committed tokens) as far as the cache holds
        it: committed tokens only, as the entries after them may be nodes of a draft whose outcome
        the drafter was never told (the last round of a call)."""
        self.runner.remember(sequence[: len(self.committed)])

    def commit(self, path: list[int], next_token: int) -> None:
        if len(self._last.tree):  # propose() fed the committed tokens, then self._fed_nodes nodes
            self.runner.commit_path(len(self.committed), [n for n in path if n < self._fed_nodes])
        self.committed += [self._last.tokens[node] for node in path] + [next_token]
        self._last, self._fed_nodes = Draft([]), 0


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

    def propose(self, max_depth: int) -> Draft:
        self._last = lookup_continuation(self.committed, max_depth, self.max_ngram)
        return Draft(self._last, None, DraftSource.LOOKUP)

    def commit(self, path: list[int], next_token: int) -> None:
        self.committed += [self._last[i] for i in path] + [next_token]


class InlineDrafts(DraftStream):
    """A `Drafter` behind the draft protocol: it drafts when asked, in this thread, so the target
    waits for every draft (resolve = commit the outcome, then propose the next draft). `begin`
    drafts at once; its ticket is the draft."""

    def __init__(self, drafter: Drafter):
        self.drafter = drafter
        self.known = 0  # committed tokens the drafter has been told of

    def begin(self, request: DraftRequest) -> Draft:
        start = time.perf_counter()
        match request:
            case Reset(committed, _, draft):
                self.drafter.reset(committed)
                self.known = len(committed)
                if not draft:
                    return Draft.off()
            case Resolve(path, next_token):
                self.drafter.commit(path, next_token)
                self.known += len(path) + 1
            case CatchUp(committed):
                # The last draft's outcome was never resolved: none of its nodes is kept (the tokens
                # it got right arrive as committed tokens, which the drafter feeds at its next proposal).
                for token in committed[self.known :]:
                    self.drafter.commit([], token)
                self.known = len(committed)
        draft = self.drafter.propose(request.depth)
        draft.busy_seconds = time.perf_counter() - start
        return draft

    def end(self, ticket: Draft) -> Draft:
        return ticket
