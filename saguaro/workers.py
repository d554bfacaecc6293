"""Where the Saguaro drafter runs, concurrently with the target.

Three placements share one message loop (`_serve`) around a `PreSpeculator`:
  * "process" - a spawned worker process with its own torch threads (CPU: target on one core,
    drafter on the other). The draft weights travel once, as shared-memory tensors.
  * "thread"  - a thread in this process; on CUDA it drafts on its own stream, or on its own
    device when the draft model lives on another GPU (torch releases the GIL inside kernels).
  * "inline"  - no concurrency, no pre-speculation: every round drafts afresh (plain speculative
    decoding). It is also the fallback when a worker dies or stalls.
Messages are tiny (token ids, an outcome); only a hit's draft distributions (sampling) are large.
A worker's end of the pipe sees EOF when its generator's process dies, so it never outlives it.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
from multiprocessing.connection import Connection

import torch

from .prespeculation import Draft, PreSpeculator
from .sampling import SamplingConfig

PLACEMENTS = ("process", "thread", "inline")


class WorkerFailed(RuntimeError):
    """The drafter worker died, or did not answer within its timeout."""


def _serve(conn: Connection, make_speculator) -> None:
    """Worker loop: answer reset/resolve/catch_up messages, pre-speculate while the target verifies."""
    speculator: PreSpeculator = make_speculator()
    inbox: list = []

    def next_message():
        return inbox.pop(0) if inbox else conn.recv()

    def sequence_over() -> bool:
        # An outcome for the current draft may arrive mid-way; keep it for later. A reset or close
        # means the target has stopped: pre-speculating further is wasted work.
        while conn.poll():
            inbox.append(conn.recv())
        return any(message[0] != "resolve" for message in inbox)

    try:
        while True:
            kind, *args = next_message()
            if kind == "close":
                return
            draft = getattr(speculator, kind)(*args)  # reset, resolve or catch_up
            conn.send(draft)
            speculator.prespeculate(sequence_over)
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return  # the generator is gone
    finally:
        conn.close()  # whatever ended the loop, the generator sees EOF at once instead of a timeout


def _process_main(conn, threads, model, speculator_kwargs) -> None:
    torch.set_num_threads(threads)
    if isinstance(model, tuple):  # spawned: rebuild the module around the shared-memory weights
        from transformers import AutoModelForCausalLM

        config, state_dict, dtype = model
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.load_state_dict(state_dict, assign=True, strict=False)
        model.tie_weights()
        model.eval()
    _serve(conn, lambda: PreSpeculator(model, **speculator_kwargs))


class DraftWorker:
    """The main-process handle: reset() and resolve() return the next draft, or raise WorkerFailed."""

    def __init__(
        self,
        model,
        placement: str = "process",
        timeout: float = 60.0,
        threads: int = 1,
        start_method: str | None = None,
        **speculator_kwargs,
    ):
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {placement!r}; use one of {', '.join(PLACEMENTS)}")
        self.placement, self.timeout = placement, timeout
        self._inline = PreSpeculator(model, **speculator_kwargs) if placement == "inline" else None
        self._conn = self._process = self._thread = None
        if placement == "process":
            # fork shares the weights copy-on-write and starts at once, with no re-import of the
            # user's __main__; spawn (where fork is missing) sends them as shared-memory tensors.
            method = start_method or (
                "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            )
            ctx = torch.multiprocessing.get_context(method)
            self._conn, child = ctx.Pipe()
            payload = model if method == "fork" else (model.config, model.state_dict(), model.dtype)
            self._process = ctx.Process(
                target=_process_main,
                args=(child, threads, payload, speculator_kwargs),
                daemon=True,
                name="saguaro-drafter",
            )
            self._process.start()
            child.close()
        elif placement == "thread":
            self._conn, child = multiprocessing.Pipe()
            stream = torch.cuda.Stream(model.device) if model.device.type == "cuda" else None

            def run():
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    _serve(child, lambda: PreSpeculator(model, **speculator_kwargs))

            self._thread = threading.Thread(target=run, daemon=True, name="saguaro-drafter")
            self._thread.start()

    def reset(self, committed: list[int], sampling: SamplingConfig, seed: int) -> Draft:
        if self._inline:
            return self._inline.reset(committed, sampling, seed)
        return self._ask(("reset", committed, sampling, seed))

    def resolve(
        self, accepted: int, next_token: int, verify_seconds: float, depth: int | None = None
    ) -> Draft:
        if self._inline:
            return self._inline.resolve(accepted, next_token, verify_seconds, depth)
        return self._ask(("resolve", accepted, next_token, verify_seconds, depth))

    def catch_up(self, committed: list[int], depth: int | None = None) -> Draft:
        if self._inline:
            return self._inline.catch_up(committed, depth)
        return self._ask(("catch_up", committed, depth))

    def _ask(self, message) -> Draft:
        try:
            self._conn.send(message)
            if not self._conn.poll(self.timeout):
                raise WorkerFailed(f"drafter worker gave no answer within {self.timeout:.0f}s")
            return self._conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError) as error:
            raise WorkerFailed(f"drafter worker is gone ({error!r})") from error

    @property
    def alive(self) -> bool:
        if self._process is not None:
            return self._process.is_alive()
        if self._thread is not None:
            return self._thread.is_alive()
        return True

    def close(self) -> None:
        """Stop the worker and wait for it; a process that does not stop in time is killed."""
        if self._conn is not None:
            try:
                self._conn.send(("close",))
            except (BrokenPipeError, OSError):
                pass
        if self._process is not None:
            self._process.join(timeout=5)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._conn is not None:
            self._conn.close()
        self._conn = self._process = self._thread = None
