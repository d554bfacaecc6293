"""PrefixCache: the KV of token sequences seen before, so a prompt that repeats one is not recomputed.

Multi-turn chat and agent loops resend the same prefix on every call (the system prompt, the
conversation so far), and a prefill over it costs as much as the first time. A key's K and V at
position i depend only on the model and on tokens 0..i, so the KV of any stored sequence serves
every prompt that starts with a prefix of it. The sequences live in a radix tree (a compressed trie
over token ids, as in SGLang's RadixAttention; vLLM's automatic prefix caching does the same over
fixed-size blocks): each node owns the K/V slices of its span of tokens, per layer, so requests
that share a prefix (turns of one chat, several agents behind one system prompt) share its KV.
Under a byte budget, the least recently used leaves are evicted first: a shared prefix outlives
the conversations hanging off it.

Positions start at 0 in every stored sequence, so one cache serves one model only: each owner of
a runner (the target's, the drafter's, the Saguaro worker's) keeps its own, and
`weights_version` empties it when that model's weights change, by any route `weights.observe`
sees (in place, a new tensor or module, a write through `.data`). Not thread-safe: the
generator that owns it serialises its calls.
"""

from __future__ import annotations

import heapq
import numbers
from itertools import count

import torch

from saguaro.faults import logger
from saguaro.model import weights

DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB per model: ~37k tokens of Qwen2.5-1.5B's bf16 KV

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [batch, kv_heads, tokens, head_dim]


def weights_version(model) -> tuple:
    """Changes whenever the weights may have: the weight epoch of the model (or of the user's model
    it was derived from), which a generate call moves after any change it observes, and each
    parameter's storage and version counter, which in-place torch ops bump between observations."""
    return weights.epoch(model), tuple((p.data_ptr(), p._version) for p in model.parameters())


def check_max_bytes(max_bytes) -> None:
    if not isinstance(max_bytes, numbers.Integral) or isinstance(max_bytes, bool) or max_bytes <= 0:
        raise ValueError(
            "prefix_cache_bytes (the prefix cache's memory budget per model, in bytes) must be a positive "
            f"int such as {DEFAULT_MAX_BYTES} (1 GiB), got {max_bytes!r}; to reuse nothing pass "
            "prefix_cache=False"
        )


def _span(kv: KV, start: int, end: int) -> KV:
    """Positions start..end-1 of every layer, as compact tensors of their own: a view would keep
    the whole buffer it came from alive, which the byte budget would not see."""
    return [
        tuple(t[:, :, start:end].clone(memory_format=torch.contiguous_format) for t in pair) for pair in kv
    ]


def _nbytes(kv: KV) -> int:
    return sum(t.numel() * t.element_size() for pair in kv for t in pair)


class _Node:
    __slots__ = ("tokens", "kv", "children", "parent", "last_used", "nbytes")

    def __init__(self, tokens: tuple[int, ...], kv: KV, parent: _Node | None, last_used: int):
        self.tokens = tokens  # the span this node adds below its parent
        self.kv = kv
        self.children: dict[int, _Node] = {}  # first token of the child's span -> child
        self.parent = parent
        self.last_used = last_used
        self.nbytes = _nbytes(kv)


class PrefixCache:
    """Token-id radix tree of stored sequences; each node owns the KV of its span."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        check_max_bytes(max_bytes)
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._root = _Node((), [], None, 0)
        self._clock = count(1)  # a use counter, not wall time: ties and order are deterministic
        self._weights = None

    def bind(self, version: tuple) -> None:
        """Empty the cache if the model's `weights_version` differs from the one its KV came from."""
        if version != self._weights:
            if self.nbytes:
                logger.info("saguaro: model weights changed; the prefix cache starts empty")
            self._root, self.nbytes, self._weights = _Node((), [], None, 0), 0, version

    def __len__(self) -> int:
        """Tokens stored (a shared prefix counts once)."""
        return sum(len(node.tokens) for node in self._nodes())

    def _nodes(self):
        stack = [self._root]
        while stack:
            node = stack.pop()
            stack += node.children.values()
            if node is not self._root:
                yield node

    def _walk(self, tokens: list[int]) -> list[tuple[_Node, int]]:
        """The nodes along the longest stored prefix of `tokens`, each with how many of its tokens
        match (all but possibly the last node's)."""
        path, node, i = [], self._root, 0
        while i < len(tokens) and tokens[i] in node.children:
            node = node.children[tokens[i]]
            span = node.tokens[: len(tokens) - i]
            matched = next((j for j, token in enumerate(span) if token != tokens[i + j]), len(span))
            path.append((node, matched))
            i += matched
            if matched < len(node.tokens):
                break
        return path

    def lookup(self, tokens: list[int]) -> tuple[int, KV]:
        """(n, kv): the longest stored prefix of `tokens` is tokens[:n], and kv holds its keys and
        values per layer ([], n = 0, when no stored sequence starts like `tokens`)."""
        path = self._walk(list(tokens))
        if not path:
            return 0, []
        now = next(self._clock)
        for node, _ in path:
            node.last_used = now
        pieces = [[(k[:, :, :matched], v[:, :, :matched]) for k, v in node.kv] for node, matched in path]
        kv = [
            (torch.cat([p[0] for p in layer], dim=2), torch.cat([p[1] for p in layer], dim=2))
            for layer in zip(*pieces)
        ]
        return sum(matched for _, matched in path), kv

    def insert(self, tokens: list[int], kv: KV) -> None:
        """Store the KV of `tokens` (kv: per layer, keys and values for at least len(tokens)
        positions, position 0 first). Only the part not stored yet is copied; a sequence larger
        than the whole budget keeps its longest prefix that fits. Then least recently used leaves
        are evicted until the cache is within its budget."""
        tokens = list(tokens)
        if not tokens or not kv:
            return
        if kv[0][0].shape[2] < len(tokens):
            raise ValueError(f"insert got KV for {kv[0][0].shape[2]} positions but {len(tokens)} tokens")
        per_token = _nbytes(kv) // kv[0][0].shape[2]
        tokens = tokens[: self.max_bytes // per_token]
        path = self._walk(tokens)
        stored = sum(matched for _, matched in path)
        parent, matched = path[-1] if path else (self._root, 0)
        if stored < len(tokens) and matched < len(parent.tokens):
            # The tokens leave the stored sequence inside a node: its tail, which this sequence
            # does not use, becomes a child of its head and keeps its own last use.
            parent = self._split(parent, matched)
            path[-1] = (parent, matched)
        now = next(self._clock)
        for node, _ in path:
            node.last_used = now
        if stored < len(tokens):
            leaf = _Node(tuple(tokens[stored:]), _span(kv, stored, len(tokens)), parent, now)
            parent.children[tokens[stored]] = leaf
            self.nbytes += leaf.nbytes
        self._evict()

    def _split(self, node: _Node, at: int) -> _Node:
        """Cut `node` after its first `at` tokens; the head becomes its parent. Returns the head."""
        head = _Node(node.tokens[:at], _span(node.kv, 0, at), node.parent, node.last_used)
        node.parent.children[node.tokens[0]] = head
        node.tokens, node.kv, node.parent = node.tokens[at:], _span(node.kv, at, len(node.tokens)), head
        head.children[node.tokens[0]] = node
        self.nbytes -= node.nbytes
        node.nbytes = _nbytes(node.kv)
        self.nbytes += head.nbytes + node.nbytes
        return head

    def _evict(self) -> None:
        """Drop least recently used leaves until within budget. A node is used whenever a sequence
        through it is, so a parent is never older than its children and goes after them."""
        if self.nbytes <= self.max_bytes:
            return
        leaves = [(node.last_used, id(node), node) for node in self._nodes() if not node.children]
        heapq.heapify(leaves)
        while self.nbytes > self.max_bytes and leaves:
            _, _, node = heapq.heappop(leaves)
            parent = node.parent
            del parent.children[node.tokens[0]]
            self.nbytes -= node.nbytes
            if parent is not self._root and not parent.children:
                heapq.heappush(leaves, (parent.last_used, id(parent), parent))
