"""Engine: many concurrent requests decoded as one continuously batched, speculative batch.

A scheduler thread owns the models. Callers `submit` requests (checked at once, in their own
thread) into a bounded queue and get a handle back. Between rounds the scheduler

  1. admits waiting requests into free rows (engine/admission.py: cache-aware, with aging),
  2. prefills them, at most `prefill_chunk_tokens` prompt tokens a round (packed, each on top of
     its prefix-cache hit and its earlier chunks), so decoding rows wait for one chunk at most;
     a complete prompt's KV goes into the shared prefix cache and its row joins the live batch,
  3. runs one round over the live batch (decode/batched.py: a speculative round with ragged
     acceptance, or a plain batched step where the measured costs at this batch size say
     speculation loses), streaming each row's final tokens to its handle,
  4. lets finished, cancelled and failed rows leave (their KV into the prefix caches).

All requests share one generator's prefix caches (target and draft) and its measured step costs.
The method is settled per busy spell (a live batch from idle to idle), as a generate call settles
it: "saguaro" and "tree" serve the batch with batched chains; without a draft model (or with
method="prompt_lookup") rows draft by suffix decoding over everything the engine has seen
(draft/suffix.py).
A row's own failure fails its request alone; an error no row owns (a forward failing) fails the
requests in the batch at that moment, and the engine serves on with a fresh batch.

`AsyncEngine` is the same engine with awaitable handles, for asyncio servers: the scheduler thread
hands each event (final tokens, the end) to the handle's event loop with `call_soon_threadsafe`,
into an `asyncio.Queue` and a future, so awaiting never polls and never blocks the loop.
"""

from __future__ import annotations

import asyncio
import functools
import numbers
import threading
import time

import torch

from saguaro import distributed
from saguaro.config import Method, Options
from saguaro.decode.batched import LiveBatch
from saguaro.decode.batched_drafters import BatchedModelDrafter, PerRowDrafters
from saguaro.decode.sampling import SamplingConfig, TokenSampler
from saguaro.draft.suffix import SuffixDrafter, SuffixIndex
from saguaro.engine.admission import Admission
from saguaro.engine.errors import EngineClosed, QueueFull
from saguaro.engine.requests import EngineOutput, RequestHandle, build_sequence, finish_reason, prompt_tokens
from saguaro.generator.draft_side import DraftSide
from saguaro.generator.policy import MethodPolicy
from saguaro.generator.pool import RunnerPool
from saguaro.model import weights
from saguaro.model.batched_runner import BatchedRunner


def _check_count(name: str, value) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class Engine:
    """Serves requests on `target` (speculating with `draft_model`) as one continuous batch.

    `options` are `SpeculativeGenerator`'s (method="auto", prefix_cache_bytes, ...). At most
    `max_batch_size` requests decode at once, at most `max_queue` wait (more raise `QueueFull`).
    A context manager: leaving it, or `close()`, cancels what is left; `shutdown(timeout)` first
    lets the accepted requests finish for up to `timeout` seconds.
    """

    def __init__(
        self,
        target,
        draft_model=None,
        *,
        max_batch_size: int = 8,
        max_queue: int = 64,
        prefill_chunk_tokens: int = 256,
        **options,
    ):
        self.max_batch_size = _check_count("max_batch_size", max_batch_size)
        self.max_queue = _check_count("max_queue", max_queue)
        self.prefill_chunk_tokens = _check_count("prefill_chunk_tokens", prefill_chunk_tokens)
        self.target, self.draft_model = target, draft_model
        if distributed.tensor_parallel_target(target) is not None:
            raise ValueError(
                "Engine serves a target on one process; for a tensor-parallel target use "
                "SpeculativeGenerator (its ranks replay one request at a time)"
            )
        # A SpeculativeGenerator's parts (saguaro/generator/), shared by every request.
        self.options = Options.checked(target, draft_model, **options)
        self.policy = MethodPolicy(self.options, target, draft_model is not None, tensor_parallel=False)
        self.pool = RunnerPool(target, draft_model, self.options, tensor_parallel=False)
        self.drafts = DraftSide(draft_model, self.options, target.config.vocab_size)
        self._auto = options.get("method", "auto") == "auto"
        self.method: Method | None = None  # the live batch's, once one runs
        self._condition = threading.Condition()
        self._waiting: list[RequestHandle] = []
        self._closed = False  # no more submits
        self._deadline: float | None = None  # once shut down: when what is left is cancelled
        self._active: set[RequestHandle] = set()  # admitted, not finished
        self._counts = dict.fromkeys(
            (
                "finished",
                "failed",
                "cancelled",
                "prompt_tokens",
                "generated_tokens",
                "reused_prompt_tokens",
                "drafted",
                "accepted",
            ),
            0,
        )
        self._admission = Admission()
        # Every prompt and answer, for suffix decoding: alone (method "prompt_lookup"), or beside
        # the draft model, whose draft a long repeat's copy replaces.
        self.suffixes = SuffixIndex()
        self._thread = threading.Thread(target=self._serve, name="saguaro-engine", daemon=True)
        self._thread.start()

    # -- the callers' side --
    def submit(self, input_ids, attention_mask=None, **generate_kwargs) -> RequestHandle:
        """Queue a request (HF generate keywords: max_new_tokens, do_sample, temperature, top_k,
        top_p, eos_token_id, stop_strings with tokenizer, seed, logits_processor,
        stopping_criteria); returns its handle at once. Bad arguments raise ValueError here."""
        return self.submit_as(RequestHandle, input_ids, attention_mask, generate_kwargs)

    def submit_as(self, handle_type, input_ids, attention_mask, generate_kwargs: dict) -> RequestHandle:
        """`submit`, with a handle of `handle_type` (AsyncEngine's)."""
        ids, prompt = prompt_tokens(input_ids, attention_mask, self.target.config.vocab_size)
        handle = handle_type(ids, build_sequence(self.target, prompt, **generate_kwargs), self)
        with self._condition:
            if self._closed:
                raise EngineClosed("the engine is shut down and takes no more requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(
                    f"the engine's queue is full ({self.max_queue} requests waiting); retry later, or "
                    "raise max_queue"
                )
            self._waiting.append(handle)
            self._condition.notify()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        """End `handle`'s request: at once if it still waits, else before the next round."""
        with self._condition:
            if handle.done():
                return
            handle.cancel_requested = True
            waiting = handle in self._waiting
            if waiting:
                self._waiting.remove(handle)
            self._condition.notify()
        if waiting:
            self._finish(handle, cancelled=True)

    def metrics(self) -> dict:
        with self._condition:
            return {"queued": len(self._waiting), "running": len(self._active), **self._counts}

    def shutdown(self, timeout: float | None = None) -> None:
        """Take no more requests; let the accepted ones finish for up to `timeout` seconds (None:
        however long they take), then cancel the rest and stop."""
        with self._condition:
            self._closed = True
            deadline = time.perf_counter() + timeout if timeout is not None else float("inf")
            self._deadline = deadline if self._deadline is None else min(self._deadline, deadline)
            self._condition.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()
        self.drafts.close()

    def close(self) -> None:
        self.shutdown(0)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the scheduler thread --
    def _serve(self) -> None:
        batch: LiveBatch | None = None
        prefilling: list[RequestHandle] = []
        live: dict = {}  # a live row's Sequence -> its handle
        while True:
            with self._condition:
                while not (self._waiting or prefilling or live or self._closed):
                    self._condition.wait()
                now = time.perf_counter()
                if self._deadline is not None and now >= self._deadline:
                    for handle in [*prefilling, *live.values()]:
                        handle.cancel_requested = True
                    overdue, self._waiting = self._waiting, []
                else:
                    overdue = []
                    free = self.max_batch_size - len(live) - len(prefilling)
                    for handle in (
                        self._admission.choose(self._waiting, max(free, 0), now) if free > 0 else []
                    ):
                        self._waiting.remove(handle)
                        handle.sequence.stats.queue_seconds = now - handle.submitted
                        prefilling.append(handle)
                        self._active.add(handle)
                stop = self._closed and not (self._waiting or prefilling or live)
            for handle in overdue:
                self._finish(handle, cancelled=True)
            if stop:
                return
            try:
                batch = self._step(batch, prefilling, live)
            except Exception as error:  # no row owns it: the rows in the batch now fail
                for handle in [*prefilling, *live.values()]:
                    self._finish(handle, error=error)
                batch = None
                prefilling.clear()
                live.clear()

    def _step(self, batch: LiveBatch | None, prefilling: list[RequestHandle], live: dict) -> LiveBatch | None:
        for handle in [h for h in prefilling if h.cancel_requested]:
            prefilling.remove(handle)
            self._finish(handle, cancelled=True)
        if batch is None and prefilling:
            batch = self._new_batch(prefilling[0].sequence)
        if batch is None:
            return None
        if prefilling:
            for handle in prefilling:
                handle.sequence.stats.method = str(self.method)
            joined = batch.prefill([h.sequence for h in prefilling], self.prefill_chunk_tokens)
            for sequence in joined:
                handle = next(h for h in prefilling if h.sequence is sequence)
                prefilling.remove(handle)
                live[sequence] = handle
                self._admission.stored(sequence.prompt)
        self._leave(batch, live)
        if batch.rows:
            batch.round()
            self._leave(batch, live)
        return batch if batch.rows or prefilling else None

    def _leave(self, batch: LiveBatch, live: dict) -> None:
        going = {sequence for sequence, handle in live.items() if handle.cancel_requested}
        for sequence in batch.leave(going):
            handle = live.pop(sequence)
            if sequence.error is None:
                self._admission.stored(sequence.prompt + sequence.output())
            self._finish(handle, error=sequence.error, cancelled=sequence in going)

    def _new_batch(self, first) -> LiveBatch:
        """A live batch for a busy spell: the method is settled per spell, as per generate call."""
        policy, pool, drafts = self.policy, self.pool, self.drafts
        weights.observe(self.target)
        weights.observe(self.draft_model)
        target = pool.target()
        if policy.auto and self.draft_model is not None:
            policy.choose(target, drafts.prepare(first.prompt, target, policy.threads), first.sampler.greedy)
        # Saguaro's pre-speculation of every row's outcomes would multiply the drafter's work by the
        # batch, and a tree has no batched loop: both serve a batch with batched chains (as a
        # SpeculativeGenerator serves a batch).
        method = policy.method
        self.method = Method.SPECULATIVE if method in (Method.SAGUARO, Method.TREE) else method
        drafter = None
        if self.method is Method.SPECULATIVE:
            # Every row drafts with its own sampler, given as it joins; this default serves none.
            drafter = BatchedModelDrafter(
                drafts.prepare(first.prompt, target, policy.threads),
                TokenSampler(SamplingConfig()),
                self.target.config.vocab_size,
                pool.draft_prefixes,
                self.suffixes,
            )
        elif self.method in (Method.PROMPT_LOOKUP, Method.SUFFIX):
            # Suffix decoding: copies from the row's own sequence and from every other the engine saw.
            drafter = PerRowDrafters(functools.partial(SuffixDrafter, self.suffixes))
        lookaheads = policy.batch_lookaheads if policy.lookahead is not None and drafter else None
        # Suffix copies, weighed each round against the draft model's chains and a plain step.
        copies = (
            policy.copy_lookaheads if lookaheads is not None and self.method is Method.SPECULATIVE else None
        )
        depth = self.options.num_speculative_tokens
        # Rows keep joining: each one's draft prefill runs as it joins (from the draft's prefix cache)
        # where the model drafts at that size, or speculation would weigh a new prompt's whole
        # catch-up at every round.
        runner = BatchedRunner(target, pool.target_prefixes)
        return LiveBatch(runner, drafter, depth, lookaheads, eager_draft=True, copy_lookaheads=copies)

    def _finish(
        self, handle: RequestHandle, error: BaseException | None = None, cancelled: bool = False
    ) -> None:
        sequence = handle.sequence
        stats = sequence.stats
        new = sequence.output() if sequence.generated and error is None else []
        stats.new_tokens = len(new)
        if cancelled or error is None:
            stats.finish_reason = "cancelled" if cancelled else finish_reason(sequence)
        with self._condition:
            outcome = "failed" if error is not None else "cancelled" if cancelled else "finished"
            self._counts[outcome] += 1
            self._active.discard(handle)
            self._counts["prompt_tokens"] += stats.prompt_tokens
            self._counts["generated_tokens"] += stats.new_tokens
            self._counts["reused_prompt_tokens"] += stats.reused_prompt_tokens
            self._counts["drafted"] += stats.drafted
            self._counts["accepted"] += stats.accepted
        if self.policy.auto and error is None:
            self.policy.learn(stats)  # auto's acceptance estimate, for the next spell
        output = None
        if error is None:
            tail = torch.tensor([new], dtype=torch.long)
            output = EngineOutput(torch.cat([handle.ids.cpu(), tail], 1).to(handle.ids.device), stats)
        handle.finish(output, error)


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
