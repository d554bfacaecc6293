"""The methods `saguaro bench` runs, their variants, and the keys their results go under."""

from __future__ import annotations

from saguaro.bench import report

HF_METHODS = ("hf_greedy", "hf_assisted")
SAGUARO_METHODS = ("autoregressive", "prompt_lookup", "speculative", "tree", "saguaro", "auto")
# Suffixes on a saguaro method: "+sample" samples (do_sample=True); "+constant" drafts the full K
# every round instead of the adaptive length, which shows the mechanism where adaptation turns it off;
# "+1thread" keeps the target on one thread throughout (a Saguaro worker still gets its own core),
# the like-for-like comparison that shows whether drafting is hidden.
VARIANTS = ("sample", "constant", "1thread")
FULL_METHODS = HF_METHODS + (
    "autoregressive",
    "prompt_lookup",
    "speculative",
    "speculative+constant",
    "tree",
    "saguaro",
    "saguaro+constant",
    "speculative+sample",
    "saguaro+sample",
)
# The quick default: the HF baselines, saguaro's best methods and its default ("auto"), on two
# short prompts.
QUICK_METHODS = HF_METHODS + ("speculative", "tree", "saguaro", "auto")


def base_method(method: str) -> str:
    return method.split("+")[0]


def variants(method: str) -> set[str]:
    return set(method.split("+")[1:])


def batch_key(method: str, size: int) -> str:
    """A method's results key at a batch size: the method itself for batch 1, e.g. speculative@batch4."""
    return method if size == 1 else f"{method}{report.BATCH_MARK}{size}"


def batch_suffix(key: str) -> str:
    return key[key.index(report.BATCH_MARK) :] if report.BATCH_MARK in key else ""


def methods_at(methods: list[str], size: int) -> list[str]:
    """The methods a batch of `size` runs: HF's assisted generation takes one sequence only."""
    return [m for m in methods if size == 1 or m != "hf_assisted"]
