"""The FastAPI app: OpenAI's completion endpoints over an `AsyncEngine`, and health, models and
metrics. The models load in a thread after the server starts listening, so `/health` can say 503
until they are ready; a drain (SIGTERM) answers new work with 503 while running requests finish."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from saguaro.engine.errors import EngineClosed, QueueFull
from saguaro.server.generation import Generation
from saguaro.server.metrics import CONTENT_TYPE, ServerMetrics
from saguaro.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse
from saguaro.server.responses import Answer
from saguaro.server.text import TextStream

if TYPE_CHECKING:
    from saguaro.engine.engine import AsyncEngine

logger = logging.getLogger("saguaro.server")
RETRY_AFTER_SECONDS = "1"


@dataclass
class Model:
    """What the endpoints serve: the engine, the target's tokenizer and its context length."""

    engine: AsyncEngine
    tokenizer: Any
    context_length: int


class ServerState:
    def __init__(self, name: str, load: Callable[[], Model]):
        self.name, self.load = name, load
        self.model: Model | None = None
        self.load_error: BaseException | None = None
        self.draining = False
        self.metrics = ServerMetrics(lambda: None if self.model is None else self.model.engine.metrics())

    async def start(self) -> None:
        try:
            self.model = await asyncio.to_thread(self.load)
            logger.info("saguaro serve: %s is loaded and serving", self.name)
        except Exception as error:
            logger.exception("saguaro serve: loading %s failed", self.name)
            self.load_error = error

    def serving(self) -> Model:
        if self.draining:
            raise APIError(503, "The server is shutting down", "server_error", headers={"Retry-After": "5"})
        if self.model is None:
            raise APIError(503, "The model is still loading", "server_error", headers={"Retry-After": "5"})
        return self.model

    async def drain(self, timeout: float) -> None:
        """Stop admitting; let running requests finish within `timeout` seconds, cancel the rest."""
        self.draining = True
        if self.model is not None:
            await self.model.engine.shutdown(timeout)


def create_app(name: str, load: Callable[[], Model]) -> FastAPI:
    """The app serving model `name`; `load` (run in a thread at startup) builds its engine."""
    state = ServerState(name, load)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(state.start())
        yield
        await loading  # a load in progress cannot be interrupted (its thread runs on)
        if state.model is not None:
            await state.model.engine.close()

    app = FastAPI(title="saguaro serve", lifespan=lifespan)
    app.state.saguaro = state

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.draining or state.model is None:
            status = "draining" if state.draining else "failed" if state.load_error else "loading"
            return JSONResponse({"status": status}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        card = {"id": name, "object": "model", "created": int(time.time()), "owned_by": "saguaro"}
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _complete(state, request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _complete(state, request, chat=False)

    return app


async def _complete(state: ServerState, request: Request, chat: bool) -> Response:
    arrived = time.perf_counter()
    endpoint = "chat" if chat else "completions"
    try:
        model = state.serving()
        body = parse(await request.body(), ChatCompletionRequest if chat else CompletionRequest)
        if body.model != state.name:
            raise APIError(
                404,
                f"The model `{body.model}` does not exist: this server serves `{state.name}`",
                param="model",
                code="model_not_found",
            )
        prompt = _prompt_ids(body, model.tokenizer)
        stops = body.stop_strings()
        handle = _submit(model, prompt, body, stops)
    except APIError as error:
        state.metrics.requests.labels(endpoint, str(error.status)).inc()
        return error.response()
    except Exception as error:  # a bug or a tokenizer's failure: this request's 500, nothing more
        logger.exception("a %s request failed", endpoint)
        state.metrics.requests.labels(endpoint, "500").inc()
        return APIError.failure(error).response()
    generation = Generation(
        handle,
        TextStream(model.tokenizer, stops),
        Answer(state.name, chat),
        len(prompt),
        state.metrics,
        endpoint,
        arrived,
    )
    if body.stream:
        return StreamingResponse(
            generation.stream(body.include_usage()),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    return await generation.whole(request)


def _prompt_ids(body: ChatCompletionRequest | CompletionRequest, tokenizer) -> list[int]:
    if isinstance(body, ChatCompletionRequest):
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "This model has no chat template: use /v1/completions", param="messages")
        ids = tokenizer.apply_chat_template(
            [m.as_template_message() for m in body.messages],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )["input_ids"]
    elif isinstance(body.prompt, str) or isinstance(body.prompt[0], str):
        if isinstance(body.prompt, list) and len(body.prompt) > 1:
            raise APIError(400, "Several prompts in one request are not supported", param="prompt")
        ids = tokenizer(body.prompt if isinstance(body.prompt, str) else body.prompt[0]).input_ids
    else:
        ids = body.prompt
        if not all(0 <= i < len(tokenizer) for i in ids):
            raise APIError(400, f"Token ids must lie in [0, {len(tokenizer)})", param="prompt")
    if not ids:
        raise APIError(400, "The prompt is empty", param="prompt")
    return list(ids)


def _submit(model: Model, prompt: list[int], body, stops: list[str]):
    room = model.context_length - len(prompt)
    limit = body.token_limit()
    if room < 1 or (limit is not None and limit > room):
        raise APIError(
            400,
            f"`max_tokens` = {limit} is more than the {max(room, 0)} tokens this model's context of "
            f"{model.context_length} leaves after the {len(prompt)}-token prompt",
            param="max_tokens",
            code="context_length_exceeded",
        )
    kwargs = body.generation_kwargs(limit or room)
    if stops:
        kwargs.update(stop_strings=stops, tokenizer=model.tokenizer)
    try:
        return model.engine.submit(prompt, **kwargs)
    except QueueFull as error:
        raise APIError(
            429,
            f"The server is busy: {error}",
            "rate_limit_error",
            headers={"Retry-After": RETRY_AFTER_SECONDS},
        ) from None
    except EngineClosed:
        raise APIError(503, "The server is shutting down", "server_error") from None
    except ValueError as error:
        raise APIError(400, str(error)) from None
