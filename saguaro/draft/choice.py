"""Auto's choice of a draft variant, by measurement (draft_quantization / draft_vocab_size "auto").

`choose_draft_configuration` weighs the variants by the expected tokens/s of a round: the cost of
a few one-token draft steps per variant, each variant's teacher-forced top-1 agreement with the
plain draft (the share of the plain draft's acceptance it keeps), and the target's verify cost.
Variants are estimated from slices of the draft's linears first; only the most promising are
built and measured as they will run. `DraftConfiguration` records the variant the drafters run
and, under auto, why.
"""

from __future__ import annotations

import importlib.util
import logging
import statistics
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from saguaro.draft.quantize import (
    DraftCompressionUnavailable,
    build_cpu_quantized,
    compress_draft,
    cpu_quantized,
    fastest_of,
    streaming_slice,
)
from saguaro.draft.quantized_linear import INT4_GROUP_SIZE, QUANTIZATIONS
from saguaro.draft.vocabulary import default_draft_vocabulary, text_config
from saguaro.model import weights
from saguaro.model.runner import ModelRunner
from saguaro.tune.cost_model import PRIOR_HIT_RATE, expected_tokens

AUTO_VOCAB_SIZE = 32768
# Weight-only quantization saves the bytes streamed from memory per token. A draft whose linear
# weights fit in a CPU's last-level cache streams nothing to save, so auto does not try it there.
AUTO_MIN_WEIGHT_BYTES = 64 * 2**20
AUTO_MIN_GAIN = 0.10
AUTO_STEPS = 4
AUTO_CONTEXT = 64
# Variants built and measured while choosing, best estimate first (each costs a quantization).
MAX_BUILDS = 2
# Top-1 agreement with the plain draft assumed for a quantization until its variant is measured:
# per-channel int8 is all but lossless; int4 groups of 128 keep most top-1 choices.
PRIOR_AGREEMENT = {None: 1.0, "int8": 0.99, "int4": 0.95}

logger = logging.getLogger("saguaro")


@dataclass
class DraftConfiguration:
    """What the drafters run: the draft's quantization and vocabulary, and why."""

    quantization: str | None = None
    vocab_size: int | None = None  # kept token ids; None = the draft's whole vocabulary
    chosen_by: str = "explicit"  # or "auto"
    # Per measured variant ("none/full", "int8/32768", ...): median seconds of a one-token draft
    # step, and teacher-forced top-1 agreement with the plain draft.
    step_seconds: dict[str, float] = field(default_factory=dict)
    agreement: dict[str, float] = field(default_factory=dict)
    # Under auto: the target's cost of verifying a round, the plain draft's top-1 agreement with the
    # target (its acceptance estimate), and the chosen variant's estimated tokens/s over the baseline's.
    verify_seconds: float = 0.0
    target_agreement: float = 0.0
    estimated_gain: float = 1.0
    note: str = ""
    setup_seconds: float = 0.0  # building (and under auto, measuring) the variants
    reused: bool = False  # prepared for an earlier generator of the same draft, target and options
    threads: int | None = None  # the torch threads the drafter runs with (None: the caller's)
    # Quantized variants: rows from which the float weights multiply (measure_dense_crossover).
    dense_from_rows: float | None = None
    from_disk: bool = False  # the choice was read from the on-disk measurement cache

    @property
    def label(self) -> str:
        return variant_label(self.quantization, self.vocab_size)


def variant_label(quantization: str | None, vocab_size: int | None) -> str:
    return f"{quantization or 'none'}/{vocab_size or 'full'}"


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    logger.warning(message)


def auto_candidates(draft: nn.Module, quantization, vocab_size) -> tuple[list, list, str]:
    """The quantizations and vocabulary sizes to consider for these options ("auto": the ones worth
    measuring for this draft), and why any quantization was left out: quantization None / int8 /
    int4 where the draft is large enough for weight traffic to matter, vocabulary full /
    AUTO_VOCAB_SIZE ids where the vocabulary is at least twice that."""
    quantizations, note = [quantization], ""
    if quantization == "auto":
        quantizations, note = _auto_quantizations(draft)
    vocab_sizes = [vocab_size]
    if vocab_size == "auto":
        vocab = text_config(draft).vocab_size
        vocab_sizes = [None, AUTO_VOCAB_SIZE] if vocab >= 2 * AUTO_VOCAB_SIZE else [None]
    return quantizations, vocab_sizes, note


def _weight_bytes(model: nn.Module) -> int:
    return sum(
        m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear)
    )


def _auto_quantizations(draft: nn.Module) -> tuple[list, str]:
    """The quantizations worth measuring for this draft, and why any were left out."""
    device = next(draft.parameters()).device
    if _weight_bytes(draft) < AUTO_MIN_WEIGHT_BYTES:
        return [None], "linear weights too small to be limited by memory traffic: not quantized"
    if device.type == "cuda":
        if importlib.util.find_spec("torchao") is None:
            note = "draft_quantization='auto' on CUDA needs torchao (pip install torchao): not quantized"
            _warn(note)
            return [None], note
    elif device.type != "cpu":
        return [None], f"no weight-only kernels for a draft on {device.type}: not quantized"
    return [None, *QUANTIZATIONS], ""


def _measure(model, sample: list[int], steps: int, continuation: list[int] | None = None):
    """Teacher-forced top-1 predictions over `sample` and `steps` one-token steps, the tokens fed in
    those steps (`continuation`, or the model's own greedy choices), and a step's median seconds."""
    runner = ModelRunner(model, len(sample) + steps)
    predictions = runner.forward(sample).argmax(-1).tolist()
    fed, seconds = [], []
    for step in range(steps):
        token = continuation[step] if continuation is not None else predictions[-1]
        start = time.perf_counter()
        predictions.append(int(runner.forward([token])[-1].argmax()))  # int(): waits for the device
        seconds.append(time.perf_counter() - start)
        fed.append(token)
    return predictions, fed, statistics.median(seconds[1:])  # the first step warms up


def _measure_target(target, sample: list[int], continuation: list[int], lookahead: int, repeats: int = 3):
    """The target's top-1 predictions over `sample` and the median seconds of verifying
    `lookahead` drafts (a forward over lookahead + 1 tokens) after it."""
    runner = ModelRunner(target, len(sample) + lookahead + 1)
    predictions = runner.forward(sample).argmax(-1).tolist()
    block = (continuation * (lookahead + 1))[: lookahead + 1]
    seconds = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        int(runner.forward(block)[-1].argmax())  # int(): waits for the device
        seconds.append(time.perf_counter() - start)
        runner.rollback(len(sample))
    return predictions, statistics.median(seconds[1:])


def variant_score(
    acceptance: float, step_seconds: float, verify_seconds: float, lookahead: int, concurrent: bool
) -> float:
    """Expected tokens per second of a round drafting `lookahead` tokens (choose_draft_configuration):
    the target waits for every draft step of a serial drafter, for a concurrent one's only after
    a miss."""
    serial = 1 - PRIOR_HIT_RATE if concurrent else 1.0
    return expected_tokens([acceptance] * lookahead, lookahead) / (
        verify_seconds + serial * lookahead * step_seconds
    )


def choose_draft_configuration(
    draft: nn.Module,
    target: nn.Module,
    sample_ids: list[int],
    threads: int | None = None,
    lookahead: int = 4,
    quantizations=(None, *QUANTIZATIONS),
    vocab_sizes=(None, AUTO_VOCAB_SIZE),
    steps: int = AUTO_STEPS,
    min_gain: float = AUTO_MIN_GAIN,
    concurrent: bool = False,
    target_threads: int | None = None,
) -> tuple[nn.Module, DraftConfiguration]:
    """Choose the best (quantization, vocabulary size) variant by measurement, building at most
    MAX_BUILDS of them, and return it with its record.

    On the last AUTO_CONTEXT tokens of `sample_ids`: the target's cost of verifying `lookahead`
    drafts (with the calling thread count) and its top-1 agreement with the plain draft, the
    plain draft's acceptance estimate a; the plain draft's step cost and its teacher-forced top-1
    predictions over the sample and `steps` one-token steps, with `threads` threads. Each variant's
    step cost d and agreement r with the plain draft are then estimated without building it
    (`_estimated_variants`: its linears timed on a slice of the model, the kept vocabulary's share
    of the plain draft's predictions, a prior for quantization), so its acceptance is about a * r
    and its score the expected tokens per second of a round, expected_tokens(a * r) / (verify +
    lookahead * d). Quantizing a whole draft takes seconds, so only the best-scoring variants are
    built, best first, and measured as they will run (the same steps, teacher-forced on the plain
    draft's continuation); the first whose measured score beats the baseline (the first variant)
    by more than `min_gain` wins, else the baseline does. A `concurrent` drafter (Saguaro's worker,
    the target on `target_threads`) drafts while the target verifies, and its pre-speculation
    sizes its branches to fit the verification (ssd/prespeculation.py): a slower step costs a few
    branches, and in full only the serial backup after a miss, so its round lasts verify +
    (1 - h) * lookahead * d at the prior hit rate h (cost_model.PRIOR_HIT_RATE), and agreement weighs
    more than step cost. A variant that cannot be built on this platform is skipped with a warning
    (the baseline is not: its error is raised).
    """
    sample = [int(t) for t in sample_ids][-AUTO_CONTEXT:]
    if not sample:
        raise ValueError("choosing a draft configuration needs at least one sample token")
    previous_threads = torch.get_num_threads()
    record = DraftConfiguration(chosen_by="auto")
    try:
        torch.set_num_threads(threads or previous_threads)
        reference, continuation, plain_seconds = _measure(draft, sample, steps)
        torch.set_num_threads(target_threads or previous_threads)
        target_predictions, record.verify_seconds = _measure_target(target, sample, continuation, lookahead)
        # Laplace's rule: a short sample neither promises nor rules out acceptance.
        matches = sum(a == b for a, b in zip(reference, target_predictions))
        record.target_agreement = (matches + 1) / (len(sample) + 2)
        torch.set_num_threads(threads or previous_threads)
        variants = [(q, v) for q in quantizations for v in vocab_sizes]
        held: list = []  # quantized slices, until the chosen variant is built on them
        estimates = _estimated_variants(draft, variants, reference, plain_seconds, held)

        def score(variant) -> float:
            seconds, agreement = estimates[variant]
            acceptance = record.target_agreement * agreement
            return variant_score(acceptance, seconds, record.verify_seconds, lookahead, concurrent)

        baseline, *others = [variant for variant in variants if variant in estimates]
        bar = (1 + min_gain) * score(baseline)
        choice, model = baseline, None
        for variant in sorted(others, key=score, reverse=True)[:MAX_BUILDS]:
            if score(variant) <= bar:
                break
            try:
                candidate = compress_draft(draft, *variant)
            except DraftCompressionUnavailable as error:
                _warn(f"draft variant {variant_label(*variant)} skipped: {error}")
                continue
            predictions, _, seconds = _measure(candidate, sample, steps, continuation)
            estimates[variant] = seconds, sum(a == b for a, b in zip(predictions, reference)) / len(reference)
            if score(variant) > bar:
                choice, model = variant, candidate
                break
            del candidate  # measured and not chosen: freed before the next one is built
        if model is None:
            model = compress_draft(draft, *baseline)
        for variant, (seconds, agreement) in estimates.items():
            record.step_seconds[variant_label(*variant)] = seconds
            record.agreement[variant_label(*variant)] = agreement
        record.estimated_gain = score(choice) / score(baseline)
    finally:
        torch.set_num_threads(previous_threads)
    record.quantization, record.vocab_size = choice
    return model, record


def _estimated_variants(
    draft: nn.Module, variants: list[tuple], reference: list[int], plain_seconds: float, held: list
) -> dict[tuple, tuple[float, float]]:
    """(step seconds, agreement with the plain draft) per variant, estimated without building it.

    Step: the plain step with its linears' cost replaced by the variant's. On CPU those are timed
    at one row: a slice of the body's linears (COST_SLICE_BYTES of them, several times a CPU's
    last-level cache, so they stream from memory as in a forward; scaled to the whole body), and
    the LM head at the kept vocabulary's rows (a quantized head timed on at most AUTO_VOCAB_SIZE
    rows and scaled). Elsewhere (torchao on CUDA) a step is taken to scale with its weight bytes.
    Agreement: the share of the plain draft's predictions the kept vocabulary holds, times
    PRIOR_AGREEMENT for the quantization (measured for real once a variant is built).
    """
    head = draft.get_output_embeddings() if hasattr(draft, "get_output_embeddings") else None
    head = head if isinstance(head, nn.Linear) else None
    body = [m for m in draft.modules() if isinstance(m, nn.Linear) and m is not head]
    kept_rows = {v: head.out_features if v is None or head is None else v for _, v in variants}
    on_cpu = next(draft.parameters()).device.type == "cpu"
    if on_cpu:
        costs = _timed_linears(body, head, variants, kept_rows, weights.epoch(draft), held)
    else:
        costs = _linear_bytes(body, head, variants)
    plain = costs[(None, None)]
    estimates = {}
    for quantization, vocab in variants:
        if isinstance(costs[(quantization, vocab)], DraftCompressionUnavailable):
            if (quantization, vocab) == variants[0]:
                raise costs[(quantization, vocab)]  # the baseline: nothing to fall back to
            _warn(
                f"draft variant {variant_label(quantization, vocab)} skipped: {costs[(quantization, vocab)]}"
            )
            continue
        kept = set(default_draft_vocabulary(draft, vocab).tolist()) if vocab is not None else None
        covered = sum(kept is None or token in kept for token in reference) / len(reference)
        if on_cpu:  # linear seconds swapped in, the rest of the step (attention, norms, Python) kept
            seconds = max(plain_seconds - plain, 0.0) + costs[(quantization, vocab)]
        else:
            seconds = plain_seconds * costs[(quantization, vocab)] / plain
        estimates[(quantization, vocab)] = seconds, PRIOR_AGREEMENT[quantization] * covered
    return estimates


def _linear_bytes(body: list[nn.Linear], head: nn.Linear | None, variants) -> dict[tuple, float]:
    """Bytes a one-token step streams through the linears, per variant (and the plain draft's)."""
    per_weight = {None: 1.0, "int8": 0.5, "int4": 0.25}
    body_bytes = sum(m.weight.nbytes for m in body)
    costs = {}
    for quantization, vocab in {(None, None), *variants}:
        rows = head.out_features if head is None or vocab is None else vocab
        head_bytes = 0 if head is None else head.weight.nbytes * rows / head.out_features
        costs[(quantization, vocab)] = per_weight[quantization] * (body_bytes + head_bytes)
    return costs


def _timed_linears(
    body: list[nn.Linear], head: nn.Linear | None, variants, kept_rows, epoch: int, held: list
) -> dict[tuple, float | DraftCompressionUnavailable]:
    """Seconds of one row through the draft's linears, per variant (and the plain draft's), timed
    on slices (see _estimated_variants): quantizing a slice takes a fraction of the whole. The
    quantized slices go to `held`, so that building the chosen variant reuses them. A variant
    this platform cannot run gets its error instead."""
    sliced = streaming_slice(body)
    scale = sum(m.weight.nbytes for m in body) / max(sum(m.weight.nbytes for m in sliced), 1)
    dtype = (head or body[0]).weight.dtype

    def seconds(modules) -> float:
        rows = {m.in_features: torch.randn(1, m.in_features, dtype=dtype) for m in modules}
        return fastest_of(lambda: [m(rows[m.in_features]) for m in modules], repeats=3)

    def head_rows(rows: int) -> nn.Linear:
        with torch.device("meta"):
            part = nn.Linear(head.in_features, rows, bias=False)
        part.weight = nn.Parameter(head.weight.detach()[:rows], requires_grad=False)
        return part

    body_cost, head_cost, costs = {}, {}, {}
    for quantization, vocab in dict.fromkeys([(None, None), *variants]):
        rows = kept_rows[vocab] if head is not None else 0
        try:
            if quantization not in body_cost:
                modules = [
                    cpu_quantized(m, quantization, INT4_GROUP_SIZE, epoch) if quantization else m
                    for m in sliced
                ]
                body_cost[quantization] = seconds(modules) * scale
                held += modules
            if head is not None and (quantization, rows) not in head_cost:
                timed_rows = rows if quantization is None else min(rows, AUTO_VOCAB_SIZE)
                part = head_rows(timed_rows)
                if quantization:
                    part = build_cpu_quantized(part, quantization, INT4_GROUP_SIZE)
                head_cost[(quantization, rows)] = seconds([part]) * rows / timed_rows
        except DraftCompressionUnavailable as error:  # this platform cannot run the variant
            costs[(quantization, vocab)] = error
            continue
        costs[(quantization, vocab)] = body_cost[quantization] + head_cost.get((quantization, rows), 0.0)
    return costs
