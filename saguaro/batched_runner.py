"""BatchedRunner: one HF causal LM serving several rows at once, each at its own length.

All rows share one KV cache and one write pointer: every forward appends the same number of slots
T to every row. A row that needs fewer (a shorter draft, a row with nothing pending) leaves the
rest as padding, and a round that keeps only part of what it fed (rejected drafts) turns the rest
into holes. Holes never move: a per-row mask hides them from every later query, and explicit
position ids give each row its true positions, so a hole shifts no rotary or learned position.
Left padding of the prompts is holes as well. HF's attention code thus runs ragged rows unchanged,
with a 4D additive mask [B, 1, T, slots].

The cache is HF's `DynamicCache` without a config (plain layers, no sliding-window truncation:
the mask does the windowing, as slots are not positions), which also gives `batch_select_indices`
to drop finished rows. Holes cost attention work but no copies; they are bounded by
T x rounds, small next to a prompt.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from .prefix_cache import PrefixCache, weights_version
from .runner import _cache_keyword, additive_masks


class BatchedRunner:
    """Runs `model` over rows of new tokens, each row on top of its own visible cache slots."""

    def __init__(self, model, prefix_cache: PrefixCache | None = None):
        self.model = model
        self.prefix_cache = prefix_cache  # this model's own, shared with its single-row runners
        self.device = model.device
        self.dtype = model.dtype
        self._cache_keyword = _cache_keyword(model)
        self._embedding_rows = model.get_input_embeddings().num_embeddings
        self._sliding_window = getattr(model.config, "sliding_window", None)
        self._layer_types = sorted(set(getattr(model.config, "layer_types", None) or []))
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
        """Start afresh with `prompts`; return each one's last logits [B, V] and how many of its
        tokens were loaded from the prefix cache instead of computed (never the last one).

        Each row loads the longest stored prefix of its own prompt, right-aligned in a block as
        wide as the longest load (holes before a shorter one), then the rest is fed left-padded.
        """
        self.start(len(prompts))
        reused, stored = [0] * len(prompts), [[] for _ in prompts]
        if self.prefix_cache is not None:
            self.prefix_cache.bind(weights_version(self.model))
            for row, prompt in enumerate(prompts):
                reused[row], stored[row] = self.prefix_cache.lookup(prompt[:-1])
        if any(reused):
            self._load(stored, reused)
        rest = [prompt[n:] for prompt, n in zip(prompts, reused)]
        return self.forward(rest, align_right=True, last_only=True)[:, -1], reused

    def _load(self, stored: list[list[tuple[torch.Tensor, torch.Tensor]]], lengths: list[int]) -> None:
        width = max(lengths)
        reference = next(kv for kv in stored if kv)
        for layer, (ref_keys, ref_values) in enumerate(reference):
            keys = ref_keys.new_zeros(self.rows, ref_keys.shape[1], width, ref_keys.shape[3])
            values = ref_values.new_zeros(self.rows, ref_values.shape[1], width, ref_values.shape[3])
            for row, kv in enumerate(stored):
                if kv:
                    row_keys, row_values = kv[layer]
                    keys[row, :, width - row_keys.shape[2] :] = row_keys[0]
                    values[row, :, width - row_values.shape[2] :] = row_values[0]
            self.cache.update(keys, values, layer)
        lengths = torch.tensor(lengths, device=self.device)
        offset = torch.arange(width, device=self.device)[None] - (width - lengths)[:, None]
        self.visible = offset >= 0
        self.slot_positions = offset.clamp_min(0)
        self.next_position = lengths

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
        # Ids beyond a draft's smaller embedding table (see ModelRunner) are fed as id 0.
        tokens = tokens.masked_fill(tokens >= self._embedding_rows, 0)
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
        out = self.model(
            input_ids=tokens,
            position_ids=positions,
            attention_mask=self._mask(visible, positions, key_positions),
            use_cache=True,
            logits_to_keep=1 if last_only else 0,
            **{self._cache_keyword: self.cache},
        )
        self.visible = torch.cat([past_visible, real], dim=1)
        self.slot_positions = key_positions
        self.next_position = self.next_position + lengths
        return out.logits

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
        windowed = None
        if self._sliding_window:
            windowed = visible & (positions[:, :, None] - key_positions[:, None, :] < self._sliding_window)
            windowed = windowed[:, None]
        return additive_masks(visible[:, None], self.dtype, windowed, self._layer_types)
