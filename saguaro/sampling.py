"""From logits to the distribution a token is drawn from, identically for target and draft.

Speculative sampling is exact only if the target's p and the draft's q are shaped by the same
rules (temperature, top-k, top-p) and the draft token is drawn from the very q that verification
later divides by. Both sides therefore go through one `TokenSampler`. The warpers are HF's own
classes, so `do_sample=True` here means the same distribution as HF `generate()`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass(frozen=True)
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not self.do_sample:
            return
        if not self.temperature > 0:
            raise ValueError(
                f"temperature must be > 0 when do_sample=True, got {self.temperature}; "
                "use do_sample=False for greedy decoding"
            )
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"top_k must be a non-negative int (0 or None disables it), got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 or None disables it), got {self.top_p!r}")


class TokenSampler:
    """Turns logits into choices: argmax when greedy, a draw from the shaped distribution otherwise."""

    def __init__(self, config: SamplingConfig, generator: torch.Generator | None = None):
        self.config = config
        self.generator = generator
        self._warpers = LogitsProcessorList()
        if config.do_sample:
            if config.temperature != 1.0:
                self._warpers.append(TemperatureLogitsWarper(config.temperature))
            if config.top_k:
                self._warpers.append(TopKLogitsWarper(config.top_k))
            if config.top_p is not None and config.top_p < 1.0:
                self._warpers.append(TopPLogitsWarper(config.top_p))

    @property
    def greedy(self) -> bool:
        return not self.config.do_sample

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., V] logits -> [..., V] float32 probabilities after temperature / top-k / top-p."""
        scores = logits.float().reshape(-1, logits.shape[-1])
        # The warpers ignore input_ids; they only need a tensor with the batch dimension.
        scores = self._warpers(scores.new_zeros(scores.shape[0], 0, dtype=torch.long), scores)
        return torch.softmax(scores, dim=-1).reshape(logits.shape)

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One token id per row of [..., V] probabilities."""
        flat = probs.reshape(-1, probs.shape[-1])
        return torch.multinomial(flat, 1, generator=self.generator).reshape(probs.shape[:-1])

    def uniform(self) -> float:
        return torch.rand((), generator=self.generator).item()

    def choose(self, logits: torch.Tensor) -> int:
        """The next token after a single position's logits [V]."""
        if self.greedy:
            return int(logits.argmax(-1))
        return int(self.draw(self.probs(logits)))


def pad_vocab(probs: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad the last dimension to `size`: a token outside a model's vocabulary has probability 0.

    Draft and target of one family often have different embedding sizes (padded for speed) while
    sharing the tokenizer; comparing their distributions needs one common width.
    """
    missing = size - probs.shape[-1]
    return probs if missing <= 0 else torch.nn.functional.pad(probs, (0, missing))
