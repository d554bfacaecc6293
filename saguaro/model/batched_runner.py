"""BatchedRunner: one HF causal LM serving several rows at once, each at its own length.

All rows share one KV cache and one write pointer: every forward appends the same number of slots
T to every row. A row that needs fewer (a shorter draft, a row with nothing pending) leaves the
rest as padding, and a round that keeps only part of what it fed (rejected drafts) turns the rest
into holes. Holes never move: a per-row mask hides them from every later query, and explicit
position ids give each row its true positions, so a hole shifts no rotary or learned position.
HF's attention code thus runs ragged rows unchanged, with a 4D additive mask [B, 1, T, slots].
The prompts are prefilled packed into one sequence (no padding to compute), then laid out
right-aligned, holes before the shorter ones. Rows join a running cache the same way (`admit`:
the cache or the new rows padded on the left to a common width), and a prompt may be prefilled
in chunks off the batch first (`extend`), each on top of its entries so far.

The cache is HF's `DynamicCache` without a config (plain layers, no sliding-window truncation:
the mask does the windowing, as slots are not positions), which also gives `batch_select_indices`
to drop finished rows. Holes cost attention work but no copies; for one batch they are bounded by
T x rounds, small next to a prompt. A batch that never empties (rows coming and going) lays its
rows out afresh when holes are most of the cache (`compact`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from saguaro.model.hf_call import HFCall
from saguaro.model.prefix_cache import KV, PrefixCache, weights_version


class BatchedRunner:
    """Runs `model` over rows of new tokens, each row on top of its own visible cache slots."""

    def __init__(self, model, prefix_cache: PrefixCache | None = None):
        self.model = model
        self.prefix_cache = prefix_cache  # this model's own, shared with its single-row runners
        self.device = model.device
        self.call = HFCall(model)
        self.cache = DynamicCache()
        self.visible = torch.zeros(0, 0, dtype=torch.bool)  # [rows, slots]: a committed entry of the row
        self.slot_positions = torch.zeros(0, 0, dtype=torch.long)  # [rows, slots]: its true position
        self.next_position = torch.zeros(0, dtype=torch.long)  # [rows]: where each row continues

    @property
    def slots(self) -> int:
        return self.visible.shape[1]

    @property
    def rows(self) -> int:
        return self.visible.shape[0]

    def start(self, rows: int) -> None:
        """Empty the cache for `rows` new rows."""
        self.cache = DynamicCache()
        self.visible = torch.zeros(rows, 0, dtype=torch.bool, device=self.device)
        self.slot_positions = torch.zeros(rows, 0, dtype=torch.long, device=self.device)
        self.next_position = torch.zeros(rows, dtype=torch.long, device=self.device)

    def prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
        """Start afresh with `prompts`; see `admit`."""
        self.start(0)
        return self.admit(prompts)

    def admit(
        self, prompts: list[list[int]], rows: list[int] | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """Add `prompts` as new rows after the running ones (or, `rows`, into running rows that
        hold nothing yet); return each one's last logits [B, V] and how many of its tokens were
        loaded from the prefix cache instead of computed (never the last one).

        Each row loads the longest stored prefix of its own prompt and the rest is fed packed
        (`extend`); the prompts' KV goes into the prefix cache at once, so that a request arriving
        meanwhile behind the same system prompt reuses it.
        """
        reused, stored = self.lookup(prompts)
        logits, entries = self.extend(stored, [prompt[n:] for prompt, n in zip(prompts, reused)])
        self.store(prompts, entries)
        self.join(entries, rows)
        return logits, reused

    def lookup(self, prompts: list[list[int]]) -> tuple[list[int], list[KV]]:
        """Each prompt's longest stored prefix (never its last token, whose logits are needed):
        its length and its entries per layer ([1, heads, n, dim]; [] for none)."""
        reused, stored = [0] * len(prompts), [[] for _ in prompts]
        if self.prefix_cache is not None:
            self.prefix_cache.bind(weights_version(self.model))
            for row, prompt in enumerate(prompts):
                reused[row], stored[row] = self.prefix_cache.lookup(prompt[:-1])
        return reused, stored

    def store(self, sequences: list[list[int]], entries: list[KV]) -> None:
        """Put each sequence's entries (its first ones: see `extend`) into the prefix cache."""
        if self.prefix_cache is not None:
            self.prefix_cache.bind(weights_version(self.model))
            for sequence, kv in zip(sequences, entries):
                self.prefix_cache.insert(sequence, kv)

    def extend(self, stored: list[KV], rests: list[list[int]]) -> tuple[torch.Tensor, list[KV]]:
        """Feed each row's `rests` on top of its `stored` entries, off the batch's cache: returns
        each row's last logits [B, V] and its entries so far (stored, then fed).

        The rests are fed packed, the rows one after another in a single sequence
        (`_prefill_packed`), not left-padded to the longest: the padding of a batch of prompts of
        different lengths would cost as much as real tokens. A prompt fed in chunks (so that
        decoding rows wait for one chunk at a time) comes back here with its entries so far.
        """
        logits, entries = [], []
        for group in _packing_groups([len(rest) for rest in rests]):
            group_logits, group_entries = self._prefill_packed(
                [stored[row] for row in group], [rests[row] for row in group]
            )
            logits.append(group_logits)
            entries += group_entries
        return torch.cat(logits), entries

    @torch.no_grad()
    def _prefill_packed(
        self, stored: list[list[tuple[torch.Tensor, torch.Tensor]]], rests: list[list[int]]
    ) -> tuple[torch.Tensor, list[KV]]:
        """One forward over the rows' `rests` packed into one sequence, each on top of its stored
        entries (packed the same way, before them); a token sees only its own row's entries and
        tokens. Returns each row's last logits [rows, V] and its entries per layer, keys and
        values [1, heads, n, dim] (stored ones first).

        Rows with nothing stored that start alike (the chat template's system prompt of every
        request, an agent's instructions) feed their common prefix once, first in the sequence and
        seen by every row, and each row only the rest: its KV is the same for each of them, as the
        prefix cache would give it, at no extra forward.
        """
        shared = [] if any(stored) else _shared_prefix(rests)
        rests = [rest[len(shared) :] for rest in rests]
        loaded = torch.tensor([kv[0][0].shape[2] if kv else 0 for kv in stored], device=self.device)
        fed = torch.tensor([len(rest) for rest in rests], device=self.device)
        rows = torch.arange(len(rests), device=self.device)
        past, common, new = int(loaded.sum()), len(shared), len(shared) + int(fed.sum())
        cache = DynamicCache()
        if past:
            for layer, pieces in enumerate(zip(*(kv for kv in stored if kv))):
                keys, values = zip(*pieces)
                cache.update(torch.cat(keys, 2), torch.cat(values, 2), layer)
        # Slots in order: the stored entries row by row, the shared prefix (owner -1), the rows' rests.
        everyone = torch.full((common,), -1, device=self.device)
        owner = torch.cat([rows.repeat_interleave(loaded), everyone, rows.repeat_interleave(fed)])
        first_slot = loaded.cumsum(0) - loaded  # of each row's stored entries, then of its tokens
        first_new = past + common + fed.cumsum(0) - fed
        slot = torch.arange(past + new, device=self.device)
        # A slot's position in its row: stored entries count from 0, the shared prefix too (only
        # rows with nothing stored share one), fed tokens go on from there. (owner -1 indexes a
        # row too; torch.where discards what that gives.)
        key_positions = torch.where(
            slot < past,
            slot - first_slot[owner],
            torch.where(owner < 0, slot - past, loaded[owner] + common + slot - first_new[owner]),
        )
        positions = key_positions[past:]
        # Within a row, slots are in order (stored or shared, then fed): causal in the packed order.
        same_row = (owner[past:, None] == owner[None]) | (owner[None] < 0)
        visible = same_row & (slot[None] <= slot[past:, None])
        tokens = torch.tensor(shared + [token for rest in rests for token in rest], device=self.device)
        logits = self.call.logits(
            cache,
            tokens[None],
            positions[None],
            self._mask(visible[None], positions[None], key_positions[None]),
            first_new - past + fed - 1,  # each row's last token
        )
        entries = []
        for row in range(len(rests)):
            mine = torch.cat(
                [
                    torch.arange(int(first_slot[row]), int(first_slot[row] + loaded[row])),
                    torch.arange(past, past + common),
                    torch.arange(int(first_new[row]), int(first_new[row] + fed[row])),
                ]
            ).to(self.device)
            entries.append([(layer.keys[:, :, mine], layer.values[:, :, mine]) for layer in cache.layers])
        return logits[0], entries

    def join(self, entries: list[KV], rows: list[int] | None = None) -> None:
        """Lay rows' entries (per layer [1, heads, n, dim], positions 0..n-1) into the cache,
        right-aligned: as new rows after the running ones, or (`rows`) into running rows that hold
        nothing yet. Where a new row is wider than the cache, the cache is padded on the left with
        holes (invisible slots); a narrower one gets holes before it."""
        lengths = [kv[0][0].shape[2] for kv in entries]
        width = max(self.slots, *lengths)
        pad = width - self.slots
        total = self.rows if rows is not None else self.rows + len(entries)
        rows = rows if rows is not None else list(range(self.rows, total))
        cache = DynamicCache()
        for layer in range(len(entries[0])):
            merged = []
            for side, running in enumerate(self._layer_tensors(layer)):
                reference = entries[0][layer][side]
                tensor = reference.new_zeros(total, reference.shape[1], width, reference.shape[3])
                if running is not None:
                    tensor[: self.rows, :, pad:] = running
                for row, kv in zip(rows, entries):
                    tensor[row, :, width - kv[layer][side].shape[2] :] = kv[layer][side][0]
                merged.append(tensor)
            cache.update(*merged, layer)
        self.cache = cache
        visible = torch.zeros(total, width, dtype=torch.bool, device=self.device)
        positions = torch.zeros(total, width, dtype=torch.long, device=self.device)
        next_position = torch.zeros(total, dtype=torch.long, device=self.device)
        visible[: self.rows, pad:], positions[: self.rows, pad:] = self.visible, self.slot_positions
        next_position[: self.rows] = self.next_position
        for row, length in zip(rows, lengths):
            visible[row], positions[row] = False, 0
            visible[row, width - length :] = True
            positions[row, width - length :] = torch.arange(length, device=self.device)
            next_position[row] = length
        self.visible, self.slot_positions, self.next_position = visible, positions, next_position

    def add_empty_rows(self, count: int) -> None:
        """`count` rows holding nothing yet (a drafter fills them when it first drafts for them)."""
        cache = DynamicCache()
        for layer in range(len(self.cache.layers) if self.slots else 0):
            keys, values = self._layer_tensors(layer)
            empty = [t.new_zeros(count, *t.shape[1:]) for t in (keys, values)]
            cache.update(torch.cat([keys, empty[0]]), torch.cat([values, empty[1]]), layer)
        self.cache = cache
        self.visible = torch.cat([self.visible, self.visible.new_zeros(count, self.slots)])
        self.slot_positions = torch.cat(
            [self.slot_positions, self.slot_positions.new_zeros(count, self.slots)]
        )
        self.next_position = torch.cat([self.next_position, self.next_position.new_zeros(count)])

    def compact(self) -> None:
        """Drop the holes: every row's committed entries laid out afresh, right-aligned. The slots
        of rows that left and of rejected drafts otherwise stay as long as the cache does, which
        for a batch that never empties (a serving engine) is forever."""
        if self.rows and self.slots:
            entries = [self.row_kv(row) for row in range(self.rows)]
            self.start(0)
            self.join(entries)

    def _layer_tensors(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.slots or layer >= len(self.cache.layers):
            return None, None
        return self.cache.layers[layer].keys, self.cache.layers[layer].values

    def remember(self, row: int, sequence: list[int]) -> None:
        """Store the row's committed KV in the prefix cache, given that its entries are the first
        ones of `sequence` (entries beyond it are not stored)."""
        length = min(len(sequence), int(self.visible[row].sum()))
        if self.prefix_cache is not None and length:
            self.prefix_cache.bind(weights_version(self.model))
            kv = [(k[:, :, :length], v[:, :, :length]) for k, v in self.row_kv(row)]
            self.prefix_cache.insert(sequence[:length], kv)

    @torch.no_grad()
    def forward(
        self, rows: list[list[int]], align_right: bool = False, last_only: bool = False
    ) -> torch.Tensor:
        """Append each row's tokens (a chain continuing the row) and return logits [B, T, V].

        T is the longest row; shorter rows are padded after their tokens, or before them with
        `align_right` (left padding, so that every row's last token is at column T - 1 and
        `last_only` computes just that column). Padding slots stay invisible; fed tokens become
        visible to later forwards at once (a draft chain builds on itself) and `keep` decides
        afterwards which of them stay.
        """
        if len(rows) != self.rows:
            raise ValueError(f"{len(rows)} rows of tokens for a cache of {self.rows} rows")
        width = max(len(row) for row in rows)
        lengths = torch.tensor([len(row) for row in rows], device=self.device)
        offsets = width - lengths if align_right else torch.zeros_like(lengths)
        tokens = torch.zeros(self.rows, width, dtype=torch.long, device=self.device)
        for b, row in enumerate(rows):
            tokens[b, int(offsets[b]) : int(offsets[b]) + len(row)] = torch.as_tensor(row, dtype=torch.long)
        columns = torch.arange(width, device=self.device)
        real = (columns[None] >= offsets[:, None]) & (columns[None] < (offsets + lengths)[:, None])
        positions = self.next_position[:, None] + (columns[None] - offsets[:, None]).clamp_min(0)
        past_visible, past_positions = self.visible, self.slot_positions
        # Each new token sees the row's visible past and the real tokens before it in its chain;
        # a padding slot sees only itself (its output is never read, but it must not be all -inf).
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        new_visible = causal[None] & real[:, None, :]
        new_visible |= torch.eye(width, dtype=torch.bool, device=self.device)[None]
        visible = torch.cat([past_visible[:, None, :].expand(-1, width, -1), new_visible], dim=2)
        key_positions = torch.cat([past_positions, positions], dim=1)
        mask = self._mask(visible, positions, key_positions)
        logits = self.call.logits(self.cache, tokens, positions, mask, 1 if last_only else 0)
        self.visible = torch.cat([past_visible, real], dim=1)
        self.slot_positions = key_positions
        self.next_position = self.next_position + lengths
        return logits

    def mark(self) -> tuple[int, torch.Tensor]:
        """The state to return to with `keep`: the slot count and every row's next position."""
        return self.slots, self.next_position.clone()

    def keep(self, mark: tuple[int, torch.Tensor], counts: list[int]) -> None:
        """Of the tokens each row fed since `mark`, keep the first counts[row]; the rest become holes."""
        start, positions = mark
        counts = torch.as_tensor(counts, device=self.device)
        fed = self.slot_positions[:, start:] - positions[:, None]  # 0, 1, ... along each row's tokens
        self.visible[:, start:] &= fed < counts[:, None]
        self.next_position = positions + counts

    def keep_rows(self, indices: list[int]) -> None:
        """Only the rows `indices` go on (finished rows drop out of every later forward)."""
        index = torch.as_tensor(indices, dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(index)
        self.visible = self.visible[index]
        self.slot_positions = self.slot_positions[index]
        self.next_position = self.next_position[index]

    def row_kv(self, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The row's committed entries per layer, in order, as keys and values [1, heads, n, dim]."""
        slots = self.visible[row].nonzero().flatten()
        return [
            (layer.keys[row : row + 1, :, slots], layer.values[row : row + 1, :, slots])
            for layer in self.cache.layers
        ]

    def _mask(self, visible: torch.Tensor, positions: torch.Tensor, key_positions: torch.Tensor):
        """Additive float mask [B, 1, T, slots], or a dict of them per HF layer type."""
        window, windowed = self.call.sliding_window, None
        if window:
            windowed = (visible & (positions[:, :, None] - key_positions[:, None, :] < window))[:, None]
        return self.call.masks(visible[:, None], windowed)


# Tokens per packed prefill forward, at most (a single longer prompt goes alone): a packed
# sequence's mask and attention grow with the square of its length, and from about this many tokens
# a forward is long past streaming the weights once, so more of them in one forward saves nothing.
PACKED_PREFILL_TOKENS = 1024


def _packing_groups(lengths: list[int]) -> list[list[int]]:
    """The rows, in order, in groups of at most PACKED_PREFILL_TOKENS tokens (or one longer row)."""
    groups, total = [], 0
    for row, length in enumerate(lengths):
        if not groups or total + length > PACKED_PREFILL_TOKENS:
            groups.append([])
            total = 0
        groups[-1].append(row)
        total += length
    return groups


def _shared_prefix(rests: list[list[int]]) -> list[int]:
    """The rows' longest common prefix, leaving each row at least its last token to feed (whose
    logits it needs); none for a single row."""
    if len(rests) < 2:
        return []
    longest = min(len(rest) for rest in rests) - 1
    length = 0
    while length < longest and all(rest[length] == rests[0][length] for rest in rests):
        length += 1
    return rests[0][:length]
