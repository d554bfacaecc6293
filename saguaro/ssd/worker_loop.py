"""The Saguaro worker's message loop (`serve`), the same wherever the worker runs (ssd/worker.py):
answer each request at once, then pre-speculate until the next one arrives.

The protocol cannot desynchronise: every request carries a sequence number and its reply echoes
it, so the caller recognises and drops a reply to a request it stopped waiting for. A worker that
raises sends its exception back (`WorkerError`: type, message, traceback) and stops.
"""

from __future__ import annotations

import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection

from saguaro.decode.sampling import BrokenDraft
from saguaro.model.placement import before_each_layer


@dataclass
class WorkerError:
    """An exception raised inside the worker, as it travels back to the generator."""

    type_name: str
    message: str
    traceback: str

    @classmethod
    def capture(cls, error: BaseException) -> WorkerError:
        return cls(type(error).__name__, str(error), traceback.format_exc())

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}"


def serve(conn: Connection, make_speculator, before_reply=lambda: None, working=None) -> None:
    """Worker loop: answer reset/resolve/catch_up requests, pre-speculate while the target verifies.

    `make_speculator()` builds the worker's PreSpeculator here, where it runs (an error building it
    is the answer to the first request). A request is (seq, kind, *args); the reply is
    (seq, Draft | WorkerError). `before_reply` runs before each reply (a drafter on its own CUDA
    stream: let the reader see finished tensors).
    An outcome that hits a branch already as deep as the target asked is answered between the
    drafter's layers, mid-step (`answer_hit_mid_step`); the step then ends and `resolve` does the
    bookkeeping with the same draft, unanswered a second time.
    `working` (a shared flag, or None) is raised by the sender with each request
    (`DraftWorker.begin`) and again before each reply, and lowered once the request and the
    pre-speculation after it are done: a target that finds it down knows the worker idles.
    """
    inbox: deque = deque()
    failure: WorkerError | None = None

    def next_request():
        return inbox.popleft() if inbox else conn.recv()

    def request_waiting() -> bool:
        # Polled between pre-speculation steps: the outcome (or a new sequence) is answered at once.
        while conn.poll():
            inbox.append(conn.recv())
        return bool(inbox)

    answered_early: set[int] = set()  # resolve requests answered mid-step, bookkeeping pending

    def answer_hit_mid_step() -> None:
        if not request_waiting():
            return
        seq, kind, *args = inbox[0]
        if kind == "resolve" and seq not in answered_early:
            draft = speculator.answer_early(*args)
            if draft is not None:
                before_reply()
                conn.send((seq, draft))
                answered_early.add(seq)

    try:
        speculator = make_speculator()
    except Exception as error:
        failure = WorkerError.capture(error)
    try:
        while True:
            seq, kind, *args = next_request()
            if kind == "close":
                return
            if kind == "pause":  # it ended the pre-speculation (request_waiting); no reply
                continue
            if failure is not None:  # report it on the first request it can answer, then stop
                conn.send((seq, failure))
                return
            answered = seq in answered_early
            answered_early.discard(seq)
            try:
                draft = getattr(speculator, kind)(*args)  # reset, resolve or catch_up
                if working is not None:
                    working.value = 1
                if not answered:
                    before_reply()
                    conn.send((seq, draft))
                    answered = True
                with before_each_layer(speculator.runner.model, answer_hit_mid_step):
                    speculator.prespeculate(request_waiting)
            except (EOFError, BrokenPipeError):
                raise
            except BrokenDraft as error:
                # The draft model is broken, not the worker: say so and serve on (the caller drafts
                # no more this call; a later call's reset tries again).
                if not answered:
                    conn.send((seq, WorkerError.capture(error)))
            except Exception as error:
                failure = WorkerError.capture(error)
                if not answered:
                    conn.send((seq, failure))
                    return
            finally:
                if working is not None:
                    working.value = 0
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return  # the generator is gone
    finally:
        conn.close()  # whatever ended the loop, the generator sees EOF at once instead of a timeout
