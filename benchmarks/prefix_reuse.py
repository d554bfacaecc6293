"""Prefix reuse across calls: time to the first token of a chat's second turn, warm vs cold.

Turn 1 (a long system prompt and a question) runs on a kept `SpeculativeGenerator`; turn 2 sends
the whole conversation again plus a new question. A warm generator reuses the stored KV of turn 1
(prefix_cache, on by default); a cold one (fresh, warmed up on an unrelated prompt so that lazy
initialisation is not timed) prefills everything. Also checks that turn 2's answer is the same.

    python benchmarks/prefix_reuse.py [--target DIR --draft DIR] [--repeats 3]
"""

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import saguaro
from saguaro import demo_models

SYSTEM = "You are a careful senior Python reviewer. " + " ".join(
    f"Rule {i}: prefer clear names, small functions, explicit errors, tests for every branch, "
    "and comments that explain why."
    for i in range(1, 19)
)
QUESTIONS = (
    "Review this function: def add(a, b): return a+b. What would you change?",
    "And how would you test it?",
)


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

    def ids(messages):
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]

    warmup = ids([{"role": "user", "content": "Say hi."}])

    def new_generator():
        generator = saguaro.SpeculativeGenerator(target, draft)
        generator.generate(warmup, max_new_tokens=4)  # lazy initialisation and the draft choice
        return generator

    warm = new_generator()
    turn1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}]
    ids1 = ids(turn1)
    answer = tokenizer.decode(
        warm.generate(ids1, max_new_tokens=48)[0, ids1.shape[1] :], skip_special_tokens=True
    )
    ids2 = ids(turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": QUESTIONS[1]}])
    print(f"turn 1: {ids1.shape[1]} prompt tokens; turn 2: {ids2.shape[1]} (method {warm.method})")
    cold_seconds, warm_seconds = [], []
    for _ in range(args.repeats):
        with new_generator() as cold:
            start = time.perf_counter()
            cold.generate(ids2, max_new_tokens=1)
            cold_seconds.append(time.perf_counter() - start)
        start = time.perf_counter()
        out = warm.generate(ids2, max_new_tokens=1, return_dict_in_generate=True)
        warm_seconds.append(time.perf_counter() - start)
        print(
            f"first token: cold {cold_seconds[-1]:.2f} s, warm {warm_seconds[-1]:.2f} s "
            f"(reused {out.stats.reused_prompt_tokens} of {ids2.shape[1]} prompt tokens)"
        )
    cold_median, warm_median = statistics.median(cold_seconds), statistics.median(warm_seconds)
    ratio = warm_median / cold_median
    print(f"median: cold {cold_median:.2f} s, warm {warm_median:.2f} s, warm/cold {ratio:.2f}")
    with new_generator() as cold:
        same = (
            warm.generate(ids2, max_new_tokens=32).tolist() == cold.generate(ids2, max_new_tokens=32).tolist()
        )
    print(f"turn 2 answer warm == cold: {same}")
    warm.close()


if __name__ == "__main__":
    main()
