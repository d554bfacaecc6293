"""The engine's refusals, importable without the engine (the server answers them as HTTP errors)."""


class QueueFull(RuntimeError):
    """The engine's queue of waiting requests is full: retry later."""


class EngineClosed(RuntimeError):
    """The engine was shut down and takes no more requests."""
