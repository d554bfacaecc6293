"""From logits to the distribution a token is drawn from.

The target's p must be exactly what HF `generate()` would sample from (or take the argmax of), so
the shaping is HF's own: its warpers (temperature, top-k, top-p) or, through the drop-in
`generate`, the full `LogitsProcessorList` HF builds for the call (repetition penalty, minimum
length, bad words, ...). Processors may look at the tokens before a position, so every scored row
gets its own history: the committed sequence plus the draft tokens above it.
Speculative sampling stays exact whatever the draft's q is, as long as each draft token is drawn
from the very q verification divides by; the draft is shaped by the warpers only.
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
        # As HF's generate: top_p >= 1 keeps every token (no top-p warper), only a negative one is an error.
        if self.top_p is not None and not self.top_p >= 0:
            raise ValueError(f"top_p must be >= 0 (1 or more, or None, disables it), got {self.top_p!r}")


def sampling_warpers(config: SamplingConfig) -> list:
    """HF's warpers for `config`, in HF's order (none when greedy)."""
    if not config.do_sample:
        return []
    warpers = []
    if config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k:
        warpers.append(TopKLogitsWarper(config.top_k))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(config.top_p))
    return warpers


class TokenSampler:
    """Turns logits into choices: argmax when greedy, a draw from the shaped distribution otherwise.

    `processors` (HF's list for a generate call, warpers included when sampling) replaces the
    default warpers; `history_prefix` is what HF would have in input_ids before the prompt (the
    left padding of a batch row), so processors see exactly HF's input_ids.
    """

    def __init__(
        self,
        config: SamplingConfig,
        generator: torch.Generator | None = None,
        processors: LogitsProcessorList | None = None,
        history_prefix: list[int] = (),
    ):
        self.config = config
        self.generator = generator
        self.history_prefix = list(history_prefix)
        self.uses_history = bool(processors)
        self._processors = processors if processors else LogitsProcessorList()
        if processors is None:
            self._processors.extend(sampling_warpers(config))

    @property
    def greedy(self) -> bool:
        return not self.config.do_sample

    def scores(self, logits: torch.Tensor, histories: list[list[int]] | None = None) -> torch.Tensor:
        """[..., V] logits -> [..., V] float32 scores after the processors; row i has history i."""
        scores = logits.float().reshape(-1, logits.shape[-1])
        if not self.uses_history:
            # The warpers ignore input_ids; they only need a tensor with the batch dimension.
            return self._processors(scores.new_zeros(scores.shape[0], 0, dtype=torch.long), scores).reshape(
                logits.shape
            )
        if histories is None or len(histories) != scores.shape[0]:
            raise ValueError("these logits processors need the tokens before every scored position")
        rows = []
        for row, history in zip(scores, histories):
            ids = torch.tensor([self.history_prefix + history], dtype=torch.long, device=scores.device)
            rows.append(self._processors(ids, row[None].clone())[0])
        return torch.stack(rows).reshape(logits.shape)

    def probs(self, logits: torch.Tensor, histories: list[list[int]] | None = None) -> torch.Tensor:
        """[..., V] logits -> [..., V] float32 probabilities after the processors."""
        return torch.softmax(self.scores(logits, histories), dim=-1)

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One token id per row of [..., V] probabilities.

        Draws on the generator's device (a user's CPU generator with CUDA logits, say), so one
        generator serves every draw and every uniform of a generation.
        """
        flat = probs.reshape(-1, probs.shape[-1])
        if self.generator is not None and self.generator.device != flat.device:
            drawn = torch.multinomial(flat.to(self.generator.device), 1, generator=self.generator)
            return drawn.to(probs.device).reshape(probs.shape[:-1])
        return torch.multinomial(flat, 1, generator=self.generator).reshape(probs.shape[:-1])

    def uniform(self) -> float:
        return self.uniforms(1).item()

    def uniforms(self, count: int) -> torch.Tensor:
        """[count] independent U(0, 1) draws, on the generator's device."""
        device = self.generator.device if self.generator is not None else None
        return torch.rand(count, generator=self.generator, device=device)

    def choose(self, logits: torch.Tensor, history: list[int] | None = None) -> int:
        """The next token after a single position's logits [V], whose history is `history`."""
        histories = None if history is None else [history]
        if self.greedy:
            return int(greedy_choice(self.scores(logits[None], histories) if self.uses_history else logits))
        return int(self.draw(self.probs(logits[None], histories)[0]))

    def drafting(self) -> TokenSampler:
        """The sampler for the draft model: same warpers and RNG, no history-dependent processors."""
        if not self.uses_history:
            return self
        return TokenSampler(self.config, self.generator)


class BrokenDraft(RuntimeError):
    """The draft model's probabilities are not finite (NaN or inf): its weights or activations are
    broken. The decoding loop then goes on without drafts; only speed is lost."""


def drawable(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q with each non-finite row [..., V] replaced by a uniform one, a 0-d bool tensor: whether
    every row was finite). Drawing from the result cannot fail, and the flag stays on the device
    until the drafter's one host read of its tokens, so a GPU draft waits no more than before."""
    finite = torch.isfinite(q).all(-1, keepdim=True)
    return torch.where(finite, q, torch.full_like(q, 1.0 / q.shape[-1])), finite.all()


def check_drafted(tokens: list[torch.Tensor], finite: list[torch.Tensor]) -> list[int]:
    """The drafted `tokens` (1-d tensors, concatenated) read to the host in one read with their
    `finite` flags (from `drawable`); raises BrokenDraft if a q was not finite."""
    flags = [flag.reshape(1).to(torch.long) for flag in finite]
    read = torch.cat([*tokens, *flags]).tolist() if tokens or flags else []
    if not all(read[len(read) - len(flags) :]):
        raise BrokenDraft(
            "the draft model's probabilities are not finite (NaN or inf): its weights or activations "
            "are broken (e.g. overflowing in float16)"
        )
    return read[: len(read) - len(flags)]


def greedy_choice(scores: torch.Tensor) -> torch.Tensor:
    """Each row's argmax over [..., V], taken in float32 as HF's greedy search takes it (the same
    ids: bf16 converts exactly). It is also faster: torch's CPU argmax over bf16 takes 1.5 ms for a
    [5, 152k] verification on 2 cores, converting first and the float argmax 0.34 ms."""
    return scores.float().argmax(-1)


def pad_vocab(probs: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad the last dimension to `size`: a token outside a model's vocabulary has probability 0.

    Draft and target of one family often have different embedding sizes (padded for speed) while
    sharing the tokenizer; comparing their distributions needs one common width.
    """
    missing = size - probs.shape[-1]
    return probs if missing <= 0 else torch.nn.functional.pad(probs, (0, missing))
