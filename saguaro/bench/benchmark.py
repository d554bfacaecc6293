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

This module is the command line; the run is `measure.py`, the numbers reported from it `summary.py`,
--random-weights `random_weights.py`, the methods `methods.py` and the prompts `workload.py`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from saguaro import launch
from saguaro.bench import demo_models, report
from saguaro.bench.measure import benchmark
from saguaro.bench.methods import (
    FULL_METHODS,
    HF_METHODS,
    QUICK_METHODS,
    SAGUARO_METHODS,
    VARIANTS,
    base_method,
    variants,
)
from saguaro.bench.random_weights import random_weights_benchmark

# What a run does with the arguments left unset; given ones always win. Only --full measures step
# costs (two sweeps over 14 lengths on a 256-token context: most of a full run's time on a CPU).
# Quick's sizes: on a 2-core CPU with native bf16 the run took 65 s (docs/RESULTS.md); without
# native bf16 (docs/results/cpu-bf16.md) a prompt costs these methods about 2 minutes, so with
# loading and warm-up about 5 minutes.
PRESETS = {
    "quick": {"methods": list(QUICK_METHODS), "num_prompts": 2, "max_new_tokens": 24},
    "full": {"methods": list(FULL_METHODS), "num_prompts": 3, "max_new_tokens": 64},
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
