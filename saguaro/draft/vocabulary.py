"""A reduced draft vocabulary (FR-Spec, Zhao et al. 2025): the draft's LM head scores kept ids only.

`restrict_draft_vocabulary(model, keep_ids)` returns full-vocabulary logits with -inf outside
`keep_ids`, so q = 0 there and every sampler, top-k, argmax and verifier works unchanged. Greedy
stays exact because verification compares drafts with the target's own argmax; sampling stays
exact because a rejection draws from norm(max(0, p - q)), which gives the excluded ids the
target's mass there.

`default_draft_vocabulary(model_or_config, size)`: the lowest `size` token ids plus the special
ids. BPE tokenizers number merges in the order they were learned, most frequent pairs first, so low
ids are roughly the frequent tokens. On this repository's .py and .md files (90,927 tokens of the
Qwen2.5 tokenizer) the lowest 8k / 16k / 32k / 64k ids cover 76% / 85% / 92% / 97.8% of the
tokens. No corpus statistics are shipped: the tokenizer's ordering is the statistic.
"""

from __future__ import annotations

import torch
from torch import nn

from saguaro.model.module_tree import clone_module_tree, set_submodule


class RestrictedLMHead(nn.Module):
    """An LM head that computes logits for `keep_ids` only and scatters them into full-vocabulary
    logits, -inf elsewhere: every id outside the kept set gets probability exactly 0."""

    def __init__(self, head: nn.Linear, keep_ids: torch.Tensor):
        super().__init__()
        self.vocab_size = head.out_features
        self.register_buffer("keep_ids", keep_ids.to(head.weight.device))
        # The kept rows, selected once; a plain Linear so that quantize_draft treats it as any other.
        with torch.device("meta"):
            self.linear = nn.Linear(head.in_features, len(keep_ids), bias=head.bias is not None)
        self.linear.weight = nn.Parameter(
            head.weight.detach().index_select(0, self.keep_ids), requires_grad=False
        )
        if head.bias is not None:
            self.linear.bias = nn.Parameter(
                head.bias.detach().index_select(0, self.keep_ids), requires_grad=False
            )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        kept = self.linear(hidden)
        logits = kept.new_full((*kept.shape[:-1], self.vocab_size), float("-inf"))
        return logits.index_copy_(-1, self.keep_ids, kept)


def text_config(model_or_config):
    """The config of a model's (or a config's) text part: a multimodal model's language model."""
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def default_draft_vocabulary(model_or_config, size: int) -> torch.Tensor:
    """The lowest `size` token ids (BPE: roughly the most frequent tokens, see the module docstring)
    plus the special ids (eos, bos, pad) of the config and generation config; sorted LongTensor."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"the draft vocabulary size must be a positive int, got {size!r}")
    vocab = text_config(model_or_config).vocab_size
    specials = set()
    for source in (text_config(model_or_config), getattr(model_or_config, "generation_config", None)):
        for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
            value = getattr(source, name, None)
            specials.update([value] if isinstance(value, int) else (value or []))
    ids = set(range(min(size, vocab))) | {int(i) for i in specials if 0 <= int(i) < vocab}
    return torch.tensor(sorted(ids), dtype=torch.long)


def restrict_draft_vocabulary(model: nn.Module, keep_ids) -> nn.Module:
    """A new model whose LM head scores only `keep_ids` (q = 0 for every other id); see RestrictedLMHead.
    Restrict before quantizing: the reduced head is then quantized like any linear."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"the draft's output head is a {type(head).__name__}, not an nn.Linear: restrict the vocabulary "
            "of an unquantized, unrestricted draft (then quantize)"
        )
    keep = torch.as_tensor(keep_ids, dtype=torch.long).reshape(-1).unique()  # sorted, no repeats
    if len(keep) == 0 or keep[0] < 0 or keep[-1] >= head.out_features:
        raise ValueError(
            f"keep_ids must be non-empty token ids in [0, {head.out_features}), got {keep_ids!r}"
        )
    name = next(name for name, module in model.named_modules() if module is head)
    clone = clone_module_tree(model)
    set_submodule(clone, name, RestrictedLMHead(head, keep))
    return clone
