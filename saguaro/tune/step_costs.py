"""Measured step costs: what one forward over T new tokens takes, per model, threads and device.

Every speculative method's speed rests on these numbers (see `tune/cost_model.py`): speculation pays
only when verifying T tokens costs about as much as generating one. The benchmark measures them
beside its runs, and on a GPU they are measured on random-weight models of the same shape.
"""

from __future__ import annotations

import statistics
import time

import torch

from saguaro.model.runner import ModelRunner
from saguaro.model.tree import static_tree
from saguaro.tune.cost_model import CostCurve


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(run, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        run()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _context_tokens(model, context: int) -> list[int]:
    """The `context` tokens a measurement's cache holds first (varied ids, no download needed)."""
    return [(7 * i) % model.config.vocab_size for i in range(context)]


def forward_costs(
    model, tokens: list[int], repeats: int = 3, context: int = 256, compiled: bool = False
) -> CostCurve:
    """Median seconds of a forward over T new tokens (each T in `tokens`) on a `context`-token cache,
    with the calling thread's torch thread count. A chain is verified like a tree of that many
    nodes; on CPU the mask makes no measurable difference. `compiled`: through the compiled graphs
    a compile=True generator runs (a static cache of its usual capacity, a bucket per T; compiled
    here, then reused by the generator's runners)."""
    capacity = context + max(tokens) + 1
    vocab = model.config.vocab_size
    prompt = _context_tokens(model, context)
    if compiled:
        from saguaro.model.compiled_runner import STATIC_CAPACITY, CompiledRunner  # compile=True only

        runner = CompiledRunner(model, max(STATIC_CAPACITY, capacity), buckets=tuple(tokens))
        runner.feed(prompt)  # the prefill, then every bucket's graph
    else:
        runner = ModelRunner(model, capacity)
        runner.forward(prompt, last_only=True)
    runner.forward([1])  # warm-up: first calls allocate
    runner.rollback(context)

    def one(t: int):
        runner.forward([(11 * i + 3) % vocab for i in range(t)])
        runner.rollback(context)

    return CostCurve({t: _median_seconds(lambda t=t: one(t), runner.device, repeats) for t in tokens})


def greedy_token_cost(model, repeats: int = 3, context: int = 256) -> float:
    """Median seconds per token of compiled greedy decoding, which runs GREEDY_BLOCK tokens per
    compiled call (argmax fed back in the graph): cheaper per token than a one-token forward."""
    from saguaro.model.compiled_runner import (  # compile=True only
        GREEDY_BLOCK,
        STATIC_CAPACITY,
        CompiledRunner,
    )

    capacity = max(STATIC_CAPACITY, context + GREEDY_BLOCK + 1)
    runner = CompiledRunner(model, capacity, chains=((GREEDY_BLOCK, 1),))
    runner.feed(_context_tokens(model, context))  # the prefill, then the block's graph

    def one():
        runner.greedy_block(1)
        runner.rollback(context)

    one()
    return _median_seconds(one, runner.device, repeats) / GREEDY_BLOCK


def tree_verify_costs(
    model, branchings: list[list[int]], repeats: int = 3, context: int = 256
) -> dict[str, float]:
    """Median seconds of verifying static trees (root + nodes), keyed by the branching as text."""
    sizes = {str(b): static_tree(b) for b in branchings}
    runner = ModelRunner(model, capacity=context + max(len(t) for t in sizes.values()) + 2)
    vocab = model.config.vocab_size
    runner.forward(_context_tokens(model, context), last_only=True)
    costs = {}
    for name, tree in sizes.items():
        full = tree.under_root()

        def one(full=full):
            runner.forward([(5 * i + 1) % vocab for i in range(len(full))], full)
            runner.rollback(context)

        one()
        costs[name] = _median_seconds(one, runner.device, repeats)
    return costs


def copy_bandwidth(device: torch.device | str = "cpu", megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second of a large tensor copy (read + write), the ceiling on streaming weights."""
    device = torch.device(device)
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device).fill_(1)
    target = torch.empty_like(source)
    target.copy_(source)
    seconds = _median_seconds(lambda: target.copy_(source), device, repeats)
    return 2 * source.numel() / seconds


def model_bytes(model) -> int:
    """Bytes of weights a forward streams once (tied embeddings counted once)."""
    seen, total = set(), 0
    for parameter in model.parameters():
        if parameter.data_ptr() not in seen:
            seen.add(parameter.data_ptr())
            total += parameter.numel() * parameter.element_size()
    return total


def random_weights_model(
    config_dir: str, dtype: torch.dtype, device: str = "cpu", attn_implementation: str | None = None
):
    """A model with `config_dir`'s shape and random weights: step costs without the checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    return model.eval()
