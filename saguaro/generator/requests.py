"""A generate() call's arguments as rows to decode: each prompt without its padding, its sampler
and its stop rule, with errors that say what to pass instead."""

from __future__ import annotations

import numbers

import torch
from transformers.generation.logits_process import LogitsProcessorList

from saguaro.decode.engines import StopRule
from saguaro.decode.sampling import SamplingConfig, TokenSampler
from saguaro.faults import warn


def eos_ids(eos_token_id, model) -> frozenset[int]:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int):
        return frozenset([eos_token_id])
    return frozenset(int(t) for t in eos_token_id)


def checked_max_new_tokens(max_new_tokens) -> int:
    if (
        not isinstance(max_new_tokens, numbers.Integral)
        or isinstance(max_new_tokens, bool)
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    return int(max_new_tokens)  # numpy integers too


def warn_past_positions(target, longest_prompt: int, max_new_tokens: int) -> None:
    limit = getattr(target.config, "max_position_embeddings", None)
    if limit and longest_prompt + max_new_tokens > limit:
        # As HF: the model may cope (rotary positions extrapolate) or fail; warn and try.
        warn(
            f"saguaro: a {longest_prompt}-token prompt + max_new_tokens={max_new_tokens} exceeds the "
            f"target's {limit} positions (max_position_embeddings); the model may degrade or fail past "
            "them. Shorten the prompt or lower max_new_tokens to stay within them",
            stacklevel=4,
        )


def prompt_rows(
    input_ids, attention_mask, vocab_size: int
) -> tuple[torch.Tensor, list[list[int]], list[int]]:
    """[batch, length] ids (+ mask) -> (ids, each row's prompt without padding, each row's pad count);
    every prompt token must be an id of the target's `vocab_size`-token vocabulary."""
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise ValueError("input_ids is empty: give at least one prompt token (e.g. the BOS token)")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        # HF fails deep in the embedding lookup; say it here, and how to fix it.
        raise TypeError(
            f"input_ids must hold integer token ids, got dtype {ids.dtype}; tokenize the text, or convert "
            "with input_ids.long()"
        )
    # Like HF, a float mask (1.0 / 0.0) is as good as an integer one: nonzero means attend.
    mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask)
    if mask.numel() != ids.numel():
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)} but input_ids {tuple(ids.shape)}: pass the mask "
            "the tokenizer returned with these input_ids (one entry per token), or none"
        )
    mask = mask.reshape(ids.shape).ne(0).long()
    rows, pads = [], []
    for row, row_mask in zip(ids.tolist(), mask.tolist()):
        pad = len(row_mask) - sum(row_mask)
        if any(row_mask[:pad]) or not all(row_mask[pad:]):
            raise ValueError(
                "attention_mask must be left padding (zeros first, then ones): decoder-only generation "
                "appends after the last token. Set tokenizer.padding_side = 'left' before tokenizing "
                "the batch"
            )
        if pad == len(row):
            raise ValueError("a row of input_ids is all padding: every prompt needs at least one token")
        # The runner feeds ids beyond a draft's smaller table as 0; an id the target lacks would be
        # fed so too, giving an answer to another prompt (HF fails in the embedding lookup).
        bad = [t for t in row[pad:] if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(
                f"input_ids holds token id {bad[0]}, outside the target's {vocab_size}-token vocabulary "
                f"(ids 0 to {vocab_size - 1}): tokenize with the target's own tokenizer"
            )
        rows.append(row[pad:])
        pads.append(pad)
    return ids, rows, pads


def samplers_and_stops(
    prompts: list[list[int]],
    pads: list[int],
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    logits_processor,
    pad_token_id: int | None,
    max_new_tokens: int,
    eos: frozenset[int],
    stopping_criteria=None,
    streamer=None,
) -> tuple[list[TokenSampler], list[StopRule]]:
    """Each row's sampler (its processors see the row's own history, padding included as HF's do)
    and its stop rule. `logits_processor` is one LogitsProcessorList (or None) for all rows, or a
    list of them, one per row."""
    if logits_processor is None or isinstance(logits_processor, LogitsProcessorList):
        logits_processor = [logits_processor] * len(prompts)
    samplers = [
        TokenSampler(sampling, generator, processors, [pad_token_id] * pad if pad else [])
        for pad, processors in zip(pads, logits_processor)
    ]
    stops = [
        StopRule(max_new_tokens, eos, stopping_criteria, sampler.history_prefix + prompt, streamer)
        for prompt, sampler in zip(prompts, samplers)
    ]
    return samplers, stops
