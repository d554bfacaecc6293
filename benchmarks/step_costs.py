"""Forward cost vs number of new tokens, the quantity every speculative method's speed rests on.

Speculation pays when verifying T tokens costs about as much as generating one. This prints the
median time of one forward over T new tokens (on a 300-token context) for each model and thread
count, so that assumption can be checked on the machine at hand:

    python benchmarks/step_costs.py --models TARGET_DIR DRAFT_DIR --dtype bfloat16
"""
import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from saguaro.runner import ModelRunner


def forward_seconds(runner: ModelRunner, new_tokens: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        length = runner.length
        start = time.perf_counter()
        runner.forward(list(range(500, 500 + new_tokens)))
        times.append(time.perf_counter() - start)
        runner.rollback(length)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="model folders or hub ids")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 5, 8, 16])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for path in args.models:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
        for threads in sorted(set(args.threads)):
            torch.set_num_threads(threads)
            runner = ModelRunner(model, capacity=512)
            runner.forward(list(range(100, 400)))  # a context, as in generation
            costs = {t: forward_seconds(runner, t, args.repeats) for t in args.tokens}
            ratios = "  ".join(f"T={t}: {c * 1000:.0f} ms ({c / costs[args.tokens[0]]:.1f}x)" for t, c in costs.items())
            print(f"{path} {args.dtype} {threads} thread(s): {ratios}", flush=True)


if __name__ == "__main__":
    main()
