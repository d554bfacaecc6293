"""Cheap drafts: the draft model the drafters run, prepared once per draft, target and options.

A draft only has to be a good guess. Verification against the target keeps the output exact
whatever distribution q the drafts come from, as long as each draft token is drawn from the q
verification divides by, and the drafter hands verification exactly the q its tokens were drawn
from. So the draft can be made cheap without weakening the guarantee; only acceptance may drop.

`prepare_draft` is what `SpeculativeGenerator` calls, with the `draft_quantization` and
`draft_vocab_size` options (checked by draft/options.py). An explicit value builds that variant
(`compress_draft`: a reduced vocabulary, draft/vocabulary.py, then weight-only int8 / int4,
draft/quantize.py); "auto" chooses among them by measurement (draft/choice.py). A prepared draft
is shared by every generator of the same pair, and auto's choice is kept on disk.
"""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import asdict, replace

from torch import nn

from saguaro.draft.choice import DraftConfiguration, auto_candidates, choose_draft_configuration
from saguaro.draft.options import check_draft_options
from saguaro.draft.quantize import compress_draft, dense_crossover_of
from saguaro.model import disk_cache, weights


def prepare_draft(
    draft: nn.Module,
    target: nn.Module,
    quantization="auto",
    vocab_size="auto",
    sample_ids: list[int] | None = None,
    threads: int | None = None,
    lookahead: int = 4,
    target_threads: int | None = None,
) -> tuple[nn.Module, DraftConfiguration]:
    """The draft model the drafters should run, and its record.

    Explicit values build that variant (or raise: DraftCompressionUnavailable when this platform
    cannot run it). "auto" measures the candidates on `sample_ids` against `target` through
    `choose_draft_configuration` (the draft with `threads` threads, rounds of `lookahead` drafts),
    among the variants `choice.auto_candidates` finds worth measuring. Under auto a quantization
    that fails falls back to the plain draft with a warning.

    Prepared once per (draft, target, options) for as long as the draft lives, and shared by every
    generator (saguaro.generate builds one per call); auto's choice is also kept on disk
    (model/disk_cache.py), so another process builds the chosen variant without measuring. When the
    draft's weights move (weights.observe), the same variant is built again from the new weights.
    """
    options = (quantization, vocab_size, threads, lookahead, target_threads)
    prepared = _PREPARED.setdefault(draft, {})

    def forget(dead_target, prepared=prepared):  # a variant measured for a target that is gone
        for stale in [k for k in prepared if k[0] is dead_target]:
            del prepared[stale]

    key = (weakref.ref(weights.source_of(target), forget), *options)
    epoch = weights.epoch(draft)
    if key in prepared:
        model, record, built_at = prepared[key]
        if built_at == epoch:
            return model or draft, replace(record, reused=True)
        del prepared[key], model  # freed before its successor is built
        start = time.perf_counter()
        model = compress_draft(
            draft, record.quantization, record.vocab_size, dense_from_rows=record.dense_from_rows
        )
        record = replace(record, setup_seconds=time.perf_counter() - start, reused=False)
    else:
        start = time.perf_counter()
        model, record = _prepare(draft, target, *options, sample_ids)
        record.setup_seconds = time.perf_counter() - start
        record.threads = threads
        record.dense_from_rows = dense_crossover_of(model)
    # None for the draft itself: a value holding its key would keep the entry alive forever.
    prepared[key] = (None if model is draft else model, record, epoch)
    return model, record


# Prepared drafts per user draft, for as long as it lives: saguaro.generate() builds a generator per
# call, and neither auto's measurement nor a quantization (seconds each on a real draft) should be
# paid again for the same pair and options.
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _prepare(draft, target, quantization, vocab_size, threads, lookahead, target_threads, sample_ids):
    check_draft_options(quantization, vocab_size, draft)
    quantizations, vocab_sizes, note = auto_candidates(draft, quantization, vocab_size)
    chosen_by = "auto" if "auto" in (quantization, vocab_size) else "explicit"
    if len(quantizations) * len(vocab_sizes) == 1:
        variant = quantizations[0], vocab_sizes[0]
        return compress_draft(draft, *variant), DraftConfiguration(*variant, chosen_by, note=note)
    # Auto's choice for this pair, machine and threads, if an earlier process measured it.
    entry = disk_cache.key(
        "draft",
        disk_cache.model_key(draft),
        disk_cache.model_key(target),
        quantizations,
        vocab_sizes,
        threads,
        lookahead,
        target_threads,
    )
    stored = disk_cache.load("draft", entry)
    if stored is not None:
        record = DraftConfiguration(**stored)
        record.from_disk = True
        crossover = math.inf if record.dense_from_rows is None else record.dense_from_rows
        return compress_draft(
            draft, record.quantization, record.vocab_size, dense_from_rows=crossover
        ), record
    # Under auto the baseline variant is unquantized; quantized variants that fail are skipped there.
    model, record = choose_draft_configuration(
        draft,
        target,
        sample_ids or [],
        threads,
        lookahead,
        quantizations,
        vocab_sizes,
        concurrent=target_threads is not None,
        target_threads=target_threads,
    )
    record.note = note
    record.threads, record.dense_from_rows = threads, dense_crossover_of(model)
    disk_cache.store("draft", entry, asdict(record))
    return model, record
