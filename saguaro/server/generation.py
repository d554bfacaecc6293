"""One request's answer, from the engine's handle to HTTP: streamed as server-sent events or whole,
cancelled when the client goes away, counted in the metrics whatever happens."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from saguaro.server.metrics import ServerMetrics
from saguaro.server.protocol import APIError
from saguaro.server.responses import DONE, Answer, event, usage
from saguaro.server.text import TextStream

logger = logging.getLogger("saguaro.server")
CLIENT_GONE = 499  # nginx's status for a client that closed the connection first: only ever counted


class Generation:
    def __init__(
        self,
        handle,
        text: TextStream,
        answer: Answer,
        prompt_tokens: int,
        metrics: ServerMetrics,
        endpoint: str,
        arrived: float,
    ):
        self.handle, self.text, self.answer = handle, text, answer
        self.prompt_tokens, self.metrics, self.endpoint, self.arrived = (
            prompt_tokens,
            metrics,
            endpoint,
            arrived,
        )

    async def stream(self, include_usage: bool) -> AsyncIterator[str]:
        """The answer as server-sent events. A client that disconnects cancels this generator
        (Starlette) or closes it (a failed send); either way the request is cancelled."""
        status = CLIENT_GONE
        try:
            if self.answer.chat:
                yield event(self.answer.chunk("", role=True))
            async for piece in self._pieces():
                yield event(self.answer.chunk(piece))
            rest, finish_reason, usage_ = await self._finish()
            if rest:
                yield event(self.answer.chunk(rest))
            yield event(self.answer.chunk("", finish_reason=finish_reason))
            if include_usage:
                yield event(self.answer.usage_chunk(usage_))
            status = 200
        except APIError as error:  # headers are sent: the error goes in the stream, as OpenAI's does
            status = error.status
            yield event(error.body())
        except Exception as error:
            status = 500
            logger.exception("request %s failed", self.answer.id)
            yield event(APIError.failure(error).body())
        finally:
            self._end(status)
        yield DONE

    async def whole(self, request: Request) -> Response:
        """The whole answer as one JSON body, or nothing if the client leaves first."""
        collecting = asyncio.ensure_future(self._collect())
        gone = asyncio.ensure_future(_disconnected(request))
        status = CLIENT_GONE
        try:
            await asyncio.wait({collecting, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not collecting.done():
                return Response(status_code=CLIENT_GONE)
            text, finish_reason, usage_ = collecting.result()
            status = 200
            return JSONResponse(self.answer.whole(text, finish_reason, usage_))
        except APIError as error:
            status = error.status
            return error.response()
        except Exception as error:
            status = 500
            logger.exception("request %s failed", self.answer.id)
            return APIError.failure(error).response()
        finally:
            collecting.cancel()
            gone.cancel()
            self._end(status)

    async def _collect(self) -> tuple[str, str, dict]:
        pieces = [piece async for piece in self._pieces()]
        rest, finish_reason, usage_ = await self._finish()
        return "".join(pieces) + rest, finish_reason, usage_

    async def _pieces(self) -> AsyncIterator[str]:
        async for token_ids in self.handle:
            if not self.text.token_ids:
                self.metrics.time_to_first_token.observe(time.perf_counter() - self.arrived)
            piece = self.text.push(token_ids)
            if piece:
                yield piece
            if self.text.stopped:  # a stop string the engine's tokens ran past: the answer ends here
                self.handle.cancel()
                return

    async def _finish(self) -> tuple[str, str, dict]:
        """The text not yet given, the finish reason and the usage, once the engine is done."""
        out = await self.handle.result()
        stats = out.stats
        if self.text.stopped:
            finish_reason = "stop"
        elif stats.finish_reason == "cancelled":  # not by this request: the engine shut down
            raise APIError(503, "The server shut down before the answer was complete", "server_error")
        else:
            finish_reason = stats.finish_reason
        rest = self.text.finish()
        return (
            rest,
            finish_reason,
            usage(self.prompt_tokens, len(self.text.token_ids), stats.reused_prompt_tokens),
        )

    def _end(self, status: int) -> None:
        if not self.handle.done():
            self.handle.cancel()
        self.metrics.requests.labels(self.endpoint, str(status)).inc()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body is read: what comes now is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
