"""Speedup benchmark: HF greedy, HF assisted generation and saguaro's methods, side by side.

All methods run in one process on the same prompts, interleaved per prompt, so the ratios compare
like with like on a machine whose speed drifts. Greedy outputs are checked against HF greedy: in
fp32 they must be identical; in bf16 a kernel's different summation order can flip a near-tie,
and any such mismatch is reported, never hidden. With --full, beside the runs it measures step costs (a
forward over T tokens, per model and thread count) and checks the cost model against the runs:
each run's time is predicted from those step costs and the forwards its acceptance led to.

    saguaro bench                      # quick: the demo pair (fetched on first use), 6 methods, minutes
    saguaro bench --full               # every method, step costs before and after, cost-model check
    saguaro bench --batch-sizes 1 4 8 --shared-prefix   # batched rows; prefix reuse across calls
    saguaro bench --target DIR --draft DIR [--dtype bfloat16] [--num-prompts 3] [--out results.json]
    saguaro bench --random-weights --target CONFIG_DIR --draft CONFIG_DIR --device cuda \\
                  --acceptance-from results.json     # GPU step costs + projected speedups
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from saguaro import distributed, launch
from saguaro.api import DEFAULT_DEPTH
from saguaro.bench import demo_models, report
from saguaro.bench.memory_sampler import MemorySampler
from saguaro.bench.prefix_scenarios import shared_prefix_benchmark
from saguaro.decode.stats import add_counts
from saguaro.faults import logger
from saguaro.kernels import TREE_BACKENDS, TreeBackendUnavailable, choose_tree_backend
from saguaro.model.placement import ThreadSplit
from saguaro.tune import cost_model, step_costs

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
# What a run does with the arguments left unset; given ones always win. Only --full measures step
# costs (two sweeps over 14 lengths on a 256-token context: most of a full run's time on a CPU).
# Quick's sizes: on a 2-core CPU with native bf16 the run took 65 s (docs/RESULTS.md); without
# native bf16 (docs/results/cpu-bf16.md) a prompt costs these methods about 2 minutes, so with
# loading and warm-up about 5 minutes.
PRESETS = {
    "quick": {"methods": list(QUICK_METHODS), "num_prompts": 2, "max_new_tokens": 24},
    "full": {"methods": list(FULL_METHODS), "num_prompts": 3, "max_new_tokens": 64},
}
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
STEP_TOKENS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32)
PROMPTS_FILE = Path(__file__).resolve().parent / "prompts.jsonl"


def load_prompts(path: str | None, limit: int | None) -> list[dict]:
    text = Path(path or PROMPTS_FILE).read_text()
    prompts = [json.loads(line) for line in text.splitlines() if line.strip()]
    if limit:
        # Round-robin over kinds so a short run still sees code, chat and summaries.
        kinds = sorted({p["kind"] for p in prompts})
        by_kind = [[p for p in prompts if p["kind"] == k] for k in kinds]
        prompts = [group[i] for i in range(len(prompts)) for group in by_kind if i < len(group)][:limit]
    return prompts


def encode(tokenizer, text: str) -> torch.Tensor:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    else:
        ids = tokenizer(text, return_tensors="pt").input_ids
    return ids


def plain_greedy_config(model):
    """The model's generation config with its sampling defaults removed (Qwen ships top_p, top_k,
    repetition_penalty): every method is measured on the same plain decoding."""
    from transformers import GenerationConfig

    old = model.generation_config
    return GenerationConfig(
        bos_token_id=old.bos_token_id,
        eos_token_id=old.eos_token_id,
        pad_token_id=old.pad_token_id if old.pad_token_id is not None else old.eos_token_id,
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


def base_method(method: str) -> str:
    return method.split("+")[0]


def variants(method: str) -> set[str]:
    return set(method.split("+")[1:])


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


def new_tokens(sequences: torch.Tensor, prompt_width: int, eos) -> list[list[int]]:
    """Each row's new tokens up to and including its first EOS (a batch pads finished rows after it)."""
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    rows = []
    for row in sequences[:, prompt_width:].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
        rows.append(row[:end])
    return rows


def left_padded(rows: list[torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, n] prompts -> a left-padded batch and its attention mask."""
    width = max(row.shape[1] for row in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - row.shape[1] :] = row[0]
        mask[i, width - row.shape[1] :] = 1
    return ids, mask


def batches(num_prompts: int, size: int) -> list[list[int]]:
    """Prompt indices per batch: the prompts in order, cycled so that every batch is full and every
    prompt is in one (a batch of 8 from 6 prompts repeats 2 of them)."""
    count = max(1, -(-num_prompts // size))
    return [[(b * size + i) % num_prompts for i in range(size)] for b in range(count)]


def batch_key(method: str, size: int) -> str:
    """A method's results key at a batch size: the method itself for batch 1, e.g. speculative@batch4."""
    return method if size == 1 else f"{method}{report.BATCH_MARK}{size}"


def batch_suffix(key: str) -> str:
    return key[key.index(report.BATCH_MARK) :] if report.BATCH_MARK in key else ""


def methods_at(methods: list[str], size: int) -> list[str]:
    """The methods a batch of `size` runs: HF's assisted generation takes one sequence only."""
    return [m for m in methods if size == 1 or m != "hf_assisted"]


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

    from saguaro.api import SpeculativeGenerator

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
                generators[key].threads = ThreadSplit(total=1, drafter=0)
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
                depth = (
                    generators[method].num_speculative_tokens if method in generators else DEFAULT_DEPTH[None]
                )
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


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def summarize(rows: dict[str, list[dict]], target_bytes: int, bandwidth: float) -> dict:
    """Per method: median tokens/s and its spread over runs, median per-run ratios against the
    HF baselines, the target's share of the memory-bandwidth limit, and the cost model's error
    (where the runs carry predictions: --full)."""
    summary = {}
    for method, runs in rows.items():
        speeds = [r["tokens_per_second"] for r in runs]
        median = statistics.median(speeds)
        entry = {
            "median_tokens_per_second": median,
            "quartiles_tokens_per_second": quartiles(speeds),
            "runs": len(runs),
            "bandwidth_fraction": target_bytes * median / bandwidth,
        }
        peaks = [r["peak_memory_bytes"] for r in runs if r.get("peak_memory_bytes") is not None]
        if peaks:
            entry["peak_memory_gib"] = max(peaks) / 2**30
        if "predicted_tokens_per_second" in runs[0]:
            predicted = statistics.median(r["predicted_tokens_per_second"] for r in runs)
            entry["predicted_tokens_per_second"] = predicted
            entry["prediction_error"] = predicted / median - 1
        for base in HF_METHODS:
            baseline = base + batch_suffix(method)  # like for like: the same batch size
            if baseline in rows and baseline != method:
                pairs = zip(runs, rows[baseline])
                entry[f"speedup_vs_{base}"] = statistics.median(
                    r["tokens_per_second"] / b["tokens_per_second"] for r, b in pairs
                )
        if "mean_accepted_length" in runs[0]:
            entry["median_accepted_length"] = statistics.median(r["mean_accepted_length"] for r in runs)
            histogram = []
            for r in runs:
                add_counts(histogram, r["accepted_histogram"])
            entry["accepted_histogram"] = histogram
        if base_method(method) == "saguaro":
            entry["median_hit_rate"] = statistics.median(r["hit_rate"] for r in runs)
        if runs[0].get("rounds"):
            entry.update(per_round_times(runs))
        if base_method(method) == "auto":
            entry["chosen_methods"] = sorted({r["chosen_method"] for r in runs})
        if runs[0].get("draft_configuration"):
            entry["draft_configuration"] = draft_summary(runs[0]["draft_configuration"])
        checked = [r["matches_hf_greedy"] for r in runs if r["matches_hf_greedy"] is not None]
        if checked:
            entry["outputs_matching_hf_greedy"] = f"{sum(checked)}/{len(checked)}"
        summary[method] = entry
    return summary


def draft_summary(configuration: dict) -> dict:
    """What the drafters ran (quantization, vocabulary, threads) and, where "auto" measured the
    variants, the chosen one's step cost and top-1 agreement beside the plain draft's."""
    label = f"{configuration['quantization'] or 'none'}/{configuration['vocab_size'] or 'full'}"
    steps, agreement = configuration["step_seconds"], configuration["agreement"]
    return {
        "variant": label,
        "threads": configuration.get("threads"),
        "chosen_by": configuration["chosen_by"],
        "step_seconds": steps.get(label),
        "plain_step_seconds": steps.get("none/full"),
        "agreement_with_plain": agreement.get(label),
    }


def per_round_times(runs: list[dict]) -> dict[str, float]:
    """Medians over runs of tokens per round, the target's wait for drafts and the drafter's busy
    time per round, and the share of decode time (after the prefill) the target spent waiting."""

    def median(value) -> float:
        return statistics.median(value(r) for r in runs)

    def forwards(r) -> int:
        """The run's target forwards after the prefill. A batch's stats count rounds per row (and
        its times once, the longest row's): its forwards are in the trace."""
        return len(r["trace"]["target_tokens"]) - 1 if r.get("batch_size", 1) > 1 else r["rounds"]

    return {
        "tokens_per_round": median(lambda r: r["new_tokens"] / r["rounds"]),  # per row
        "wait_seconds_per_round": median(lambda r: r["draft_seconds"] / forwards(r)),
        "drafter_busy_seconds_per_round": median(lambda r: r["drafter_busy_seconds"] / forwards(r)),
        "wait_fraction_of_decode": median(
            lambda r: r["draft_seconds"] / max(r["seconds"] - r["prefill_seconds"], 1e-9)
        ),
    }


def observed_verify_seconds(rows: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Median target verify time per number of verified tokens (drafts + 1), as seen inside the runs."""
    observed = {}
    for method, runs in rows.items():
        by_tokens: dict[int, list[float]] = {}
        for r in runs:
            for entry in r.get("round_log", []):
                by_tokens.setdefault(entry["drafted"] + 1, []).append(entry["verify_seconds"])
        if by_tokens:
            observed[method] = {str(t): statistics.median(v) for t, v in sorted(by_tokens.items())}
    return observed


def measured_acceptance(rows: dict[str, list[dict]], methods: tuple[str, ...], positions: int) -> list[float]:
    """Per-position acceptance of the draft model's greedy chains, over every round that drafted."""
    counter = cost_model.AcceptanceCounter(positions)
    for method in methods:
        for r in rows.get(method, []):
            for entry in r.get("round_log", []):
                if entry["drafted"]:
                    counter.observe(entry["drafted"], entry["accepted"])
    return counter.rates()


def projection(rows: dict, curves: dict, args, ks=range(1, 9)) -> dict:
    """Decode tokens/s the cost model projects per draft length K, from this run's acceptance."""
    acceptance = measured_acceptance(
        rows, ("speculative", "speculative+constant", "saguaro", "saguaro+constant"), max(ks)
    )
    saguaro_runs = rows.get("saguaro+constant") or rows.get("saguaro", [])
    hit = statistics.median(r["hit_rate"] for r in saguaro_runs) if saguaro_runs else 0.0
    return project(curves, args.threads, acceptance, hit, ks)


def project(curves: dict, threads: int, acceptance: list[float], hit_rate: float, ks=range(1, 9)) -> dict:
    target_n, draft_n = curves[f"target@{threads}"], curves[f"draft@{threads}"]
    target_1, draft_1 = curves["target@1"], curves["draft@1"]
    out = {
        "acceptance_per_position": acceptance,
        "hit_rate": hit_rate,
        "autoregressive": cost_model.project_tokens_per_second(
            "autoregressive", 0, target_n, draft_n, acceptance
        ),
    }
    for method, target, draft in (("speculative", target_n, draft_n), ("saguaro", target_1, draft_1)):
        per_k = {}
        for k in ks:
            budget = 3 * (k + 1)
            if method == "saguaro":  # the budget the engine adapts to: what fits in one verification
                budget = max(k + 1, cost_model.largest_budget_within(target(k + 1), draft, k))
            per_k[str(k)] = cost_model.project_tokens_per_second(
                method, k, target, draft, acceptance, hit_rate=hit_rate, branches=budget
            )
        best = max(per_k, key=per_k.get)
        out[method] = {
            "tokens_per_second_by_k": per_k,
            "best_k": int(best),
            "best_tokens_per_second": per_k[best],
        }
    return out


def setup_description(args, target_bytes: int, bandwidth: float) -> dict:
    import transformers

    return {
        "run": "full" if args.full else "quick (--full adds every method, step costs, the cost-model check)",
        "target": args.target,
        "draft": args.draft,
        "dtype": args.dtype,
        "threads": args.threads,
        "max_new_tokens": args.max_new_tokens,
        "batch_sizes": args.batch_sizes,
        "num_speculative_tokens": args.num_speculative_tokens
        or f"per method: {DEFAULT_DEPTH['saguaro']} for saguaro, {DEFAULT_DEPTH[None]} for the others",
        "tree_branching": args.tree_branching,
        "repeats": args.repeats,
        "temperature": args.temperature,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "target_bytes": target_bytes,
        "copy_bandwidth_bytes_per_second": bandwidth,
        "machine": f"{cpu_model()} ({platform.machine()}, {os.cpu_count()} logical CPUs)",
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def random_weights_benchmark(args) -> dict:
    """Step costs of same-shape random models on `args.device` (a GPU, typically), and the speedups
    they imply with acceptance measured elsewhere (a CPU results.json): labelled projected."""
    dtype = getattr(torch, args.dtype)
    target = step_costs.random_weights_model(args.target, dtype, args.device)
    draft = step_costs.random_weights_model(args.draft, dtype, args.device)
    threads = torch.get_num_threads()
    curves = {
        "target@1": step_costs.forward_costs(target, list(STEP_TOKENS), args.step_repeats),
        "draft@1": step_costs.forward_costs(draft, list(STEP_TOKENS) + [48, 64], args.step_repeats),
    }
    curves[f"target@{threads}"], curves[f"draft@{threads}"] = curves["target@1"], curves["draft@1"]
    trees = [[1, 1, 1, 1], [2, 2, 1, 1], [4, 2, 2, 1], [4, 4, 2, 2, 1]]
    attention = {"sdpa": step_costs.tree_verify_costs(target, trees, args.step_repeats)}
    if args.device.startswith("cuda"):
        from saguaro.kernels.hf_attention import register_hf_attention

        for backend in TREE_BACKENDS:  # attn_implementation="saguaro_tree..." for the models below
            register_hf_attention(backend)

        kernel_target = step_costs.random_weights_model(args.target, dtype, args.device, "saguaro_tree")
        attention["saguaro_tree"] = step_costs.tree_verify_costs(kernel_target, trees, args.step_repeats)
        try:  # csrc/'s kernel, built just in time where nvcc is found (setup.py may have built it)
            choose_tree_backend("cuda", torch.device(args.device))
        except TreeBackendUnavailable as error:
            logger.warning("tree verify costs without the CUDA kernel: %s", error)
        else:
            kernel_target.set_attn_implementation("saguaro_tree_cuda")
            costs = step_costs.tree_verify_costs(kernel_target, trees, args.step_repeats)
            attention["saguaro_tree_cuda"] = costs
    measured = json.loads(Path(args.acceptance_from).read_text()) if args.acceptance_from else None
    acceptance = measured["projection"]["acceptance_per_position"] if measured else [0.7] * 8
    hit_rate = measured["projection"]["hit_rate"] if measured else 0.8
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else cpu_model()
    return {
        "setup": {
            "mode": "random weights (step costs only; speeds are projected)",
            "device": device_name,
            "target_config": args.target,
            "draft_config": args.draft,
            "dtype": args.dtype,
            "acceptance_from": args.acceptance_from or "assumed 0.7 per position, hit rate 0.8",
            "torch": torch.__version__,
            "copy_bandwidth_bytes_per_second": step_costs.copy_bandwidth(args.device),
            "target_bytes": step_costs.model_bytes(target),
        },
        "step_costs": {name: curve.as_dict() for name, curve in curves.items() if name.endswith("@1")},
        "tree_verify_seconds": attention,
        "projection": project(curves, threads, acceptance, hit_rate),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        help="target model folder or hub id (a config folder with --random-weights); without "
        "--target and --draft, the demo pair (Qwen2.5-Coder 1.5B and 0.5B, fetched on first use)",
    )
    parser.add_argument("--draft", help="draft model sharing the target's tokenizer")
    parser.add_argument("--tokenizer", help="tokenizer folder or hub id (default: the target's)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument(
        "--full",
        action="store_true",
        help="the complete run: every method, 3 prompts x 64 tokens, step costs measured before and "
        "after the runs, the cost model checked against them and per-K projections (tens of minutes "
        "on a CPU). Without it: a quick comparison of "
        f"{', '.join(QUICK_METHODS)} on 2 prompts x 24 tokens",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        help="methods to run, in order; append +sample to a saguaro method to sample, +constant "
        "to draft the full K every round "
        f"(default: {' '.join(QUICK_METHODS)}; with --full: {' '.join(FULL_METHODS)})",
    )
    parser.add_argument(
        "--prompts", help="JSONL file with {'kind', 'prompt'} per line (default: benchmarks/prompts.jsonl)"
    )
    parser.add_argument(
        "--num-prompts", type=int, help="how many prompts to run (0 = all; default 2, with --full 3)"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per prompt and method (medians and quartiles over all)"
    )
    parser.add_argument("--max-new-tokens", type=int, help="tokens per run (default 24, with --full 64)")
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=[1],
        help="batch sizes to run every method at (e.g. 1 4 8): prompts cycled into left-padded "
        "batches, each compared with HF's batched greedy on the same batch (default: 1)",
    )
    parser.add_argument(
        "--shared-prefix",
        action="store_true",
        help="also measure prefix reuse: a chat's second turn and another request behind the same "
        "~470-token system prompt, time to first token on a warm vs a cold generator",
    )
    parser.add_argument(
        "--repeats-prefix", type=int, default=3, help="repeats per shared-prefix scenario (medians)"
    )
    parser.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=None,
        help="longest draft per round (K; default: per method)",
    )
    parser.add_argument(
        "--tree-branching",
        type=int,
        nargs="+",
        default=[2, 2, 1, 1],
        help="children per node at each depth, for method 'tree'",
    )
    parser.add_argument("--temperature", type=float, default=0.7, help="for the +sample methods")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument(
        "--step-repeats", type=int, default=2, help="repeats per step-cost measurement (--full)"
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="GPU mode: build random models from the --target/--draft configs, measure step costs "
        "and project speeds (no generation)",
    )
    parser.add_argument("--device", default="cpu", help="device for --random-weights (e.g. cuda)")
    parser.add_argument(
        "--acceptance-from", help="results.json of a real-model run, for --random-weights projections"
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument(
        "--out",
        default="results.json",
        help="JSON results (or a folder for results.json); a Markdown table (.md) and a plot (.png) "
        "are written beside it",
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="saguaro bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    launch.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.tp < 1:
        parser.error(f"--tp must be at least 1, got {args.tp}")
    if args.tp > 1 and (args.full or args.random_weights):
        # Step-cost sweeps time the target on one rank; the other shards could not follow them.
        parser.error("--tp runs the quick benchmark (no --full, no --random-weights)")
    for key, value in PRESETS["full" if args.full else "quick"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = [
        m
        for m in args.methods
        if m not in HF_METHODS and (base_method(m) not in SAGUARO_METHODS or not variants(m) <= set(VARIANTS))
    ]
    if unknown:
        parser.error(
            f"unknown method(s) {unknown}; choose from {list(HF_METHODS + SAGUARO_METHODS)}, "
            "optionally with +sample, +constant and/or +1thread"
        )
    if any(size < 1 for size in args.batch_sizes):
        parser.error(f"--batch-sizes must be positive, got {args.batch_sizes}")
    if (args.target is None) != (args.draft is None):
        parser.error("give both --target and --draft, or neither for the demo pair")
    if args.acceptance_from and "projection" not in json.loads(Path(args.acceptance_from).read_text()):
        parser.error(
            f"{args.acceptance_from} has no acceptance per position (a quick run); make one with "
            "`saguaro bench --full` and pass that to --acceptance-from"
        )
    out = Path(args.out)
    if out.is_dir():  # a folder: the files go into it (checked now, not after a long run)
        out = out / "results.json"
    if not out.parent.is_dir():
        parser.error(f"--out {args.out}: folder {out.parent} does not exist; create it first")
    args.out = str(out)  # where write_results writes (rank 0's, in a --tp run)
    if args.target is None:
        args.target, args.draft = demo_models.demo_pair_paths(args.progress)
    if args.tp > 1:
        launch.run_ranks(
            _benchmark_on_rank, args.tp, args.draft if args.drafter_rank else None, args.dtype, args
        )
        return
    write_results(random_weights_benchmark(args) if args.random_weights else benchmark(args), args)


def _benchmark_on_rank(topology, args) -> None:
    """One rank of `saguaro bench --tp N`: every target rank runs the benchmark, rank 0 reports it."""
    args.threads = torch.get_num_threads()  # this rank's share of the cores (launch.py)
    args.progress = args.progress and topology.is_leader
    results = benchmark(args)
    if topology.is_leader:
        results["setup"]["tensor_parallel"] = {
            "target_ranks": len(topology.target_ranks),
            "drafter_rank": topology.drafter_rank,
        }
        write_results(results, args)


def write_results(results: dict, args) -> None:
    out = Path(args.out)
    out.write_text(json.dumps(results, indent=2))
    markdown = report.markdown(results)
    out.with_suffix(".md").write_text(markdown)
    written = [out, out.with_suffix(".md")]
    if "runs" in results and report.plot(results, out.with_suffix(".png")):
        written.append(out.with_suffix(".png"))
    print("\n" + markdown)
    print("wrote " + ", ".join(map(str, written)))


if __name__ == "__main__":
    main()
