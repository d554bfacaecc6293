"""AsyncEngine: the engine with awaitable handles, for asyncio servers.

The scheduler thread hands each event (final tokens, the end) to the handle's event loop with
`loop.call_soon_threadsafe`, into an `asyncio.Queue` and a future: awaiting never polls and never
blocks the loop.
"""

from __future__ import annotations

import asyncio
import functools

from saguaro.engine.engine import Engine
from saguaro.engine.requests import EngineOutput, RequestHandle


class AsyncRequestHandle(RequestHandle):
    """`async for tokens in handle`, `await handle.result()`, `handle.cancel()`."""

    def __init__(self, ids, sequence, engine, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._future: asyncio.Future = loop.create_future()
        super().__init__(ids, sequence, engine)

    def _deliver(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
            if item is None:
                self._loop.call_soon_threadsafe(self._resolve)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _resolve(self) -> None:
        if not self._future.done():
            self._future.set_result(None)

    async def __aiter__(self):
        while True:
            item = await self._queue.get()
            if item is None:
                if self._error is not None:
                    raise self._error
                return
            yield item

    async def result(self, timeout: float | None = None) -> EngineOutput:
        await asyncio.wait_for(asyncio.shield(self._future), timeout)
        return RequestHandle.result(self, 0)


class AsyncEngine:
    """`Engine` (same arguments) for asyncio: `async with AsyncEngine(...) as engine`,
    `handle = engine.submit(...)` from the event loop's thread."""

    def __init__(self, *args, **kwargs):
        self.engine = Engine(*args, **kwargs)

    def submit(self, input_ids, attention_mask=None, **generate_kwargs) -> AsyncRequestHandle:
        handle_type = functools.partial(AsyncRequestHandle, loop=asyncio.get_running_loop())
        return self.engine.submit_as(handle_type, input_ids, attention_mask, generate_kwargs)

    def metrics(self) -> dict:
        return self.engine.metrics()

    async def shutdown(self, timeout: float | None = None) -> None:
        await asyncio.to_thread(self.engine.shutdown, timeout)

    async def close(self) -> None:
        await self.shutdown(0)

    async def __aenter__(self) -> AsyncEngine:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
