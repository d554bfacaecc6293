"""What `saguaro bench` feeds the methods: the prompt set, encoded as a user message, cycled into
left-padded batches, under a plain greedy generation config; each row's new tokens from an output;
and the forward lengths at which step costs are measured."""

from __future__ import annotations

import json
from pathlib import Path

import torch

STEP_TOKENS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32)
PROMPTS_FILE = Path(__file__).resolve().parent / "prompts.jsonl"


def load_prompts(path: str | None, limit: int | None) -> list[dict]:
    text = Path(path or PROMPTS_FILE).read_text()
    prompts = [json.loads(line) for line in text.splitlines() if line.strip()]
    if limit:
        # Round-robin over kinds so a short run still sees code, chat and summaries.
        kinds = sorted({p["kind"] for p in prompts})
        by_kind = [[p for p in prompts if p["kind"] == k] for k in kinds]
        prompts = [group[i] for i in range(len(prompts)) for group in by_kind if i < len(group)][:limit]
    return prompts


def encode(tokenizer, text: str) -> torch.Tensor:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    else:
        ids = tokenizer(text, return_tensors="pt").input_ids
    return ids


def plain_greedy_config(model):
    """The model's generation config with its sampling defaults removed (Qwen ships top_p, top_k,
    repetition_penalty): every method is measured on the same plain decoding."""
    from transformers import GenerationConfig

    old = model.generation_config
    return GenerationConfig(
        bos_token_id=old.bos_token_id,
        eos_token_id=old.eos_token_id,
        pad_token_id=old.pad_token_id if old.pad_token_id is not None else old.eos_token_id,
    )


def new_tokens(sequences: torch.Tensor, prompt_width: int, eos) -> list[list[int]]:
    """Each row's new tokens up to and including its first EOS (a batch pads finished rows after it)."""
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    rows = []
    for row in sequences[:, prompt_width:].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
        rows.append(row[:end])
    return rows


def left_padded(rows: list[torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, n] prompts -> a left-padded batch and its attention mask."""
    width = max(row.shape[1] for row in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - row.shape[1] :] = row[0]
        mask[i, width - row.shape[1] :] = 1
    return ids, mask


def batches(num_prompts: int, size: int) -> list[list[int]]:
    """Prompt indices per batch: the prompts in order, cycled so that every batch is full and every
    prompt is in one (a batch of 8 from 6 prompts repeats 2 of them)."""
    count = max(1, -(-num_prompts // size))
    return [[(b * size + i) % num_prompts for i in range(size)] for b in range(count)]
