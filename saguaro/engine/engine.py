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
"""

from __future__ import annotations

import functools
import numbers
import threading
import time

import torch

from saguaro.api import SpeculativeGenerator
from saguaro.config import Method
from saguaro.decode.batched import LiveBatch
from saguaro.decode.batched_drafters import BatchedModelDrafter, PerRowDrafters
from saguaro.decode.sampling import SamplingConfig, TokenSampler
from saguaro.draft.suffix import SuffixDrafter, SuffixIndex
from saguaro.engine.admission import Admission
from saguaro.engine.requests import EngineOutput, RequestHandle, build_sequence, finish_reason, prompt_tokens
from saguaro.model import weights
from saguaro.model.batched_runner import BatchedRunner


class QueueFull(RuntimeError):
    """The engine's queue of waiting requests is full: retry later."""


class EngineClosed(RuntimeError):
    """The engine was shut down and takes no more requests."""


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
        self.generator = SpeculativeGenerator(target, draft_model, **options)
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
        self.generator.close()

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
        policy, pool, drafts = self.generator.policy, self.generator.pool, self.generator.drafts
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
        elif self.method is Method.PROMPT_LOOKUP:
            # Suffix decoding: copies from the row's own sequence and from every other the engine saw.
            drafter = PerRowDrafters(functools.partial(SuffixDrafter, self.suffixes))
        lookaheads = policy.batch_lookaheads if policy.lookahead is not None and drafter else None
        depth = self.generator.options.num_speculative_tokens
        # Rows keep joining: each one's draft prefill runs as it joins (from the draft's prefix cache),
        # or speculation would weigh a new prompt's whole catch-up at every round.
        runner = BatchedRunner(target, pool.target_prefixes)
        return LiveBatch(runner, drafter, depth, lookaheads, eager_draft=True)

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
        if self.generator.policy.auto and error is None:
            self.generator.policy.learn(stats)  # auto's acceptance estimate, for the next spell
        output = None
        if error is None:
            tail = torch.tensor([new], dtype=torch.long)
            output = EngineOutput(torch.cat([handle.ids.cpu(), tail], 1).to(handle.ids.device), stats)
        handle.finish(output, error)
