"""The numbers `saguaro bench` reports from its runs: per method medians, spreads and speedups,
per-round times, verify times, and the cost model's tokens/s projected per draft length."""

from __future__ import annotations

import statistics

from saguaro.bench.methods import HF_METHODS, base_method, batch_suffix
from saguaro.decode.stats import add_counts
from saguaro.tune import cost_model


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
