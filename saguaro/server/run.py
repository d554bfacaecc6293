"""Running the app under uvicorn, with a graceful stop: the first SIGTERM (or Ctrl+C) stops
admitting work (503), lets running requests finish within a timeout, cancels the rest, then exits;
a second signal stops at once."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import uvicorn

from saguaro.server.app import Model, ServerState, create_app

DEFAULT_SHUTDOWN_TIMEOUT = 20.0
logger = logging.getLogger("saguaro.server")
# After the drain, how long uvicorn waits for the last responses to be written before cutting them.
FLUSH_SECONDS = 5.0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout: float):
        super().__init__(config)
        self.state, self.shutdown_timeout = state, shutdown_timeout
        self.drain_requested = False
        self._drain: asyncio.Task | None = None

    def request_drain(self) -> None:
        """What a signal does; callable from any thread (the loop picks it up at its next tick)."""
        self.drain_requested = True

    def handle_exit(self, sig: int, frame) -> None:
        if self.drain_requested:  # the second signal: uvicorn's own immediate stop
            super().handle_exit(sig, frame)
        else:
            self.request_drain()

    async def on_tick(self, counter: int) -> bool:
        if self.drain_requested and self._drain is None:
            self._drain = asyncio.create_task(self._drain_then_exit())
        if self.state.load_error is not None:
            self.should_exit = True
        return await super().on_tick(counter)

    async def _drain_then_exit(self) -> None:
        logger.info(
            "saguaro serve: stopping: new requests get 503; running ones have %.0f s to finish "
            "(a second signal stops at once)",
            self.shutdown_timeout,
        )
        try:
            await self.state.drain(self.shutdown_timeout)
        finally:
            self.should_exit = True


def make_server(
    name: str,
    load,
    host: str = "127.0.0.1",
    port: int = 8000,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
    log_level: str = "info",
) -> DrainingServer:
    app = create_app(name, load)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=FLUSH_SECONDS
    )
    return DrainingServer(config, app.state.saguaro, shutdown_timeout)


def load_model(target: str, draft: str | None, dtype: str, **engine_options) -> Model:
    """Load the target (and draft) from folders or hub ids and start an engine on them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saguaro.engine import AsyncEngine

    torch_dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(target)
    target_model = AutoModelForCausalLM.from_pretrained(target, dtype=torch_dtype).eval()
    draft_model = AutoModelForCausalLM.from_pretrained(draft, dtype=torch_dtype).eval() if draft else None
    config = target_model.config.get_text_config()
    context = getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length
    return Model(AsyncEngine(target_model, draft_model, **engine_options), tokenizer, context)


def serve(
    target: str,
    draft: str | None = None,
    *,
    name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    dtype: str = "bfloat16",
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
    **engine_options,
) -> None:
    """`saguaro serve`: serve `target` (speculating with `draft`) until a signal stops it."""
    name = name or Path(target.rstrip("/")).name
    # The server's own messages (loaded, stopping, a request's failure) beside uvicorn's.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")

    def load() -> Model:
        return load_model(target, draft, dtype, **engine_options)

    server = make_server(name, load, host, port, shutdown_timeout)
    server.run()
    if server.state.load_error is not None:
        raise SystemExit(f"saguaro serve: loading the models failed: {server.state.load_error}")
