"""Benchmark results as a Markdown report and a PNG plot (tokens/s per method, accepted lengths)."""

from __future__ import annotations

from pathlib import Path

BATCH_MARK = "@batch"  # in a results key: speculative@batch4 is speculative on batches of 4 prompts


def _cell(value, fmt: str, unit: str = "") -> str:
    return "-" if value is None else format(value, fmt) + unit


def _rounds(summary: dict) -> list[str]:
    """Where each speculative method's time goes, per round."""
    rows = {m: s for m, s in summary.items() if "tokens_per_round" in s}
    if not rows:
        return []
    lines = [
        "",
        "## Rounds (medians over runs)",
        "",
        "| method | tokens/round | target wait/round | drafter busy/round | wait share of decode | chose |",
        "|---|---|---|---|---|---|",
    ]
    for method, s in rows.items():
        lines.append(
            f"| {method} | {s['tokens_per_round']:.2f} | {s['wait_seconds_per_round'] * 1000:.0f} ms "
            f"| {s['drafter_busy_seconds_per_round'] * 1000:.0f} ms | {s['wait_fraction_of_decode']:.0%} "
            f"| {', '.join(s.get('chosen_methods', [])) or '-'} |"
        )
    return lines


def _drafts(summary: dict) -> list[str]:
    """The draft each method ran, as draft_quantization / draft_vocab_size chose it."""
    rows = {m: s["draft_configuration"] for m, s in summary.items() if s.get("draft_configuration")}
    if not rows:
        return []
    lines = [
        "",
        "## Draft configuration (quantization / vocabulary; step = one-token draft forward)",
        "",
        "| method | draft | drafter threads | chosen by | step | plain bf16 step | agreement with plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, d in rows.items():
        step, plain = d["step_seconds"], d["plain_step_seconds"]
        lines.append(
            f"| {method} | {d['variant']} | {d['threads'] or 'all'} | {d['chosen_by']} "
            f"| {_cell(step and step * 1000, '.0f', ' ms')} | {_cell(plain and plain * 1000, '.0f', ' ms')} "
            f"| {_cell(d['agreement_with_plain'], '.2f')} |"
        )
    return lines


def markdown(results: dict) -> str:
    setup = results["setup"]
    lines = [f"# saguaro bench: {setup.get('mode', 'measured')}", ""]
    lines += [f"- {key}: {value}" for key, value in setup.items() if key != "mode"]
    if "summary" in results:
        lines += [
            "",
            "## Speed (median over prompts x repeats; quartiles in brackets)",
            "",
            "| method | tok/s | vs HF greedy | vs HF assisted | accepted/round | hit rate | = HF greedy "
            "| bandwidth used | cost model tok/s (error) | peak memory |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for method, s in results["summary"].items():
            low, high = s["quartiles_tokens_per_second"]
            lines.append(
                f"| {method} | {s['median_tokens_per_second']:.2f} [{low:.2f}-{high:.2f}] "
                f"| {_cell(s.get('speedup_vs_hf_greedy'), '.2f', 'x')} "
                f"| {_cell(s.get('speedup_vs_hf_assisted'), '.2f', 'x')} "
                f"| {_cell(s.get('median_accepted_length'), '.2f')} "
                f"| {_cell(s.get('median_hit_rate'), '.2f')} "
                f"| {s.get('outputs_matching_hf_greedy', '-')} | {s['bandwidth_fraction']:.0%} "
                f"| {_prediction(s)} | {_cell(s.get('peak_memory_gib'), '.1f', ' GiB')} |"
            )
        if any(BATCH_MARK in method for method in results["summary"]):
            lines += [
                "",
                f"method{BATCH_MARK}N: N prompts per call (left-padded), tok/s over all rows; its ratios are "
                "against HF's batched greedy on the same batches.",
            ]
        lines += _rounds(results["summary"])
        lines += _drafts(results["summary"])
        lines += [
            "",
            "Bandwidth used: target bytes x tokens/s / measured copy bandwidth (gpt-fast's measure; "
            "above 100% only by verifying several tokens per weight read).",
            "Cost model: each run's time predicted from the step costs below and the forwards the run made."
            if "step_costs" in results
            else "Quick run: no step costs, cost-model check or projections (`saguaro bench --full`).",
        ]
    if results.get("shared_prefix"):
        lines += _shared_prefix(results["shared_prefix"])
    if "step_costs" in results:
        lines += _step_costs(results)
    if results.get("observed_verify_seconds"):
        lines += ["", "Verify time inside the runs (median per verified tokens):", ""]
        for method, by_tokens in results["observed_verify_seconds"].items():
            lines.append(
                f"- {method}: " + ", ".join(f"T={t}: {v * 1000:.0f} ms" for t, v in by_tokens.items())
            )
    if results.get("tree_verify_seconds"):
        lines += ["", "## Tree verification, seconds per target forward (root + tree)", ""]
        for backend, by_tree in results["tree_verify_seconds"].items():
            lines.append(f"- {backend}: " + ", ".join(f"{t}: {v * 1000:.2f} ms" for t, v in by_tree.items()))
    if "projection" in results:
        lines += _projection(results["projection"])
    return "\n".join(lines) + "\n"


def _shared_prefix(scenarios: list[dict]) -> list[str]:
    """Prefix reuse across calls: first-token time on a warm generator vs a cold one."""
    lines = [
        "",
        "## Prefix reuse across calls (time to first token, median)",
        "",
        "| scenario | prompt tokens | reused | cold | warm | warm/cold | warm answer = cold |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in scenarios:
        lines.append(
            f"| {s['scenario']} | {s['prompt_tokens']} | {s['reused_prompt_tokens']} "
            f"| {s['cold_first_token_seconds']:.2f} s | {s['warm_first_token_seconds']:.2f} s "
            f"| {s['warm_over_cold']:.2f} | {s['same_output']} |"
        )
    return lines


def _prediction(s: dict) -> str:
    if "predicted_tokens_per_second" not in s:
        return "-"
    return f"{s['predicted_tokens_per_second']:.2f} ({s['prediction_error']:+.0%})"


def _step_costs(results: dict) -> list[str]:
    costs = results["step_costs"]
    names = list(costs)
    lengths = sorted({int(t) for curve in costs.values() for t in curve})
    lines = ["", "## Step costs: seconds of one forward over T new tokens (x = multiple of T=1)", ""]
    if results.get("step_cost_drift"):
        lines += [
            "Measured before and after the runs on a 256-token context, averaged; one-token cost after / "
            "before: " + ", ".join(f"{k} {v:.2f}" for k, v in results["step_cost_drift"].items()) + ".",
            "",
        ]
    lines += ["| T | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for t in lengths:
        cells = []
        for name in names:
            curve = costs[name]
            value = curve.get(str(t))
            cells.append("-" if value is None else f"{value * 1000:.1f} ms ({value / curve['1']:.1f}x)")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return lines


def _projection(p: dict) -> list[str]:
    lines = [
        "",
        "## Cost-model projection (decode only, no prefill)",
        "",
        f"Acceptance per position: {', '.join(f'{a:.2f}' for a in p['acceptance_per_position'])}; "
        f"cache hit rate {p['hit_rate']:.2f}. Autoregressive: {p['autoregressive']:.2f} tok/s.",
        "",
        "| method | "
        + " | ".join(f"K={k}" for k in p["speculative"]["tokens_per_second_by_k"])
        + " | best K |",
        "|---" * (len(p["speculative"]["tokens_per_second_by_k"]) + 2) + "|",
    ]
    for method in ("speculative", "saguaro"):
        by_k = p[method]["tokens_per_second_by_k"]
        lines.append(
            f"| {method} | " + " | ".join(f"{v:.2f}" for v in by_k.values()) + f" | {p[method]['best_k']} |"
        )
    return lines


def plot(results: dict, path: Path) -> bool:
    """Tokens/s per method (median, quartile bars) and accepted-length histograms.

    False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    summary = results["summary"]
    methods = list(summary)
    fig, (speed, accepted) = plt.subplots(1, 2, figsize=(13, 4.5))
    medians = [summary[m]["median_tokens_per_second"] for m in methods]
    low = [m - summary[name]["quartiles_tokens_per_second"][0] for m, name in zip(medians, methods)]
    high = [summary[name]["quartiles_tokens_per_second"][1] - m for m, name in zip(medians, methods)]
    speed.bar(methods, medians, yerr=[low, high], capsize=3, color="tab:green")
    speed.set_ylabel("tokens/s (median, quartiles)")
    speed.set_title(f"{Path(results['setup']['target']).name}, {results['setup']['dtype']}")
    speed.set_xticks(range(len(methods)), methods, rotation=40, ha="right", rotation_mode="anchor")
    for m in methods:
        histogram = summary[m].get("accepted_histogram")
        if histogram and sum(histogram) and len(histogram) > 1:
            total = sum(histogram)
            accepted.plot(
                range(len(histogram)),
                [c / total for c in histogram],
                marker="o",
                label=f"{m} ({total} rounds)",
            )
    accepted.set_xlabel("draft tokens accepted in a round")
    accepted.set_ylabel("share of rounds that drafted")
    accepted.xaxis.set_major_locator(MaxNLocator(integer=True))
    accepted.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
