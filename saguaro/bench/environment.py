"""What a results file says it was measured on: the run's options, the library versions, the machine."""

from __future__ import annotations

import os
import platform

import torch


def setup_description(args, target_bytes: int, bandwidth: float) -> dict:
    import transformers

    from saguaro.api import DEFAULT_DEPTH

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
