"""Calling an HF causal LM as saguaro's runners do: new token ids at explicit positions, under an
explicit additive mask, into a cache saguaro owns, keeping only the logits asked for.

The runners (`runner.py`: one row; `compiled_runner.py`: fixed-shape compiled steps;
`batched_runner.py`: ragged rows) differ in how they lay out tokens and build visibility, not in
how they call the model: that is here, once, with what it needs to know about the model.
"""

from __future__ import annotations

import inspect

import torch

from saguaro.kernels.packed_gqa import register_packed_gqa


def num_layers(config) -> int:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ValueError(f"cannot find the number of layers in config of type {type(config).__name__}")


def cache_keyword(model) -> str:
    # transformers 5.x renamed `past_key_values` to `cache` (the old name is deprecated, not gone).
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def additive_masks(visible: torch.Tensor, dtype, windowed: torch.Tensor | None = None, layer_types=()):
    """Additive float mask(s) (0 where `visible`, the most negative float elsewhere) for HF's
    attention: with a sliding window, `windowed` (visible and within the window) serves the
    sliding-attention layers, and a model that mixes layer types gets a dict of masks per type.

    Additive rather than boolean because eager attention adds the mask to the scores (SDPA takes both).
    """

    def additive(allowed: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)

    if windowed is None:
        return additive(visible)
    if not layer_types:
        return additive(windowed)
    return {t: additive(windowed if t == "sliding_attention" else visible) for t in layer_types}


def logits(model, keyword: str, cache, ids, positions, mask, logits_to_keep: int | torch.Tensor = 0):
    """The model's logits [B, T', V] for `ids` [B, T] at `positions` [B, T], their K/V appended to
    `cache` (passed as `keyword`, see `cache_keyword`); `logits_to_keep` as HF's (0: every token)."""
    out = model(
        input_ids=ids,
        position_ids=positions,
        attention_mask=mask,
        use_cache=True,
        logits_to_keep=logits_to_keep,
        **{keyword: cache},
    )
    return out.logits


class HFCall:
    """One model's call, with what it needs to know about the model read once."""

    def __init__(self, model):
        self.model = model
        self.dtype = model.dtype
        self.cache_keyword = cache_keyword(model)
        self.sliding_window = getattr(model.config, "sliding_window", None)
        self.layer_types = sorted(set(getattr(model.config, "layer_types", None) or []))
        # A draft whose embedding table is a little smaller than the target's (same tokenizer, padded
        # differently) is still fed every committed token, some of which it lacks. Any id it has
        # stands in for them: what the draft proposes after them is only a guess that verification
        # checks, and it never proposes ids it lacks, as its logits do not cover them.
        self.embedding_rows = model.get_input_embeddings().num_embeddings
        # A grouped-query model served by "sdpa" on CPU runs its forwards (a verification's few
        # tokens) on kernels/packed_gqa.py's backend, which is "sdpa" for anything else. The user's
        # model keeps its setting: it is switched for saguaro's own calls only.
        config = model.config
        grouped = getattr(config, "num_key_value_heads", None) not in (
            None,
            getattr(config, "num_attention_heads", None),
        )
        self.packed_gqa = (
            register_packed_gqa()
            if grouped and config._attn_implementation == "sdpa" and model.device.type == "cpu"
            else None
        )

    def embeddable(self, ids: torch.Tensor) -> torch.Tensor:
        """`ids` with every id beyond the embedding table replaced by 0 (see `embedding_rows`)."""
        return ids.masked_fill(ids >= self.embedding_rows, 0)

    def masks(self, visible: torch.Tensor, windowed: torch.Tensor | None = None):
        """`additive_masks` in the model's dtype, per its layer types."""
        return additive_masks(visible, self.dtype, windowed, self.layer_types)

    def logits(self, cache, ids, positions, mask, logits_to_keep: int | torch.Tensor = 0) -> torch.Tensor:
        """`logits` of the model (ids beyond its embedding table fed as 0)."""
        ids = self.embeddable(ids)
        if self.packed_gqa is None:
            return logits(self.model, self.cache_keyword, cache, ids, positions, mask, logits_to_keep)
        config = self.model.config
        config._attn_implementation = self.packed_gqa
        try:
            return logits(self.model, self.cache_keyword, cache, ids, positions, mask, logits_to_keep)
        finally:
            config._attn_implementation = "sdpa"
