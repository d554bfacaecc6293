"""What saguaro's two KV caches share: each layer's keys and values in buffers of slots, a number of
committed entries, and the operations speculation adds to transformers' `Cache`: `commit_path`
(keep the accepted path of a block just written, moved down to be contiguous), and `prefix` and
`load` (entries to and from a `prefix_cache.PrefixCache`).

`cache.SpeculativeCache` (buffers that grow; HF sees views of the entries so far) and
`static_cache.StaticKVCache` (buffers of fixed shape for compiled steps) differ only in how a write
starts and ends and where the number of entries is kept; these three modules are the only ones that
touch transformers' cache internals (`Cache`, `CacheLayerMixin`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


def is_chain_prefix(keep: list[int]) -> bool:
    """Whether the path `keep` (entry indices relative to a commit's start) is 0, 1, ..., i.e.
    already in place, so committing it only moves a length. Raises unless it is increasing, as a
    root-to-node path is: moving entries down then never overwrites one still to be read."""
    if any(b <= a for a, b in zip(keep, keep[1:])):
        raise ValueError(f"commit_path needs increasing indices, got {keep}")
    return keep == list(range(len(keep)))


class BufferLayer(CacheLayerMixin):
    """One attention layer whose keys and values live in buffers [batch, kv_heads, slots, head_dim]
    (`buffers`), allocated at the first write (`is_initialized`)."""

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def move(self, start: int, sources: torch.Tensor) -> None:
        """The entries at slots `sources` go to slots start, start + 1, ... (index_select copies
        first, so overlapping source and destination ranges are safe)."""
        if self.is_initialized:
            destination = slice(start, start + len(sources))
            for buffer in self.buffers():
                buffer[:, :, destination] = buffer.index_select(2, sources)


class SlotCache(Cache):
    """A transformers `Cache` of `BufferLayer`s that all hold the same entries.

    A subclass keeps `length` (the entries held) and `rollback`, and says how a write of entries
    from a slot on starts (`begin_write`) and ends (`end_write`)."""

    length: int

    def __len__(self) -> int:
        return len(self.layers)

    def rollback(self, length: int) -> None:
        """Forget every entry at index >= length."""
        raise NotImplementedError

    def begin_write(self, start: int, count: int) -> None:
        """The next writes put `count` entries from slot `start` on."""
        raise NotImplementedError

    def end_write(self, length: int) -> None:
        """The writes begun are done: the cache holds `length` entries."""
        raise NotImplementedError

    def commit_path(self, start: int, keep) -> None:
        """Of the entries written at start, start+1, ..., keep those at start+keep[i], in order.

        `keep` must be increasing (a root-to-node path in a tree is), so moving entries down never
        overwrites one that is still to be read.
        """
        keep = list(keep)
        if not is_chain_prefix(keep):  # an accepted chain prefix is already in place: no copy
            device = next((layer.device for layer in self.layers if layer.is_initialized), "cpu")
            sources = torch.tensor(keep, dtype=torch.long, device=device) + start  # one host-to-device copy
            for layer in self.layers:
                layer.move(start, sources)
        self.rollback(start + len(keep))

    def prefix(self, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of the first `length` entries, per layer (views into the buffers)."""
        return [(layer.keys[:, :, :length], layer.values[:, :, :length]) for layer in self.layers]

    def load(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Hold exactly `kv` (per layer, keys and values [batch, kv_heads, tokens, head_dim]), e.g. a
        stored prefix of the sequence about to be fed."""
        tokens = kv[0][0].shape[2]
        self.begin_write(0, tokens)
        for layer, (keys, values) in zip(self.layers, kv, strict=True):
            layer.update(keys, values)
        self.end_write(tokens)
