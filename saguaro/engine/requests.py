"""A request to the engine: its generation keywords checked and turned into a sampler and a stopping
rule (at submit, in the caller's thread, so bad arguments fail there and alone), and the handle
the caller holds: it streams the tokens that became final and gives the output once finished."""

from __future__ import annotations

import itertools
import numbers
import queue
import threading
import time
import weakref
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
)
from transformers.generation.stopping_criteria import StoppingCriteriaList, StopStringCriteria

from saguaro.decode.batched import Sequence
from saguaro.decode.engines import StopRule
from saguaro.decode.sampling import SamplingConfig, TokenSampler, sampling_warpers
from saguaro.decode.stats import GenerationStats
from saguaro.generator.requests import checked_max_new_tokens, eos_ids, prompt_rows, warn_past_positions

GENERATE_KEYWORDS = (
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "eos_token_id",
    "stop_strings",
    "tokenizer",
    "seed",
    "logits_processor",
    "stopping_criteria",
    "pad_token_id",  # one row: nothing to pad
)
DEFAULT_MAX_NEW_TOKENS = 64  # as saguaro.generate

_ids = itertools.count(1)


@dataclass
class RequestStats(GenerationStats):
    """A request's `GenerationStats` (prefill, rounds, drafted and accepted tokens; total_seconds
    runs from its prefill to its end) and how it was served."""

    queue_seconds: float = 0.0  # from submit until its prefill began
    first_token_seconds: float | None = None  # from submit until its first token was final
    finish_reason: str = ""  # "stop" (EOS, a stop string or criterion), "length" or "cancelled"

    @property
    def acceptance(self) -> float:
        return self.acceptance_rate


@dataclass
class EngineOutput:
    sequences: torch.LongTensor  # [1, prompt + new], like HF generate()
    stats: RequestStats


def prompt_tokens(input_ids, attention_mask, vocab_size: int) -> tuple[torch.Tensor, list[int]]:
    """input_ids ([1, n], [n] or a list of ints; left padding per `attention_mask`) -> (ids [1, n],
    the prompt's tokens); ValueError if it is not one prompt of the target's vocabulary."""
    try:
        ids, rows, _ = prompt_rows(input_ids, attention_mask, vocab_size)
    except (TypeError, RuntimeError) as error:  # a dtype or a value torch cannot take
        raise ValueError(f"input_ids: {error}") from error
    if len(rows) != 1:
        raise ValueError(
            f"input_ids must be one prompt, [1, n], got {len(rows)} rows: submit each as its own request "
            "(the engine batches them)"
        )
    return ids, rows[0]


_stop_criteria: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {strings: criteria}
_stop_criteria_lock = threading.Lock()
STOP_CRITERIA_KEPT = 64  # per tokenizer


def stop_string_criteria(tokenizer, stop_strings) -> StopStringCriteria:
    """HF's StopStringCriteria, built once per tokenizer and stop strings: building one walks the
    whole vocabulary (0.3-0.7 s for Qwen2.5's, in the submitting thread: a server's event loop),
    and a built one keeps no state between calls, so requests share it."""
    key = (stop_strings,) if isinstance(stop_strings, str) else tuple(stop_strings)
    with _stop_criteria_lock:
        built = _stop_criteria.setdefault(tokenizer, {})
        if key not in built:
            if len(built) >= STOP_CRITERIA_KEPT:
                del built[next(iter(built))]
            built[key] = StopStringCriteria(tokenizer, list(key))
        return built[key]


def build_sequence(target, prompt: list[int], **kwargs) -> Sequence:
    """The row a request decodes as: its sampler and stopping rule from HF generate keywords."""
    unknown = sorted(set(kwargs) - set(GENERATE_KEYWORDS))
    if unknown:
        raise ValueError(
            f"unsupported generation keyword(s) {', '.join(unknown)}; the engine takes "
            f"{', '.join(GENERATE_KEYWORDS)}"
        )
    max_new_tokens = checked_max_new_tokens(kwargs.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
    warn_past_positions(target, len(prompt), max_new_tokens)
    sampling = SamplingConfig(
        bool(kwargs.get("do_sample", False)),
        kwargs.get("temperature", 1.0),
        kwargs.get("top_k"),
        kwargs.get("top_p"),
    )
    seed = kwargs.get("seed")
    generator = None
    if seed is not None:
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise ValueError(f"seed must be an int, got {seed!r}")
        generator = torch.Generator().manual_seed(int(seed))
    processors = kwargs.get("logits_processor")
    if processors:
        # HF applies the caller's processors, then the sampling warpers.
        processors = LogitsProcessorList([*processors, *sampling_warpers(sampling)])
    sampler = TokenSampler(sampling, generator, processors or None)
    criteria = StoppingCriteriaList(kwargs.get("stopping_criteria") or [])
    stop_strings = kwargs.get("stop_strings")
    if stop_strings:
        if kwargs.get("tokenizer") is None:
            raise ValueError("stop_strings needs tokenizer= (the target's tokenizer), as HF generate does")
        criteria.append(stop_string_criteria(kwargs["tokenizer"], stop_strings))
    stop = StopRule(max_new_tokens, eos_ids(kwargs.get("eos_token_id"), target), criteria or None, prompt)
    stats = RequestStats(method="engine", prompt_tokens=len(prompt))
    return Sequence(prompt, sampler, stop, stats)


def finish_reason(sequence: Sequence) -> str:
    """ "stop" where EOS, a stop string or a stopping criterion ended the output, else "length"."""
    new, stop = sequence.output(), sequence.stop
    if len(new) < stop.max_new_tokens:
        return "stop"
    ended = new[-1] in stop.eos_token_ids or (
        stop.criteria is not None and bool(stop.criteria(torch.tensor([stop.history + new]), None).any())
    )
    return "stop" if ended else "length"


class RequestHandle:
    """What `Engine.submit` returns. Iterate it for the new token ids as they become final (lists
    of ints), or call `result()` for the output; `cancel()` ends the request early (its output
    then holds what was final by then). Thread-safe."""

    def __init__(self, ids: torch.Tensor, sequence: Sequence, engine):
        self.id = next(_ids)
        self.ids = ids
        self.sequence = sequence
        self.submitted = time.perf_counter()
        self.cancel_requested = False
        self._engine = engine
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._finished = threading.Event()
        self._output: EngineOutput | None = None
        self._error: BaseException | None = None
        sequence.stop.streamer = self  # StopRule.stream puts the tokens that became final here

    @property
    def prompt(self) -> list[int]:
        return self.sequence.prompt

    # -- the engine's side (its scheduler thread) --
    def put(self, tokens: torch.Tensor) -> None:
        if self.sequence.stats.first_token_seconds is None:
            self.sequence.stats.first_token_seconds = time.perf_counter() - self.submitted
        self._deliver(tokens.tolist())

    def finish(self, output: EngineOutput | None, error: BaseException | None = None) -> None:
        self._output, self._error = output, error
        self._finished.set()
        self._deliver(None)

    def _deliver(self, item) -> None:
        self._events.put(item)

    # -- the caller's side --
    def __iter__(self):
        while True:
            item = self._events.get()
            if item is None:
                if self._error is not None:
                    raise self._error
                return
            yield item

    def result(self, timeout: float | None = None) -> EngineOutput:
        if not self._finished.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._output

    def cancel(self) -> None:
        self._engine.cancel(self)

    def done(self) -> bool:
        return self._finished.is_set()
