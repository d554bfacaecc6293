"""What a batched verification costs against its width: `BatchedRunner.forward` of B rows x T tokens on
the demo target (bf16, the prepacked linears saguaro runs on CPU) over ~600-token rows, with
grouped-query attention packed (saguaro/kernels/packed_gqa.py) and without (transformers' "sdpa",
which repeats every key/value head for a few query tokens), side by side in one process.

A speculative round of B rows drafting K tokens costs forward(B, K + 1) against a plain step's
forward(B, 1): how fast that grows decides whether speculation pays at that batch size.

    python benchmarks/verify_width.py [--target DIR] [--rows 1 4] [--widths 1 2 3 5] [--repeats 7]
"""

import argparse
import statistics
import time

import torch
from engine_load import cpu_description
from transformers import AutoModelForCausalLM

from saguaro.bench import demo_models
from saguaro.model.batched_runner import BatchedRunner
from saguaro.model.packed_linear import runnable_target


def forward_seconds(runner: BatchedRunner, rows: int, width: int, repeats: int) -> float:
    """Median seconds of a forward of `width` tokens per row; each is then undone but for one token."""
    times = []
    for _ in range(repeats):
        mark = runner.mark()
        start = time.perf_counter()
        runner.forward([[7] * width for _ in range(rows)])
        times.append(time.perf_counter() - start)
        runner.keep(mark, [1] * rows)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="target model folder (default: the demo pair's)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 2, 3, 5])
    parser.add_argument("--context", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    target = args.target or demo_models.demo_pair_paths()[0]
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.bfloat16).eval()
    model = runnable_target(model, pack=True)
    print("CPU:", cpu_description())
    generator = torch.Generator().manual_seed(0)
    print("| rows | tokens per row | packed GQA ms | sdpa ms | packed / sdpa |")
    print("|---|---|---|---|---|")
    for rows in args.rows:
        packed, plain = BatchedRunner(model), BatchedRunner(model)
        plain.call.packed_gqa = None  # transformers' own "sdpa" for every forward
        prompts = [
            torch.randint(100, 5000, (args.context + 10 * row,), generator=generator).tolist()
            for row in range(rows)
        ]
        packed.prefill(prompts)
        plain.prefill(prompts)
        for width in args.widths:
            # Interleaved, so that a busy moment of the machine weighs on both alike.
            a = b = 0.0
            for _ in range(2):
                a += forward_seconds(packed, rows, width, args.repeats)
                b += forward_seconds(plain, rows, width, args.repeats)
            print(f"| {rows} | {width} | {500 * a:.0f} | {500 * b:.0f} | {a / b:.2f} |", flush=True)


if __name__ == "__main__":
    main()
