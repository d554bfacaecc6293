"""A KV cache that speculative decoding can roll back and prune in place.

HF's DynamicCache grows with torch.cat, which copies the whole context on every step. Speculation
appends a block of guesses each round and then keeps only the accepted ones, so we need:
  * append  - write the new entries into free slots (O(new tokens)),
  * rollback - forget everything after a length (O(1): just move the length),
  * commit_path - keep a non-contiguous subset of the block just appended (the accepted branch of a
    tree) by moving those few entries down to be contiguous (O(accepted tokens)).
`prefix` and `load` hand the first entries to and from a `prefix_cache.PrefixCache`
(`commit_path`, `prefix` and `load` are `slot_cache.SlotCache`'s, shared with the static cache).
The buffers start small and double when full, so appends are amortised O(new tokens) as well and
memory follows the tokens actually held, not the most a call might hold (max_new_tokens=10**9).
"""

from __future__ import annotations

import torch

from saguaro.model.slot_cache import BufferLayer, SlotCache

# Slots allocated beyond the first update (a prefill) before the buffers first grow: a caller's
# capacity is the most a call may hold (prompt + max_new_tokens), often far more than it will.
INITIAL_HEADROOM = 256


class SlotLayer(BufferLayer):
    """One attention layer's keys and values in [batch, kv_heads, capacity, head_dim] buffers.

    `expected` (the most tokens the caller expects) bounds the first allocation and the doubling
    steps up to it, so a sequence that ends early never pays for it; past it the buffers keep doubling.
    """

    is_compileable = False
    is_croppable = True

    def __init__(self, capacity: int):
        super().__init__()
        self.expected = max(int(capacity), 1)
        self.capacity = 0  # slots allocated
        self.length = 0
        self._key_buf: torch.Tensor | None = None
        self._value_buf: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, tokens, _ = key_states.shape
        self.device = key_states.device
        self.capacity = max(tokens, min(self.expected, tokens + INITIAL_HEADROOM))
        self._key_buf = key_states.new_empty(batch, heads, self.capacity, key_states.shape[-1])
        self._value_buf = value_states.new_empty(batch, heads, self.capacity, value_states.shape[-1])
        self.is_initialized = True
        self._refresh_views()

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._key_buf, self._value_buf

    def _refresh_views(self) -> None:
        # HF code reads `layer.keys` / `layer.values` as "everything cached so far".
        self.keys = self._key_buf[:, :, : self.length]
        self.values = self._value_buf[:, :, : self.length]

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        # Doubling, but not past the expected size while within it: a call that ends where it
        # expected holds no more than it needs.
        doubled = 2 * self.capacity if needed > self.expected else min(2 * self.capacity, self.expected)
        new_capacity = max(needed, doubled)
        for name in ("_key_buf", "_value_buf"):
            old = getattr(self, name)
            new = old.new_empty(*old.shape[:2], new_capacity, old.shape[-1])
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)
        self.capacity = new_capacity

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, n = self.length, key_states.shape[-2]
        self._reserve(start + n)
        self._key_buf[:, :, start : start + n] = key_states
        self._value_buf[:, :, start : start + n] = value_states
        self.length = start + n
        self._refresh_views()
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        # HF semantics: a negative number removes that many tokens, a non-negative one is the new length.
        self.rollback(self.length + tokens_to_remove if tokens_to_remove < 0 else tokens_to_remove)

    def rollback(self, length: int) -> None:
        self.length = min(self.length, length)
        if self.is_initialized:
            self._refresh_views()

    def reset(self) -> None:
        self.rollback(0)


class SpeculativeCache(SlotCache):
    """A transformers `Cache` of SlotLayers, each holding the entries written so far."""

    def __init__(self, num_layers: int, capacity: int = 256):
        super().__init__(layers=[SlotLayer(capacity) for _ in range(num_layers)])

    @property
    def length(self) -> int:
        return self.layers[0].length

    def rollback(self, length: int) -> None:
        """Forget every entry at index >= length."""
        for layer in self.layers:
            layer.rollback(length)

    def begin_write(self, start: int, count: int) -> None:
        """A write appends: from slot `start` on, entries are written over."""
        self.rollback(start)

    def end_write(self, length: int) -> None:
        """Nothing to do: each layer counts the entries it is given."""
