"""A KV cache of fixed shape, so compiled decoding steps (and CUDA graphs) can be captured once.

`SpeculativeCache` hands HF views of the entries so far, whose length changes every step: a
compiled graph would be specialised to each length. Here every layer's keys and values are one
[1, kv_heads, capacity, head_dim] buffer, reallocated only when the cache grows (`grow`: a new
shape, which compiled steps recompile for; model/compiled_runner.py doubles it seldom); a forward writes
its T new entries at slots start, ..., start + T - 1 (`start` is a 0-d tensor updated in place, so
the graph reads it instead of baking it in) and attends over the whole buffer, the mask hiding what
is not context.
The same operations as `SpeculativeCache` keep speculation cheap (`slot_cache.SlotCache`'s, shared
with it): rollback moves a length, an accepted chain commits by length, `commit_path` moves only a
tree path's entries.
Buffers start zeroed: a masked slot still enters the attention product, and stale memory could
hold NaN, which a mask does not cancel.
"""

from __future__ import annotations

import torch

from saguaro.model.slot_cache import BufferLayer, SlotCache

# Growths of any static cache in this process (each recompiles a runner's graphs): a round during
# which one happened (its time is mostly compiling) is left out of the draft-length controller's
# measurements (decode/engines.py).
_growths = 0


def note_growth() -> None:
    global _growths
    _growths += 1


def growth_count() -> int:
    """Static-cache growths so far in this process."""
    return _growths


class StaticSlotLayer(BufferLayer):
    """One attention layer's keys and values, in buffers whose shape and address never change."""

    is_compileable = True
    is_croppable = True
    is_sliding = False

    def __init__(self, capacity: int, start: torch.Tensor):
        super().__init__()
        self.capacity = capacity
        self.start = start  # shared by every layer: the slot of the first new entry

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # Shapes come from the model's first forward (a prefill, never compiled) or a loaded prefix.
        self.device = key_states.device
        heads = key_states.shape[1]
        self.keys = key_states.new_zeros(1, heads, self.capacity, key_states.shape[-1])
        self.values = value_states.new_zeros(1, heads, self.capacity, value_states.shape[-1])
        self._mark_static()
        self.is_initialized = True

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys, self.values

    def _mark_static(self) -> None:
        if self.keys.device.type == "cuda":
            # Fixed addresses let CUDA graphs read the buffers in place instead of copying them in;
            # guard=False: another cache of the same shape reuses the captured graphs.
            for buffer in (self.keys, self.values, self.start):
                torch._dynamo.mark_static_address(buffer, guard=False)

    def grow(self, capacity: int) -> None:
        """Buffers of `capacity` slots, holding the old ones' entries at the same slots."""
        if self.is_initialized:
            old_keys, old_values = self.keys, self.values
            self.keys = old_keys.new_zeros(*old_keys.shape[:2], capacity, old_keys.shape[-1])
            self.values = old_values.new_zeros(*old_values.shape[:2], capacity, old_values.shape[-1])
            self.keys[:, :, : self.capacity] = old_keys
            self.values[:, :, : self.capacity] = old_values
            self._mark_static()
        self.capacity = capacity

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        slots = self.start + torch.arange(key_states.shape[-2], device=self.keys.device)
        self.keys.index_copy_(2, slots, key_states.to(self.keys.dtype))
        self.values.index_copy_(2, slots, value_states.to(self.values.dtype))
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.capacity, 0

    def get_seq_length(self) -> int:
        raise NotImplementedError("a StaticKVCache's length is its owner's: pass position_ids")

    def get_max_length(self) -> int:
        return self.capacity


class StaticKVCache(SlotCache):
    """A transformers `Cache` of StaticSlotLayers; the number of committed entries is kept on the
    host (`length`), where the engines decide it, so reading it never waits for the device."""

    def __init__(self, num_layers: int, capacity: int, device):
        self.start = torch.zeros((), dtype=torch.long, device=device)
        super().__init__(layers=[StaticSlotLayer(capacity, self.start) for _ in range(num_layers)])
        self.capacity = capacity
        self.length = 0

    def grow(self, capacity: int) -> None:
        """Room for `capacity` entries (no fewer than now), every entry kept in its slot. The
        buffers are reallocated: graphs compiled for the old shape no longer apply."""
        if capacity < self.capacity:
            raise ValueError(f"a static KV cache only grows: {capacity} slots asked, {self.capacity} held")
        for layer in self.layers:
            layer.grow(capacity)
        self.capacity = capacity

    def begin_write(self, start: int, count: int) -> None:
        """The next forward writes `count` entries from slot `start` on; its owner then moves
        `length` past those it keeps."""
        if start + count > self.capacity:
            raise RuntimeError(
                f"static KV cache full: {start + count} entries needed, capacity {self.capacity}"
            )
        self.start.fill_(start)

    def rollback(self, length: int) -> None:
        """Forget every entry at index >= length (the slots are simply written over later)."""
        self.length = min(self.length, length)

    def end_write(self, length: int) -> None:
        self.length = length
