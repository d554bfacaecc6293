"""The serving engine: concurrent requests decoded as one continuously batched, speculative batch
over shared prefix caches (`Engine`), and its asyncio face (`AsyncEngine`)."""

from saguaro.engine.engine import AsyncEngine, AsyncRequestHandle, Engine
from saguaro.engine.errors import EngineClosed, QueueFull
from saguaro.engine.requests import EngineOutput, RequestHandle, RequestStats

__all__ = [
    "Engine",
    "AsyncEngine",
    "QueueFull",
    "EngineClosed",
    "RequestHandle",
    "AsyncRequestHandle",
    "EngineOutput",
    "RequestStats",
]
