"""The library's options, checked once: `Options.checked` turns what a caller passed to
`SpeculativeGenerator`, `saguaro.generate`, `enable` or `Engine` into one validated, frozen record,
or raises an error that says what to pass instead.

`Method`, `Placement` and `Schedule` are `str` enums, so the strings users pass ("saguaro", ...)
compare equal to their members and keep working everywhere.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace
from enum import Enum

import torch

from saguaro import distributed
from saguaro.draft.options import check_draft_options
from saguaro.model.compiled_runner import STATIC_CAPACITY, check_compilable, check_static_capacity
from saguaro.model.prefix_cache import DEFAULT_MAX_BYTES, check_max_bytes
from saguaro.model.tree import DynamicTree


class _Choice(str, Enum):
    """A member prints as its value: messages and stats show "saguaro", not "Method.SAGUARO"."""

    def __str__(self) -> str:
        return self.value

    def __hash__(self) -> int:  # as its string's, so a dict keyed by members finds "saguaro" too
        return hash(self.value)

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, value, option: str):
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(member.value for member in cls)
            raise ValueError(f"unknown {option} {value!r}; use one of {choices}") from None


class Method(_Choice):
    AUTOREGRESSIVE = "autoregressive"
    SPECULATIVE = "speculative"
    TREE = "tree"
    SAGUARO = "saguaro"
    PROMPT_LOOKUP = "prompt_lookup"
    SUFFIX = "suffix"
    AUTO = "auto"

    @property
    def model_free(self) -> bool:
        return self in (Method.AUTOREGRESSIVE, Method.PROMPT_LOOKUP, Method.SUFFIX)

    @property
    def batched(self) -> bool:
        """Its batches run as one (decode/batched.py); a tree's batch runs row after row."""
        return self is not Method.TREE


class Placement(_Choice):
    PROCESS = "process"
    THREAD = "thread"
    RANK = "rank"
    INLINE = "inline"


class Schedule(_Choice):
    ADAPTIVE = "adaptive"
    CONSTANT = "constant"


METHODS = tuple(method.value for method in Method)
DEFAULT_TREE = (2, 2, 1, 1)
# num_speculative_tokens=None: the deepest draft per round, by method. Saguaro's drafting is hidden
# behind the verification, so a deeper draft costs only the verification's extra tokens (see RESULTS).
DEFAULT_DEPTH = {Method.SAGUARO: 6, None: 4}


@dataclass(frozen=True)
class Options:
    """Every option of a generator, as checked (see `saguaro.generate` for what each does)."""

    method: Method = Method.AUTO
    num_speculative_tokens: int = DEFAULT_DEPTH[None]
    tree_branching: tuple[int, ...] | DynamicTree = DEFAULT_TREE
    placement: Placement = Placement.PROCESS
    saguaro_budget: int | None = None
    saguaro_reshape: float = 1.0
    worker_timeout: float = 60.0
    speculation_schedule: Schedule = Schedule.ADAPTIVE
    draft_device: str | torch.device | None = None
    strict: bool = False
    draft_quantization: str | None = "auto"
    draft_vocab_size: int | str | None = "auto"
    prefix_cache: bool = True
    prefix_cache_bytes: int = DEFAULT_MAX_BYTES
    compile: bool = False
    pack_target_weights: bool = True
    static_capacity: int = STATIC_CAPACITY

    @property
    def prefix_budget(self) -> int | None:
        """Bytes per model's prefix cache, None when prefix caching is off."""
        return self.prefix_cache_bytes if self.prefix_cache else None

    @classmethod
    def checked(cls, target, draft_model, tp=None, *, placement=None, num_speculative_tokens=None, **given):
        """The options for this target and draft; `tp` is the target's tensor-parallel topology."""
        method = Method.parse(given.pop("method", Method.AUTO), "method")
        quantization = given.pop("draft_quantization", "auto")
        vocab_size = given.pop("draft_vocab_size", "auto")
        if tp is not None:  # settled without timing: see distributed.settle_options
            method, placement, quantization, vocab_size = distributed.settle_options(
                tp, method, draft_model is not None, placement, quantization, vocab_size
            )
            method = Method(method)
        if not method.model_free and method is not Method.AUTO and draft_model is None:
            free = ", ".join(m.value for m in Method if m.model_free)
            raise ValueError(
                f"method={method.value!r} needs a draft_model (or use a model-free method: {free})"
            )
        if num_speculative_tokens is None:
            num_speculative_tokens = DEFAULT_DEPTH.get(method, DEFAULT_DEPTH[None])
        if placement is None:
            placement = Placement.THREAD if target.device.type == "cuda" else Placement.PROCESS
        options = replace(
            cls(),
            method=method,
            num_speculative_tokens=num_speculative_tokens,
            placement=Placement.parse(placement, "placement"),
            draft_quantization=quantization,
            draft_vocab_size=vocab_size,
            **given,
        )
        options._check(target, draft_model if not method.model_free else None, tp)
        schedule = Schedule.parse(options.speculation_schedule, "speculation_schedule")
        branching = options.tree_branching
        if isinstance(branching, list):  # frozen options hold no list a caller could still change
            branching = tuple(branching)
        return replace(options, speculation_schedule=schedule, tree_branching=branching)

    def _check(self, target, draft_model, tp) -> None:
        check_pair(target, draft_model, self.draft_device)
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:  # True is no draft length
            raise ValueError(f"num_speculative_tokens must be a positive int, got {k!r}")
        branching = self.tree_branching
        # "auto" may choose the tree, so its shape is checked then too.
        if (
            self.method in (Method.TREE, Method.AUTO)
            and not isinstance(branching, DynamicTree)
            and (
                not isinstance(branching, (list, tuple))
                or not branching
                or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in branching)
            )
        ):
            raise ValueError(
                "tree_branching must be a non-empty list of positive ints or a saguaro.DynamicTree, "
                f"got {branching!r}"
            )
        if self.placement is Placement.RANK and (tp is None or tp.drafter_rank is None):
            raise ValueError(
                "placement='rank' drafts on a drafter rank: start the run with "
                "saguaro.distributed.init(tp, drafter_rank=True) and load the target with load_target"
            )
        check_draft_options(self.draft_quantization, self.draft_vocab_size, draft_model)
        if not 0 < self.saguaro_reshape <= 1:
            raise ValueError(
                "saguaro_reshape (the factor C on the draft's top tokens) must be in (0, 1], "
                f"got {self.saguaro_reshape}"
            )
        check_saguaro_options(target, draft_model, self.saguaro_budget, self.worker_timeout)
        for name in ("prefix_cache", "compile", "pack_target_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        check_max_bytes(self.prefix_cache_bytes)
        if self.compile and tp is not None:
            raise ValueError(
                "compile=True does not serve a tensor-parallel target (its other ranks replay eager "
                "runner operations); pass compile=False"
            )
        if self.compile:
            check_compilable(target, draft_model)
        check_static_capacity(self.static_capacity)


def check_pair(target, draft_model, draft_device) -> None:
    """Clear errors for a draft model that cannot serve this target."""
    if draft_model is None:
        return
    for model, role in ((target, "target"), (draft_model, "draft_model")):
        if getattr(model.config, "is_encoder_decoder", False) or not model.can_generate():
            raise TypeError(
                f"{role} ({type(model).__name__}) is not a decoder-only causal LM; load it with "
                "AutoModelForCausalLM"
            )
        if model.device.type == "meta":
            # Shapes without weights: no draft_device can make it run (the device hint below would).
            raise ValueError(
                f"{role} is on the meta device, so it has no weights; load it with its weights (no "
                "meta-device init, no device_map that offloads it) before passing it to saguaro"
            )
    if draft_device is not None:
        check_draft_device(draft_device, draft_model)
    if draft_model.device != target.device and (
        draft_device is None or torch.device(draft_device) != draft_model.device
    ):
        raise ValueError(
            f"draft_model is on {draft_model.device} but the target on {target.device}; move the draft with "
            f".to('{target.device}'), or pass draft_device='{draft_model.device}' to draft there on purpose "
            "(only token ids and draft probabilities cross devices)"
        )
    # Families pad their embedding tables differently (Qwen2.5: 151936 vs 152064 rows for one
    # 151665-token tokenizer), so sizes may differ a little; a different tokenizer differs a lot,
    # or in its special tokens.
    sizes = target.config.vocab_size, draft_model.config.vocab_size
    if min(sizes) < 0.95 * max(sizes):
        raise ValueError(
            f"target and draft vocabularies differ ({sizes[0]} vs {sizes[1]} entries): the draft must share "
            "the target's tokenizer (e.g. a smaller model of the same family)"
        )
    for name in ("eos_token_id", "bos_token_id"):
        ids = [getattr(getattr(m, "generation_config", None), name, None) for m in (target, draft_model)]
        ids = [frozenset([i] if isinstance(i, int) else i) for i in ids if i is not None]
        if len(ids) == 2 and not ids[0] & ids[1]:
            raise ValueError(
                f"target and draft disagree on {name} ({set(ids[0])} vs {set(ids[1])}): "
                "they do not share a tokenizer"
            )


def check_draft_device(draft_device, draft_model) -> None:
    """draft_device says where the draft already is (on purpose apart from the target); it moves
    nothing, so a device this machine lacks, or one the draft is not on, is a mistake to name now."""
    try:
        device = torch.device(draft_device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"draft_device={draft_device!r} is not a device (e.g. 'cpu', 'cuda:1')") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"draft_device={draft_device!r} but CUDA is not available on this machine; drop draft_device "
            "to draft on the target's device"
        )
    actual = draft_model.device
    if device.type != actual.type or device.index not in (None, actual.index):
        raise ValueError(
            f"draft_device={draft_device!r} but draft_model is on {actual}; draft_device moves nothing: "
            f"move the draft with draft_model.to('{device}') first, or drop draft_device"
        )


def check_saguaro_options(target, draft_model, saguaro_budget, worker_timeout) -> None:
    """Clear errors for options the Saguaro worker would otherwise trip over mid-generation."""
    if saguaro_budget is not None:
        if not isinstance(saguaro_budget, numbers.Integral) or isinstance(saguaro_budget, bool):
            raise ValueError(f"saguaro_budget must be an int (or None to adapt it), got {saguaro_budget!r}")
        if saguaro_budget < 1:
            raise ValueError(
                f"saguaro_budget={saguaro_budget} pre-speculates no branch: use at least 1 "
                "(or None to adapt it)"
            )
        # An outcome's guesses are tokens of the draft's vocabulary, at most `budget` of them.
        vocab = min(m.config.vocab_size for m in (target, draft_model) if m is not None)
        if saguaro_budget > vocab:
            raise ValueError(
                f"saguaro_budget={saguaro_budget} exceeds the {vocab}-token vocabulary, so an outcome "
                f"could need more guesses than there are tokens; lower it to at most {vocab}"
            )
    if (
        not isinstance(worker_timeout, numbers.Real)
        or isinstance(worker_timeout, bool)
        or not 0 < worker_timeout < float("inf")
    ):
        # inf (and nan) would reach the worker's waits, which take finite seconds only.
        raise ValueError(
            "worker_timeout (seconds to wait for a draft) must be a finite number > 0, got "
            f"{worker_timeout!r}; for a very patient wait give a large number (e.g. 3600)"
        )
