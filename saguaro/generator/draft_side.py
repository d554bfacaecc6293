"""The draft side of a generator: the draft the drafters run (quantized / reduced vocabulary,
shared per model pair), and for method="saguaro" the drafter worker's lifetime: started on the
first call, restarted when the draft's weights move or after a failure, stopped by close() or
when its owner is garbage collected or the interpreter exits - never left behind."""

from __future__ import annotations

import weakref
from dataclasses import replace
from typing import TYPE_CHECKING

from saguaro.config import Options
from saguaro.draft.compression import DraftConfiguration, prepare_draft
from saguaro.faults import WorkerFailed, logger, warn
from saguaro.model import weights
from saguaro.model.placement import ThreadSplit

if TYPE_CHECKING:
    from saguaro.ssd.worker import DraftWorker


class DraftSide:
    def __init__(self, draft_model, options: Options, target_vocab_size: int):
        self.model = draft_model
        self.options = options
        self.draft = None  # the prepared draft, built on the first call that drafts
        self.configuration: DraftConfiguration | None = None
        self._worker: DraftWorker | None = None
        self._worker_draft = None  # (the draft it runs, the weight epoch it forked at)
        self._finalizer = None
        self._warned_worker_failure = False
        self._speculator_kwargs = dict(
            lookahead=options.num_speculative_tokens,
            budget=options.saguaro_budget,
            vocab_size=target_vocab_size,
            reshape_c=options.saguaro_reshape,
            prefix_cache_bytes=options.prefix_budget,
        )

    @property
    def worker(self) -> DraftWorker | None:
        """The running worker, if any."""
        return self._worker

    def prepare(self, sample: list[int], target, threads: ThreadSplit):
        """The draft the drafters run, shared with every generator of the same pair and options
        (draft.compression.prepare_draft): measured once, rebuilt when the draft's weights move."""
        # One choice per pair and options, whatever the method, measured on the caller's threads:
        # a variant's step cost against another's is alike on a worker's thread, and auto's method
        # may move between calls, which must not measure the draft again (~20 s on the demo pair).
        self.draft, record = prepare_draft(
            self.model,
            target,
            self.options.draft_quantization,
            self.options.draft_vocab_size,
            sample,
            None,
            self.options.num_speculative_tokens,
        )
        # The threads it drafts on: a CPU Saguaro worker's own, else the caller's.
        self.configuration = replace(record, threads=threads.drafter or None)
        return self.draft

    def start_worker(self, threads: ThreadSplit) -> DraftWorker:
        """The worker, started on the first call; a failed one is restarted here (with backoff)."""
        if self._worker is not None and self._worker_draft != (self.draft, weights.epoch(self.model)):
            # The draft's weights moved (the worker computes with a copy of the old ones) or its
            # prepared variant was rebuilt: a new worker, with empty caches, on the new draft.
            logger.info("saguaro: the draft's weights changed; restarting the drafter worker")
            self.close()
        if self._worker is None:
            # Only method="saguaro" runs a worker: its process machinery loads with the first one.
            from saguaro.ssd.worker import DraftWorker

            self._worker_draft = (self.draft, weights.epoch(self.model))
            self._worker = DraftWorker(
                self.draft,
                self.options.placement,
                self.options.worker_timeout,
                threads=threads.drafter or 1,
                **self._speculator_kwargs,
            )
            self._finalizer = weakref.finalize(self, self._worker.close)
        elif self._worker.heal():
            logger.info("saguaro: drafter worker restarted (restart %d)", self._worker.restarts)
        return self._worker

    def draft_inline(self, error: BaseException | None = None) -> DraftWorker:
        """After a worker failure: the same handle drafts inline for the rest of the call and
        restarts the worker on a later one. The first failure warns (with the worker's
        traceback), later ones are logged; under strict=True `error` is re-raised."""
        if self.options.strict:
            raise error if error is not None else WorkerFailed("the drafter worker failed")
        cause = f" ({type(error).__name__}: {error})" if error is not None else ""
        message = (
            f"saguaro: the {self.options.placement} drafter worker failed{cause}; drafting inline for the "
            "rest of this call (output stays exact), a new worker starts on a later call. Pass strict=True "
            "to raise"
        )
        if getattr(error, "remote_traceback", None):
            message += "\nin the worker:\n" + error.remote_traceback
        if self._warned_worker_failure:
            logger.warning(message)
        else:
            self._warned_worker_failure = True
            warn(message, stacklevel=3)
        return self._worker

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._worker = self._finalizer = None

    def __getstate__(self) -> dict:
        # A copy (deepcopy, pickle) must not share the live worker or its finalizer: it starts a
        # worker of its own on its first call (warned afresh if it fails).
        state = dict(vars(self))
        state.update(_worker=None, _finalizer=None, _warned_worker_failure=False, _worker_draft=None)
        return state
