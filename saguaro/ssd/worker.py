"""Where the Saguaro drafter runs, concurrently with the target.

Three placements share one message loop (`ssd.worker_loop.serve`) around a `PreSpeculator`:
  * "process" - a spawned worker process with its own torch threads (CPU: target on one core,
    drafter on the other). The draft weights travel once, as shared-memory tensors.
  * "thread"  - a thread in this process; on CUDA it drafts on its own stream, or on its own
    device when the draft model lives on another GPU (torch releases the GIL inside kernels).
  * "rank"    - the drafter rank of a tensor-parallel run (distributed/__init__.py): the same loop, over
    torch.distributed messages; a rank that failed once is not used again by this process.
  * "inline"  - no concurrency, no pre-speculation: every round drafts afresh (plain speculative
    decoding). It is also the fallback when a worker dies or stalls.

The protocol cannot desynchronise: every request carries a sequence number and its reply echoes
it, so a reply to a request the caller stopped waiting for (Ctrl-C, a timeout) is recognised and
dropped. A worker that raises sends its exception back (type, message, traceback) and stops; a
dead, failed or stalled worker process is killed at once (never waited on; a stalled thread or
drafter rank cannot be: it is left, its late answers ignored), the handle drafts inline for the
rest of that call, and a fresh worker is started at a later call, with backoff.
Messages are tiny (token ids, an outcome); only a hit's draft distributions (sampling) are large.
A worker process never outlives its generator's process: its end of the pipe sees EOF when that
process dies (a forked child closes the inherited other end), on Linux the kernel kills it with its
parent (PR_SET_PDEATHSIG), and a watch on its parent's pid catches the rest (another child holding
the pipe open), within PARENT_WATCH_SECONDS.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time

import torch

from saguaro.decode.sampling import BrokenDraft, SamplingConfig, TokenSampler
from saguaro.distributed import topology
from saguaro.distributed.rank_channel import RankChannel
from saguaro.draft.stream import CatchUp, Draft, DraftRequest, DraftStream, Reset, Resolve
from saguaro.faults import WorkerFailed
from saguaro.ssd.prespeculation import PreSpeculator
from saguaro.ssd.worker_loop import WorkerError, serve

PLACEMENTS = ("process", "thread", "rank", "inline")
MAX_RESTART_BACKOFF = 16  # calls drafted inline before another restart, at most
PARENT_WATCH_SECONDS = 1.0  # how often a worker process checks that its parent still runs
PR_SET_PDEATHSIG = 1  # linux/prctl.h


# What becomes of a stalled worker, by placement: only a process can be killed from here.
STALLED = {
    "process": "it was killed",
    "thread": "a thread cannot be killed: it is left running (daemonic), its late answers ignored",
    "rank": (
        "the drafter rank is unresponsive, not killed (it may still run); its late answers are ignored "
        "and this process drafts inline from now on"
    ),
}


def _die_with_parent(parent_pid: int, forked_by_main_thread: bool) -> None:
    """End this worker process once `parent_pid` is no longer its parent (it died: SIGKILL,
    os._exit), whatever still holds the pipe's other end open (a sibling forked later inherits it)."""
    if os.getppid() != parent_pid:
        # Started by a forkserver, not by the generator (or the generator is gone already): the
        # pipe's EOF is what ends it.
        return
    # The kernel's death signal fires when the thread that forked exits, not the process: only a
    # fork by the main thread (which outlives the others) may ask for it.
    if forked_by_main_thread and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_WATCH_SECONDS)
        os._exit(0)  # nothing to flush: the worker's state is its parent's to keep

    # The watch checks at once, too: the parent may have died before the death signal was asked for.
    threading.Thread(target=watch, daemon=True, name="saguaro-parent-watch").start()


def _process_main(
    conn, threads, model, speculator_kwargs, working, parent_pid=None, main_thread=False, parent_end=None
) -> None:
    if parent_end is not None:
        # Forked: the child holds a copy of the generator's end too, which would keep its own end
        # from ever seeing EOF once the generator's process is gone.
        parent_end.close()
    if parent_pid is not None:
        _die_with_parent(parent_pid, main_thread)
    torch.set_num_threads(threads)
    if isinstance(model, tuple):  # spawned: rebuild the module around the shared-memory weights
        from transformers import AutoModelForCausalLM

        config, state_dict, dtype = model
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.load_state_dict(state_dict, assign=True, strict=False)
        model.tie_weights()
        model.eval()
    serve(conn, lambda: PreSpeculator(model, **speculator_kwargs), working=working)


def _drafter_rank_usable() -> bool:

    found = topology()
    return found is not None and found.drafter_channel() is not None


class DraftWorker(DraftStream):
    """The main-process handle, a `DraftStream`: reset(), resolve() and catch_up() return the next
    draft, `begin` sends a call and `end` collects its answer, meanwhile the worker drafts.

    A failure raises WorkerFailed once (the caller warns and re-sends its sequence with reset());
    from then on this handle drafts inline until `heal()` restarts the worker at a later call.
    Each call of the generator first says how to sample (`sample_as`).
    """

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
        self.model, self.placement, self.timeout, self.threads = model, placement, timeout, threads
        self.start_method = start_method
        self._speculator_kwargs = speculator_kwargs
        self._inline: PreSpeculator | None = None
        self._conn = self._process = self._thread = None
        self.working = None  # a worker process's flag (DraftStream.working)
        self._seq = 0
        self.failures = self.restarts = 0
        self._calls_until_restart = 0
        self._sampling, self._seed = SamplingConfig(), 0
        if placement == "inline":
            self._inline = PreSpeculator(model, **speculator_kwargs)
        else:
            self._start()

    @property
    def concurrent(self) -> bool:
        """True while a worker pre-speculates beside the target (False: drafting inline)."""
        return self._conn is not None

    def _start(self) -> None:
        kwargs = self._speculator_kwargs
        if self.placement == "process":
            # fork shares the weights copy-on-write and starts at once, with no re-import of the
            # user's __main__; spawn sends them as shared-memory tensors where fork is missing or
            # unsafe (a forked child cannot use CUDA once the parent has initialised it).
            can_fork = "fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized()
            method = self.start_method or ("fork" if can_fork else "spawn")
            ctx = torch.multiprocessing.get_context(method)
            self._conn, child = ctx.Pipe()
            model = self.model
            payload = model if method == "fork" else (model.config, model.state_dict(), model.dtype)
            self.working = ctx.Value("b", 0, lock=False)
            # A spawned child inherits no descriptors: only a forked one gets the parent's end to close.
            parent_end = self._conn if method == "fork" else None
            main_thread = threading.current_thread() is threading.main_thread()
            watch = (os.getpid(), main_thread, parent_end)
            self._process = ctx.Process(
                target=_process_main,
                args=(child, self.threads, payload, kwargs, self.working, *watch),
                daemon=True,
                name="saguaro-drafter",
            )
            self._process.start()
            child.close()
        elif self.placement == "rank":
            from saguaro.distributed import claim_drafter_rank

            # The channel outlives this worker: number requests after the ones it already carried.
            self._conn = claim_drafter_rank(self)
            if self._conn is None:  # no drafter rank, or it failed: draft inline
                self._inline = PreSpeculator(self.model, **kwargs)
                return
            self._seq = self._conn.last_seq
            self._conn.send(("session", kwargs))
        else:
            self._conn, child = multiprocessing.Pipe()
            model = self.model
            stream = torch.cuda.Stream(model.device) if model.device.type == "cuda" else None

            def run():
                if stream is None:
                    return serve(child, lambda: PreSpeculator(model, **kwargs))
                # Drafts made on the drafter's stream are read on the target's: finish them first.
                with torch.cuda.stream(stream):
                    serve(child, lambda: PreSpeculator(model, **kwargs), stream.synchronize)

            self._thread = threading.Thread(target=run, daemon=True, name="saguaro-drafter")
            self._thread.start()

    def heal(self) -> bool:
        """At the start of a call: restart a failed worker once its backoff has passed.

        After the n-th failure, 2^(n-1) - 1 calls (at most MAX_RESTART_BACKOFF) draft inline
        before the next restart, so a worker that keeps failing costs little. True if restarted.
        """
        if self.placement == "inline" or self.concurrent:
            return False
        if self.placement == "rank" and not _drafter_rank_usable():
            return False  # a remote rank cannot be restarted from here
        if self._calls_until_restart > 0:
            self._calls_until_restart -= 1
            return False
        self._inline = None
        self._start()
        self.restarts += 1
        return True

    def sample_as(self, sampler: TokenSampler) -> None:
        """The drafts of the coming call are shaped by `sampler`'s rules and drawn with an RNG of
        their own, seeded from `sampler`'s (the worker cannot share a generator across processes)."""
        self._sampling = sampler.config
        self._seed = int(torch.randint(0, 2**62, (), generator=sampler.generator))

    def begin(self, request: DraftRequest) -> int | Draft:
        """Send a call without waiting for its answer; `end` collects it. Lets the caller work
        meanwhile (the target's prefill while the drafter prefills). Drafting inline, the call
        runs now and the ticket is its draft."""
        kind = request.kind  # on the wire: the PreSpeculator method to call, with its own arguments
        match request:
            case Reset(committed, depth, draft):
                args = (committed, self._sampling, self._seed, draft, depth)
            case Resolve(path, next_token, verify_seconds, depth):  # its drafts are chains: a length
                args = (len(path), next_token, verify_seconds, depth)
            case CatchUp(committed, depth):
                args = (committed, depth)
        if self._inline is not None:
            return getattr(self._inline, kind)(*args)
        if self.working is not None:  # up before the worker starts, so no target reads it down early
            self.working.value = 1
        self._seq += 1
        try:
            self._conn.send((self._seq, kind, *args))
        except Exception as error:
            raise self._fail(f"is gone ({error!r})") from error
        return self._seq

    def pause(self) -> None:
        """Stop the worker's pre-speculation for an outcome that will not be sent: it would go on
        for all its steps on a core that the target's plain steps, or the caller, could use. Its
        next request (catch_up or reset) brings it up to date. Unanswered: a worker that is gone
        fails at that next request."""
        if self._conn is not None:
            self._seq += 1
            with contextlib.suppress(OSError, ValueError):
                self._conn.send((self._seq, "pause"))

    def end(self, ticket: int | Draft) -> Draft:
        """The answer to request `ticket`; answers to earlier, abandoned requests are dropped."""
        if isinstance(ticket, Draft):
            return ticket
        if self._conn is None:
            raise WorkerFailed("the drafter worker stopped before answering")
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                if not self._conn.poll(max(0.0, deadline - time.monotonic())):
                    raise self._fail(
                        f"stalled: no answer within {self.timeout:g}s; {STALLED[self.placement]}"
                    )
                reply_seq, payload = self._conn.recv()
                if reply_seq != ticket:
                    continue  # the answer to a request whose caller stopped waiting (Ctrl-C)
                if isinstance(payload, WorkerError) and payload.type_name == BrokenDraft.__name__:
                    raise BrokenDraft(payload.message)  # the worker serves on
                if isinstance(payload, WorkerError):
                    failed = self._fail(f"raised {payload}")
                    failed.remote_traceback = payload.traceback
                    raise failed
                return payload
        except (WorkerFailed, BrokenDraft):
            raise
        except Exception as error:  # EOF, a broken pipe, a garbled message: the worker is unusable
            raise self._fail(f"is gone ({error!r})") from error

    def _fail(self, what: str) -> WorkerFailed:
        """Stop the worker now (kill, never wait), switch to inline drafting, schedule a restart."""
        self.failures += 1
        where = self.placement
        if self.placement == "rank" and self._conn is not None:
            self._conn.failed = True  # a dead or stalled rank: its late replies must not be read
            from saguaro.distributed import topology

            found = topology()  # which rank, and whether its process is gone or stopped
            where = found.describe([self._conn.peer]) if found is not None else where
        self._stop(grace=0.0)
        self._inline = PreSpeculator(self.model, **self._speculator_kwargs)
        self._calls_until_restart = min(MAX_RESTART_BACKOFF, 2 ** (self.failures - 1) - 1)
        failed = WorkerFailed(f"the drafter worker ({where}) {what}")
        failed.remote_traceback = None
        return failed

    def _stop(self, grace: float) -> None:
        """Ask the worker to stop; a process still running after `grace` seconds is killed."""
        if self._conn is not None:
            with contextlib.suppress(OSError, ValueError):
                self._conn.send((0, "close"))
        if self._process is not None:
            self._process.join(timeout=grace)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout=5)
        if self._thread is not None:  # a thread cannot be killed: a stalled one is left, daemonic
            self._thread.join(timeout=grace)
        if self._conn is not None:
            self._conn.close()
        self._conn = self._process = self._thread = self.working = None

    def detach(self) -> None:
        """Let go of the concurrent drafter (another generator takes the drafter rank) and draft
        inline until `heal` starts it again at a later call."""
        self._stop(grace=0.0)
        self._inline = PreSpeculator(self.model, **self._speculator_kwargs)

    def close(self) -> None:
        """Stop the worker: it gets a few seconds to finish its step, then it is killed."""
        self._stop(grace=5.0)


def serve_drafter(draft_model) -> None:
    """The drafter rank's whole life: serve the leader's Saguaro workers until it shuts down or dies.

    Each of the leader's workers opens a session ("session", options) and closes it; in between,
    this rank runs the ordinary worker loop, pre-speculating while the target ranks verify.
    """
    rank = topology()
    if rank is None or not rank.is_drafter:
        raise RuntimeError(
            "serve_drafter runs on the drafter rank, after saguaro.distributed.init(..., drafter_rank=True)"
        )
    channel = RankChannel(rank.leader, rank.link)
    draft_model.eval()
    while True:
        try:
            message = channel.recv()
        except EOFError:
            logging.getLogger("saguaro").warning("saguaro: the leader rank is gone; the drafter rank stops")
            return
        if message[0] in ("exit", "bye"):
            channel.say_goodbye()
            return
        if message[0] == "session":
            options = message[1]
            serve(channel, lambda options=options: PreSpeculator(draft_model, **options))
        # Anything else is a request of a session that was closed meanwhile: it expects no answer.
