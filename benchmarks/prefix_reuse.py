"""Prefix reuse across calls: time to the first token of a chat's second turn, and of another
request behind the same system prompt, on a warm generator vs a cold one, with the same output
(the logic lives in saguaro/bench/prefix_scenarios.py, which `saguaro bench --shared-prefix` also runs).

    python benchmarks/prefix_reuse.py [--target DIR --draft DIR] [--repeats 3]
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from saguaro.bench import demo_models
from saguaro.bench.prefix_scenarios import shared_prefix_benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="target model folder (default: the demo pair)")
    parser.add_argument("--draft", help="draft model folder")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not args.target:
        args.target, args.draft = map(str, demo_models.fetch_demo_pair())
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.bfloat16).eval()
    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=torch.bfloat16).eval()
    shared_prefix_benchmark(target, draft, tokenizer, args.repeats)


if __name__ == "__main__":
    main()
