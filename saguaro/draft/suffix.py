"""Suffix decoding: a model-free drafter over everything an engine has seen.

`SuffixIndex` holds the prompts and outputs of many requests (shared, thread-safe, bounded by a
token budget, oldest tokens evicted first). Asked about a context, it finds the longest suffix of
the context (at most `max_match` tokens, at least `min_match`) that occurred in what it holds, and
returns the tokens that followed its most recent occurrence. Agentic and code-editing work repeats
itself (the same file, tool output or plan again, a little changed), so such a continuation is
often what the target says next, and proposing it costs no model forward.

`SuffixDrafter` is a `Drafter` like `PromptLookupDrafter` (it drops in wherever prompt lookup is
used): it drafts from its own sequence first and from the shared index, and publishes its
sequence there as tokens become final.

The index is a compressed trie of reversed contexts. Every indexed token t (an *occurrence*) is a
path from the root that spells the tokens before t backwards, newest first, up to `max_match` of
them. A node stands for the contexts that agree down to its `depth` and keeps the newest
occurrence below it, whose own tokens spell the node's edge (path compression: nodes are at most
twice the occurrences, not `max_match` times). A lookup walks the context backwards from its last
token; how far it gets is the longest match, and the node where it stops names the newest
occurrence matching that far. Adding, evicting and looking up a token each walk one path:
O(max_match), whatever the index holds.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import NamedTuple

from saguaro.draft.drafters import Drafter
from saguaro.draft.stream import Draft, DraftSource

MAX_MATCH = 32  # longer contexts add cost to every token indexed and rarely choose better
MIN_MATCH = 2  # a single shared token predicts too little to be worth a draft
DEFAULT_BUDGET = 1 << 17  # tokens; about 300 bytes each in CPython


class SuffixHandle:
    """One indexed sequence. It keeps all its tokens, so that the contexts of its occurrences stay
    readable while its oldest tokens are evicted; the index lets go of it with its last one."""

    __slots__ = ("tokens",)

    def __init__(self):
        self.tokens: list[int] = []


class _Occurrence:
    """Token `index` of `sequence`, as indexed: the token that followed its context."""

    __slots__ = ("sequence", "index")

    def __init__(self, sequence: SuffixHandle, index: int):
        self.sequence, self.index = sequence, index

    def context(self, depth: int) -> int:
        """The token `depth + 1` places before this one."""
        return self.sequence.tokens[self.index - depth - 1]


class _Node:
    """Contexts that agree on their last `depth` tokens; `newest` is the newest occurrence below."""

    __slots__ = ("depth", "newest", "children")

    def __init__(self, depth: int, newest: _Occurrence | None):
        self.depth = depth
        self.newest = newest
        self.children: dict[int, _Node] = {}  # keyed by the context token at this node's depth


class Continuation(NamedTuple):
    match_length: int  # context tokens matched (0: no match of at least min_match)
    tokens: list[int]  # what followed the newest occurrence of that match


NO_MATCH = Continuation(0, [])


class SuffixIndex:
    """Prompts and outputs of many sequences, for suffix lookups (see the module docstring).

    `add(tokens)` starts a sequence and returns its handle, `extend(handle, tokens)` appends the
    tokens that became final, `lookup(context, max_tokens)` proposes a continuation. With `budget`
    tokens indexed (None: no bound), each new token evicts the oldest. Every call holds the
    index's lock, so engines' threads and rows may share one index.
    """

    def __init__(
        self, budget: int | None = DEFAULT_BUDGET, max_match: int = MAX_MATCH, min_match: int = MIN_MATCH
    ):
        if not 1 <= min_match <= max_match:
            raise ValueError(f"need 1 <= min_match <= max_match, got {min_match} and {max_match}")
        if budget is not None and budget < 1:
            raise ValueError(f"budget must be a positive number of tokens or None, got {budget}")
        self.budget = budget
        self.max_match = max_match
        self.min_match = min_match
        self._root = _Node(0, None)
        self._order: deque[_Occurrence] = deque()  # indexed occurrences, oldest first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Tokens indexed."""
        return len(self._order)

    @property
    def node_count(self) -> int:
        """Trie nodes, at most 2 per indexed token (+ the root): the memory the budget bounds. Counted
        by a walk over them all: for tests and diagnostics, not for every step."""
        with self._lock:
            return _count(self._root)

    def add(self, tokens: list[int]) -> SuffixHandle:
        handle = SuffixHandle()
        self.extend(handle, tokens)
        return handle

    def extend(self, handle: SuffixHandle, tokens: list[int]) -> None:
        with self._lock:
            for token in tokens:
                handle.tokens.append(token)
                self._insert(_Occurrence(handle, len(handle.tokens) - 1))
                while self.budget is not None and len(self._order) > self.budget:
                    self._evict(self._order.popleft())

    def lookup(self, context: list[int], max_tokens: int) -> Continuation:
        """The longest suffix of `context` (up to max_match tokens) seen followed by a token, and up
        to `max_tokens` tokens that followed its newest occurrence.

        The newest, not the most frequent: the newest occurrence is one real span of text (its
        tokens belong together), it follows the latest version of what is being repeated (a file
        as last edited, not as first read), and an engine's own running request is newest of all.
        """
        if max_tokens < 1:
            return NO_MATCH
        with self._lock:
            node, matched = self._root, 0
            limit = min(len(context), self.max_match)
            while matched < limit:
                child = node.children.get(context[-matched - 1])
                if child is None:
                    break
                # The edge's tokens are the newest occurrence's context; the key matched its first.
                newest, matched = child.newest, matched + 1
                while matched < min(child.depth, limit) and newest.context(matched) == context[-matched - 1]:
                    matched += 1
                node = child
                if matched < child.depth:
                    break
            if matched < self.min_match:
                return NO_MATCH
            newest = node.newest
            return Continuation(matched, newest.sequence.tokens[newest.index : newest.index + max_tokens])

    def _insert(self, occurrence: _Occurrence) -> None:
        """Index `occurrence` along the path of its context; every node it passes now names it."""
        self._order.append(occurrence)
        full = min(occurrence.index, self.max_match)  # how far back its context reaches
        parent, node = None, self._root
        while True:
            node.newest = occurrence
            if node.depth == full:
                return
            key = occurrence.context(node.depth)
            child = node.children.get(key)
            if child is None:
                if parent is not None and not node.children:
                    # A leaf whose contexts this one extends: the leaf deepens to it (a lookup that
                    # gets as far as the leaf did finds this newer occurrence either way).
                    node.depth = full
                else:
                    node.children[key] = _Node(full, occurrence)
                return
            # Follow the edge while the contexts agree; where they part (or this context ends),
            # split it with a node at that depth.
            depth, end = node.depth + 1, min(child.depth, full)
            while depth < end and occurrence.context(depth) == child.newest.context(depth):
                depth += 1
            if depth < child.depth:
                middle = _Node(depth, occurrence)
                middle.children[child.newest.context(depth)] = child
                node.children[key] = middle
                child = middle
            if parent is not None and len(node.children) == 1:
                # Its newest occurrence now goes on through its only child, which tells all it did.
                parent.children[occurrence.context(parent.depth)] = child
            else:
                parent = node
            node = child

    def _evict(self, occurrence: _Occurrence) -> None:
        """Drop the oldest occurrence. The nodes that name it as their newest hold nothing newer (an
        evicted occurrence is the oldest indexed): they end its path, so the first of them goes,
        with what lies below it."""
        path = [self._root]
        while path[-1].newest is not occurrence:
            if path[-1].depth >= min(occurrence.index, self.max_match):
                return  # newer occurrences with its context took its place
            path.append(path[-1].children[occurrence.context(path[-1].depth)])
        if len(path) == 1:  # the index held nothing newer: it is empty now
            self._root = _Node(0, None)
            return
        parent = path[-2]
        del parent.children[occurrence.context(parent.depth)]
        # A node left with one child, through which its newest occurrence goes, tells nothing its
        # child does not: the child takes its place (as in _insert), so that every node but the
        # root ends an occurrence or parts two, at most two nodes per occurrence.
        if len(path) > 2 and len(parent.children) == 1:
            (child,) = parent.children.values()
            if child.newest is parent.newest:
                path[-3].children[occurrence.context(path[-3].depth)] = child


def _count(node: _Node) -> int:
    """Nodes in the subtree of `node`."""
    total, stack = 0, [node]
    while stack:
        total += 1
        stack.extend(stack.pop().children.values())
    return total


class SuffixDrafter(Drafter):
    """Drafts by suffix lookup (no model): from the drafter's own sequence and, if given, from
    `shared`, the index of what the engine has seen. The longer match wins; on a tie, the own
    sequence (the request's own text). With `publish`, the sequence (prompt, then each token as it
    becomes final) goes into `shared` for later requests and the other rows of a batch.
    Proposals are deterministic: verified as q = one-hot, which keeps sampling exact."""

    def __init__(
        self,
        shared: SuffixIndex | None = None,
        publish: bool = True,
        max_match: int = MAX_MATCH,
        min_match: int = MIN_MATCH,
    ):
        self.shared = shared
        self.publish = publish and shared is not None
        self.max_match, self.min_match = max_match, min_match
        self.committed: list[int] = []
        self._own: SuffixIndex | None = None  # the sequence itself, all of it: set by reset
        self._own_handle = self._published = None
        self._last: list[int] = []

    def reset(self, tokens: list[int]) -> None:
        self.committed, self._last = list(tokens), []
        self._own = SuffixIndex(None, self.max_match, self.min_match)
        self._own_handle = self._own.add(tokens)
        if self.publish:
            self._published = self.shared.add(tokens)

    def propose(self, max_depth: int) -> Draft:
        own = self._own.lookup(self.committed, max_depth)
        shared = self.shared.lookup(self.committed, max_depth) if self.shared is not None else NO_MATCH
        self._last = (shared if shared.match_length > own.match_length else own).tokens
        return Draft(self._last, None, DraftSource.LOOKUP)

    def commit(self, path: list[int], next_token: int) -> None:
        final = [self._last[i] for i in path] + [next_token]
        self.committed += final
        self._own.extend(self._own_handle, final)
        if self.publish:
            self.shared.extend(self._published, final)

    def remember(self, sequence: list[int]) -> None:
        """The call ended with `sequence` final: publish what `shared` lacks of it (the last round,
        whose outcome a drafter is never told; all of it if the call never drafted)."""
        if not self.publish:
            return
        if self._published is None:
            self._published = self.shared.add(sequence)
        else:
            self.shared.extend(self._published, sequence[len(self._published.tokens) :])
