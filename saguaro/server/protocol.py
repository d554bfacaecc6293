"""The OpenAI request bodies the server accepts, what in them it cannot honour exactly, and OpenAI's
error shape. A parameter that would change the answer is either honoured or refused with a 400 that
names it: never silently ignored."""

from __future__ import annotations

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_STOP_STRINGS = 4  # OpenAI's limit


class APIError(Exception):
    """An answer in OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    @classmethod
    def failure(cls, error: Exception) -> APIError:
        """A request that failed on the server's side (500): this request's answer, nothing more."""
        return cls(500, f"The request failed: {type(error).__name__}: {error}", "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# Accepted and without effect on the answer.
HARMLESS = {
    "user",
    "metadata",
    "store",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
    "parallel_tool_calls",
}
# Parameters saguaro does not implement, with the values that ask for nothing (and are accepted).
UNSUPPORTED = {
    "n": (1,),
    "best_of": (1,),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
}


def _one_of(value: Any, allowed: tuple) -> bool:
    # `False == 0` and `True == 1` in Python; a bool counts only as a bool (`logprobs: 0` asks for one).
    return any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_message(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        # `developer` is the newer clients' name for the system message; templates know `system`.
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class CompletionParameters(BaseModel):
    """What both endpoints share. Unknown fields land in `model_extra` and are judged there."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # not OpenAI's, but vLLM's and HF's
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise APIError(400, f"`stop` takes at most {MAX_STOP_STRINGS} non-empty strings", param="stop")
        return stops

    def generation_kwargs(self, max_new_tokens: int) -> dict[str, Any]:
        """HF generate keywords with OpenAI's defaults: temperature 1 and top_p 1 unless given, and
        temperature 0 meaning greedy decoding."""
        temperature = 1.0 if self.temperature is None else self.temperature
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=self.top_p or 1.0, top_k=self.top_k or 0)
        if self.seed is not None:
            kwargs["seed"] = self.seed
        return kwargs

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def check_supported(self) -> None:
        for name, value in (self.model_extra or {}).items():
            if name in HARMLESS:
                continue
            if name not in UNSUPPORTED:
                raise APIError(400, f"Unrecognized request argument supplied: {name}", param=name)
            if not _one_of(value, UNSUPPORTED[name]):
                raise APIError(
                    400,
                    f"`{name}` = {value!r} is not supported by saguaro serve (supported: "
                    f"{' or '.join(repr(v) for v in UNSUPPORTED[name])})",
                    param=name,
                    code="unsupported_parameter",
                )
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "`stream_options` needs `stream` = true", param="stream_options")


class ChatCompletionRequest(CompletionParameters):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(CompletionParameters):
    # A string, one string in a list, or token ids; several prompts at once would be `n` > 1.
    prompt: str | list[str] | list[int] = Field(min_length=1)

    def token_limit(self) -> int | None:
        return self.max_tokens


def parse(body: bytes, kind: type[CompletionParameters]) -> CompletionParameters:
    """The validated request, or a 400 in OpenAI's shape saying what is wrong."""
    try:
        request = kind.model_validate_json(body)
    except ValidationError as error:
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            raise APIError(400, f"The body is not valid JSON: {first['msg']}") from None
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in error.errors()
        )
        raise APIError(400, problems, param=".".join(str(p) for p in first["loc"]) or None) from None
    request.check_supported()
    return request
