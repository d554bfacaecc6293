"""The draft options (`draft_quantization`, `draft_vocab_size`) and their checks: the values a
caller may pass, each bad one answered with what to pass instead."""

from __future__ import annotations

from torch import nn

from saguaro.draft.quantized_linear import QUANTIZATIONS
from saguaro.draft.vocabulary import text_config


def check_draft_options(quantization, vocab_size, draft: nn.Module | None = None) -> None:
    """Specific errors for bad draft_quantization / draft_vocab_size values (for this draft)."""
    if quantization not in ("auto", None, *QUANTIZATIONS):
        raise ValueError(
            f"draft_quantization must be 'auto', 'int8', 'int4' or None (unquantized), got {quantization!r}"
        )
    if not (
        vocab_size is None
        or (isinstance(vocab_size, str) and vocab_size == "auto")
        or (isinstance(vocab_size, int) and not isinstance(vocab_size, bool) and vocab_size >= 1)
    ):
        raise ValueError(
            f"draft_vocab_size must be 'auto', a positive int (the draft scores its lowest ids plus the "
            f"special ones) or None (the whole vocabulary), got {vocab_size!r}"
        )
    vocab = None if draft is None else text_config(draft).vocab_size
    if isinstance(vocab_size, int) and vocab is not None and vocab_size >= vocab:
        raise ValueError(
            f"draft_vocab_size={vocab_size} keeps the draft's whole {vocab}-id vocabulary; pass a smaller "
            "size, or None"
        )
