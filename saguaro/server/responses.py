"""OpenAI's response bodies: a whole answer, the chunks of a streamed one (server-sent events), and
usage. The chat and text endpoints differ only in where the text goes."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

DONE = "data: [DONE]\n\n"


def event(payload: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        # OpenAI's field for prompt tokens served from its prompt cache: here, the shared prefix cache.
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


@dataclass
class Answer:
    """The envelope of one answer: its id, model and time, and the shape of its endpoint."""

    model: str
    chat: bool
    id: str = field(default="")
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def whole(self, text: str, finish_reason: str, usage_: dict) -> dict:
        choice = (
            {"message": {"role": "assistant", "content": text}}
            if self.chat
            else {"text": text, "logprobs": None}
        )
        return self._envelope(
            "chat.completion" if self.chat else "text_completion",
            [{"index": 0, **choice, "finish_reason": finish_reason}],
            usage=usage_,
        )

    def chunk(self, text: str, finish_reason: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text} if role else {"content": text} if text else {}
            choice = {"delta": delta}
        else:
            choice = {"text": text, "logprobs": None}
        return self._envelope(self._chunk_object, [{"index": 0, **choice, "finish_reason": finish_reason}])

    def usage_chunk(self, usage_: dict) -> dict:
        """The last chunk with `stream_options.include_usage`: no choices, the usage."""
        return self._envelope(self._chunk_object, [], usage=usage_)

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _envelope(self, kind: str, choices: list, **extra) -> dict:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }
