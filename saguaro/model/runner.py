"""ModelRunner: one HF causal LM, its KV cache, and forwards with explicit positions and masks.

Every engine talks to models only through this class. A forward takes new tokens plus the tree
they form (a chain by default) and returns their logits; the runner builds position ids
(context length + depth) and a 4D mask (each new token sees the whole committed context and its
tree ancestors) so that HF's own attention code runs a tree verification unchanged.
With a `PrefixCache`, `feed` on an empty cache loads the stored KV of the sequence's longest known
prefix instead of computing it, and `remember` stores what the cache holds for later calls.
"""

from __future__ import annotations

import torch

from saguaro.kernels import TREE_ATTENTION_NAMES, choose_tree_backend, pack_tree_mask
from saguaro.model.cache import SpeculativeCache
from saguaro.model.hf_call import HFCall, num_layers
from saguaro.model.prefix_cache import PrefixCache, weights_version
from saguaro.model.tree import TokenTree


class ModelRunner:
    """Runs `model` over new tokens on top of the tokens already in its cache."""

    # Optional capability, declared: greedy tokens decoded several per call, argmax fed back on
    # the device (`greedy_block` for plain decoding, `greedy_chain` for a drafter's chain).
    greedy_steps = False

    def __init__(self, model, capacity: int = 256, prefix_cache: PrefixCache | None = None):
        if getattr(model.config, "is_encoder_decoder", False) or not model.can_generate():
            raise TypeError(
                f"{type(model).__name__} is not a decoder-only causal LM; load the model with "
                "AutoModelForCausalLM (encoder-decoder and encoder-only models are not supported)"
            )
        self.model = model
        self.config = model.config
        self.device = model.device
        self.dtype = model.dtype
        self.hf = HFCall(model)
        self.cache = self._new_cache(num_layers(model.config), capacity)
        self.prefix_cache = prefix_cache  # this model's own: stored KV is only valid for it
        # Models loaded with attn_implementation="saguaro_tree" verify trees with our kernel,
        # which does not implement sliding windows: those keep the dense mask.
        # The backend is checked here, so that one this machine lacks ("cuda" on a CPU) fails at once
        # with what to do, not at the first tree.
        backend = TREE_ATTENTION_NAMES.get(model.config._attn_implementation)
        if backend is not None:
            choose_tree_backend(backend, model.device)
        self._tree_kernel = backend is not None and not self.hf.sliding_window

    def _new_cache(self, layers: int, capacity: int):
        return SpeculativeCache(layers, capacity)

    @property
    def length(self) -> int:
        """Number of tokens in the KV cache."""
        return self.cache.length

    def rollback(self, length: int) -> None:
        self.cache.rollback(length)

    def commit_path(self, start: int, keep) -> None:
        self.cache.commit_path(start, keep)

    def reset(self) -> None:
        self.cache.rollback(0)

    def feed(self, tokens: list[int]) -> tuple[torch.Tensor, int]:
        """Append `tokens`; return the last one's logits [V] and how many of them were loaded from
        the prefix cache instead of computed.

        Only a prefill (an empty cache) loads, as stored sequences start at position 0, and never
        the last token, whose logits are needed.
        """
        reused = 0
        if self.prefix_cache is not None and self.length == 0:
            self.prefix_cache.bind(weights_version(self.model))
            reused, kv = self.prefix_cache.lookup(tokens[:-1])
            if reused:
                self.cache.load(kv)
        return self.forward(tokens[reused:], last_only=True)[-1], reused

    def remember(self, sequence: list[int]) -> None:
        """Store the cache's KV in the prefix cache, given that its entries are the first ones of
        `sequence` (entries beyond `sequence`, e.g. drafts not committed, are not stored)."""
        length = min(len(sequence), self.length)
        if self.prefix_cache is not None and length:
            self.prefix_cache.bind(weights_version(self.model))
            self.prefix_cache.insert(sequence[:length], self.cache.prefix(length))

    @torch.no_grad()
    def forward(
        self, tokens, tree: TokenTree | None = None, cached_nodes: int = 0, last_only: bool = False
    ) -> torch.Tensor:
        """Append `tokens` ([T] ids) and return their logits [T, V].

        The tokens are the last T nodes of `tree` (a chain if None); its first `cached_nodes` nodes
        are the newest entries already in the cache (a tree drafted level by level feeds one level
        per call). Everything in the cache before those nodes is committed context, seen by all.
        With `last_only`, only the last token's logits are computed ([1, V]): a prefill needs no
        more, and the LM head over a large vocabulary is a sizable share of a forward.
        """
        tokens, tree = self._new_nodes(tokens, tree, cached_nodes)
        past = self.length - cached_nodes  # committed context
        depths = torch.tensor(tree.depths()[cached_nodes:], device=self.device)
        positions = past + depths
        if tree.is_chain and not self.hf.sliding_window and (len(tokens) == 1 or past == cached_nodes == 0):
            # One new token sees the whole cache, and a prefill is plain causal attention: no mask
            # at all lets HF pick causal SDPA, which also keeps grouped K/V heads unrepeated.
            mask = None
        elif self._tree_kernel and cached_nodes == 0:
            # The tree-attention backend takes the tree bit-packed; the prefix needs no mask.
            mask = pack_tree_mask(tree.ancestor_mask()).to(self.device)
        else:
            mask = self._attention_mask(past, positions, tree, cached_nodes)
        return self.hf.logits(self.cache, tokens[None], positions[None], mask, int(last_only))[0]

    def _new_nodes(self, tokens, tree: TokenTree | None, cached_nodes: int) -> tuple[torch.Tensor, TokenTree]:
        """`tokens` as ids [T] on the model's device, and `tree` (a chain if None), whose last nodes
        they are."""
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device).reshape(-1)
        tree = tree or TokenTree.chain(len(tokens))
        if len(tree) != cached_nodes + len(tokens):
            raise ValueError(
                f"{cached_nodes} cached + {len(tokens)} new tokens but a tree of {len(tree)} nodes"
            )
        return tokens, tree

    def _attention_mask(self, past: int, positions: torch.Tensor, tree: TokenTree, cached_nodes: int):
        """Additive float mask [1, 1, T, past + len(tree)], or a dict of them per HF layer type."""
        visible = torch.ones(len(positions), past + len(tree), dtype=torch.bool, device=self.device)
        visible[:, past:] = tree.ancestor_mask()[cached_nodes:].to(self.device)
        windowed, window, layer_types = None, self.hf.sliding_window, self.hf.layer_types
        if window and (not layer_types or "sliding_attention" in layer_types):
            tree_positions = past + torch.tensor(tree.depths(), device=self.device)
            key_positions = torch.cat([torch.arange(past, device=self.device), tree_positions])
            windowed = visible & (positions[:, None] - key_positions[None, :] < window)
            windowed = windowed[None, None]
        return self.hf.masks(visible[None, None], windowed)
