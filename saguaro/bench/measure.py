"""The measurement run of `saguaro bench`: every method on the same prompts, interleaved per prompt,
each run's tokens/s, stats, forward trace and peak memory, greedy outputs checked against HF greedy;
with --full, step costs measured around the runs and each run's time predicted from them."""

from __future__ import annotations

import contextlib
import time

import torch
from tqdm import tqdm

from saguaro import distributed
from saguaro.bench.environment import setup_description
from saguaro.bench.memory_sampler import MemorySampler
from saguaro.bench.methods import HF_METHODS, base_method, batch_key, batch_suffix, methods_at, variants
from saguaro.bench.prefix_scenarios import shared_prefix_benchmark
from saguaro.bench.summary import observed_verify_seconds, projection, summarize
from saguaro.bench.workload import (
    STEP_TOKENS,
    batches,
    encode,
    left_padded,
    load_prompts,
    new_tokens,
    plain_greedy_config,
)
from saguaro.model.placement import ThreadSplit
from saguaro.tune import cost_model, step_costs

# The quick run warms up on the first prompt's first tokens: lazy initialisation does not depend on
# the length, and a long prefill per method costs a 1.5B model on a CPU without native bf16 most of a
# minute. 64 tokens: what the draft chooser (draft_quantization="auto") samples on the first call.
QUICK_WARMUP_TOKENS = 64
STAT_KEYS = (
    "chosen_method",
    "draft_configuration",
    "mean_accepted_length",
    "acceptance_rate",
    "accepted_histogram",
    "hit_rate",
    "prefill_seconds",
    "draft_seconds",
    "verify_seconds",
    "drafter_busy_seconds",
    "rounds",
    "target_idle_fraction",
    "round_log",
)


@contextlib.contextmanager
def forward_trace(**models):
    """Records the new-token count of every forward of each named model: {"<name>_tokens": [T, ...]}."""
    trace, handles = {}, []
    for name, model in models.items():
        counts = trace.setdefault(f"{name}_tokens", [])

        def hook(module, args, kwargs, counts=counts):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is not None:
                counts.append(int(ids.numel()))

        handles.append(model.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield trace
    finally:
        for handle in handles:
            handle.remove()


def run_method(
    method: str,
    generators: dict,
    ids: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    threads: int,
    temperature: float,
):
    """Returns (each row's new token ids, seconds, saguaro stats or {}, forward trace)."""
    # Every method gets all `threads`, as a user's call would: a Saguaro generator splits the
    # cores between its target and its worker itself.
    torch.set_num_threads(1 if "1thread" in variants(method) else threads)
    target, draft = generators["models"]
    sampling = {"do_sample": True, "temperature": temperature} if "sample" in variants(method) else {}
    in_process = base_method(method) != "saguaro"  # a Saguaro drafter works in its own process
    traced = {"target": target, "draft": draft} if in_process else {"target": target}
    eos = target.generation_config.eos_token_id
    with forward_trace(**traced) as trace:
        start = time.perf_counter()
        if method in HF_METHODS:
            extra = {"assistant_model": draft} if method == "hf_assisted" else {}
            out = target.generate(
                ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, **extra
            )
            return new_tokens(out, ids.shape[1], eos), time.perf_counter() - start, {}, trace
        result = generators[method].generate(
            ids,
            attention_mask=mask,
            pad_token_id=target.generation_config.pad_token_id,
            max_new_tokens=max_new_tokens,
            return_dict_in_generate=True,
            **sampling,
        )
        seconds = time.perf_counter() - start
    stats = result.stats.as_dict()
    stats["chosen_method"] = generators[method].method  # what "auto" settled on
    return new_tokens(result.sequences, ids.shape[1], eos), seconds, stats, trace


def measure_costs(
    target, draft, threads: int, repeats: int, extra_tokens=()
) -> dict[str, cost_model.CostCurve]:
    """Step-cost curves at the thread counts the methods use: all threads, and one (Saguaro).
    `extra_tokens` adds lengths to measure exactly, the prompts' (prefills)."""
    tokens = sorted(set(STEP_TOKENS) | set(extra_tokens))
    curves = {}
    for name, model in (("target", target), ("draft", draft)):
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            curves[f"{name}@{n}"] = step_costs.forward_costs(model, tokens, repeats)
    torch.set_num_threads(threads)
    return curves


def average_costs(before: dict, after: dict) -> dict[str, cost_model.CostCurve]:
    """Step costs measured before and after the runs, averaged: the machine's speed drifts."""
    return {
        name: cost_model.CostCurve(
            {t: (before[name].points[t] + after[name].points[t]) / 2 for t in before[name].points}
        )
        for name in before
    }


def predicted_seconds(method: str, row: dict, curves: dict, threads: int, lookahead: int) -> float:
    n = 1 if base_method(method) == "saguaro" else threads
    trace = {**row["trace"], "rounds": row.get("round_log", []), "prompt_tokens": row["prompt_tokens"]}
    return cost_model.predict_run_seconds(
        base_method(method), trace, curves[f"target@{n}"], curves[f"draft@{n}"], lookahead
    )


def benchmark(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saguaro.api import DEFAULT_DEPTH, SpeculativeGenerator

    # From before the models load: peaks are reported over this baseline, workers included.
    memory = MemorySampler()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.target)
    if args.tp > 1:  # every target rank runs this same loop; rank 0 decides (distributed/__init__.py)
        target = distributed.load_target(args.target, dtype=dtype).eval()
    else:
        target = AutoModelForCausalLM.from_pretrained(args.target, dtype=dtype).eval()
    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=dtype).eval().to(target.device)
    target.generation_config = plain_greedy_config(target)
    draft.generation_config = plain_greedy_config(draft)
    prompts = load_prompts(args.prompts, args.num_prompts)
    methods = args.methods
    generators = {"models": (target, draft)}
    for method in methods:
        name = base_method(method)
        schedule = "constant" if "constant" in variants(method) else "adaptive"
        if name in HF_METHODS:
            continue
        one_thread = "1thread" in variants(method)
        key = (name, schedule, one_thread)
        if key not in generators:  # a sampled variant shares its generator (and worker)
            generators[key] = SpeculativeGenerator(
                target,
                draft,
                method=name,
                num_speculative_tokens=args.num_speculative_tokens,
                tree_branching=args.tree_branching,
                speculation_schedule=schedule,
                # Every run starts cold, as HF's do: the warm-up, the repeats and the variants that
                # share a generator resend the same prompts, whose prefill would otherwise be reused.
                prefix_cache=False,
            )
            if one_thread and name == "saguaro":  # the target on one thread even while the drafter idles
                generators[key].policy.threads = ThreadSplit(total=1, drafter=0)
        generators[method] = generators[key]

    warm = encode(tokenizer, prompts[0]["prompt"])
    if not args.full:
        warm = warm[:, :QUICK_WARMUP_TOKENS]
    warm_up_peaks = {}
    for method in methods:  # first calls pay for lazy initialisation; keep that out of the numbers
        memory.mark()
        run_method(method, generators, warm, torch.ones_like(warm), 8, args.threads, args.temperature)
        warm_up_peaks[method] = memory.window_peak()

    prompt_lengths = [encode(tokenizer, p["prompt"]).shape[1] for p in prompts]
    if args.full:
        print("measuring step costs (forward over T new tokens) ...", flush=True)
        costs_before = measure_costs(target, draft, args.threads, args.step_repeats, prompt_lengths)
    bandwidth = step_costs.copy_bandwidth("cpu")
    target_bytes = step_costs.model_bytes(target)

    pad = target.generation_config.pad_token_id
    encoded = [encode(tokenizer, p["prompt"]) for p in prompts]
    rows = {batch_key(m, size): [] for size in args.batch_sizes for m in methods_at(methods, size)}
    work = [
        (size, batch, rep)
        for size in args.batch_sizes
        for batch in batches(len(prompts), size)
        for rep in range(args.repeats)
    ]
    for size, batch, rep in tqdm(work, desc="batches x repeats", unit="run", disable=not args.progress):
        ids, mask = left_padded([encoded[i] for i in batch], pad)
        reference = None
        for method in methods_at(methods, size):
            key = batch_key(method, size)
            torch.manual_seed(1000 * batch[0] + rep)
            memory.mark()
            tokens, seconds, stats, trace = run_method(
                method, generators, ids, mask, args.max_new_tokens, args.threads, args.temperature
            )
            if method == "hf_greedy":
                reference = tokens
            greedy = "sample" not in variants(method)
            produced = sum(len(row) for row in tokens)
            row = {
                "prompt": batch[0],
                "batch_size": size,
                "prompts": batch,
                "repeat": rep,
                "kind": prompts[batch[0]]["kind"] if size == 1 else "batch",
                "prompt_tokens": int(mask.sum()),
                "new_tokens": produced,
                "seconds": seconds,
                "tokens_per_second": produced / seconds,
                "matches_hf_greedy": None if reference is None or not greedy else tokens == reference,
                "trace": trace,
                # Over the machine's used memory before the models were loaded; the first runs
                # also carry their warm-up's peak (where the setup built what the method runs).
                "peak_memory_bytes": _max(memory.window_peak(), warm_up_peaks.pop(method, None)),
                **{k: stats[k] for k in STAT_KEYS if k in stats},
            }
            rows[key].append(row)
            tqdm.write(
                f"{'prompt ' + str(batch[0]) if size == 1 else f'batch of {size}':10s} {row['kind']:9s} "
                f"{method:20s} {row['tokens_per_second']:6.2f} tok/s"
                + (
                    f"  accepted/round {row['mean_accepted_length']:.2f}"
                    if "mean_accepted_length" in row
                    else ""
                )
                + (f"  hit rate {row['hit_rate']:.2f}" if key == "saguaro" else "")
                + ("" if row["matches_hf_greedy"] in (None, True) else "  OUTPUT DIFFERS FROM HF GREEDY")
            )
    for generator in {id(g): g for g in generators.values()}.values():
        if isinstance(generator, SpeculativeGenerator):
            generator.close()
    measured = {}
    if args.full:
        print("measuring step costs again ...", flush=True)
        costs_after = measure_costs(target, draft, args.threads, args.step_repeats, prompt_lengths)
        curves = average_costs(costs_before, costs_after)
        for method, runs in rows.items():
            if batch_suffix(method):  # step costs are one row's: a batch's time is not predicted
                continue
            for row in runs:
                # HF's methods have no generator here; their predictions do not draft K tokens.
                generator = generators.get(method)
                depth = generator.options.num_speculative_tokens if generator else DEFAULT_DEPTH[None]
                predicted = predicted_seconds(method, row, curves, args.threads, depth)
                row["predicted_tokens_per_second"] = row["new_tokens"] / predicted
        measured = {
            "step_costs": {name: curve.as_dict() for name, curve in curves.items()},
            "step_cost_drift": {name: costs_after[name](1) / costs_before[name](1) for name in curves},
        }
    if args.shared_prefix:
        print("shared-prefix scenarios (time to first token, warm vs cold generator) ...", flush=True)
        torch.set_num_threads(args.threads)
        measured["shared_prefix"] = shared_prefix_benchmark(target, draft, tokenizer, args.repeats_prefix)
    peak, own_peak = memory.stop(), memory.tree_peak_over_baseline()
    weights_bytes = sum(p.nbytes for m in (target, draft) for p in m.parameters())
    # The keys in the order of earlier results files (docs/results), so runs diff cleanly.
    return {
        "setup": {
            **setup_description(args, target_bytes, bandwidth),
            "weights_gib": round(weights_bytes / 2**30, 2),
            "peak_memory_over_baseline": None
            if peak is None
            else f"{peak / 2**30:.2f} GiB ({peak / weights_bytes:.2f}x the weights; machine-wide)",
            "peak_memory_of_this_run": None
            if own_peak is None
            else f"{own_peak / 2**30:.2f} GiB ({own_peak / weights_bytes:.2f}x; bench and workers alone)",
        },
        "summary": summarize(rows, target_bytes, bandwidth),
        **measured,
        "observed_verify_seconds": observed_verify_seconds(rows),
        **({"projection": projection(rows, curves, args)} if args.full else {}),
        "runs": rows,
    }


def _max(*values):
    present = [v for v in values if v is not None]
    return max(present) if present else None
