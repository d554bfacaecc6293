"""Where compile=True pays: issue 12's small llama, HF greedy / assisted against saguaro's methods.

A random-weight llama (4 layers, hidden 256, vocabulary 1024, fp32) on one thread, where an eager
forward is mostly Python overhead; the draft is the target's first layer with its embeddings and
head (a layer-skip draft: it agrees with the target often enough to speculate). Three prompts,
96 new tokens each, methods interleaved per repeat; tokens/s is the median over repeats, a ratio
the median of per-repeat ratios; every output is checked against HF greedy. Compile time is
reported apart (the warm-up).

    python benchmarks/compile_speedup.py [--repeats 5] [--methods ...] [--out results.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import transformers

import saguaro

METHODS = (
    "hf_greedy",
    "hf_assisted",
    "autoregressive",
    "autoregressive+compile",
    "speculative",
    "speculative+compile",
    "auto+compile",  # the default method: the fastest by compiled step costs timed at its first call
)


def models():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=None,  # every method generates all 96 tokens
        pad_token_id=0,
    )
    target = transformers.AutoModelForCausalLM.from_config(config).eval()
    target.generation_config.eos_token_id = None
    draft = copy.deepcopy(target)
    draft.model.layers = draft.model.layers[:1]
    draft.config.num_hidden_layers = 1
    return target, draft


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    target, draft = models()
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 1024, (1, n), generator=generator) for n in (20, 30, 40)]
    generators = {
        method: saguaro.SpeculativeGenerator(
            target,
            draft,
            method=method.split("+")[0],
            compile=method.endswith("+compile"),
            prefix_cache=False,  # every call prefills, as HF's do
            draft_quantization=None,
            draft_vocab_size=None,
        )
        for method in args.methods
        if not method.startswith("hf_")
    }

    def run(method: str, ids: torch.Tensor) -> list[int]:
        if method.startswith("hf_"):
            extra = {"assistant_model": draft} if method == "hf_assisted" else {}
            mask = torch.ones_like(ids)
            out = target.generate(
                ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False, **extra
            )
        else:
            out = generators[method].generate(ids, max_new_tokens=args.new_tokens, eos_token_id=[])
        return out[0, ids.shape[1] :].tolist()

    warm_up = {}
    for method in args.methods:  # compiles the graphs, fills lazy state
        start = time.perf_counter()
        for ids in prompts:
            run(method, ids)
        warm_up[method] = time.perf_counter() - start
    seconds = {method: [] for method in args.methods}
    outputs = {}
    for _ in range(args.repeats):
        for method in args.methods:
            start = time.perf_counter()
            outputs[method] = [run(method, ids) for ids in prompts]
            seconds[method].append(time.perf_counter() - start)
    tokens = args.new_tokens * len(prompts)
    rate = {m: tokens / statistics.median(s) for m, s in seconds.items()}

    def ratio(method: str, baseline: str) -> float | None:
        # The median of per-repeat ratios: both ran within moments of each other, on a machine
        # whose speed drifts.
        if baseline not in seconds:
            return None
        return statistics.median(b / s for b, s in zip(seconds[baseline], seconds[method]))

    results = {
        "cpu_threads": 1,
        "torch": torch.__version__,
        "methods": {
            m: {
                "tokens_per_second": rate[m],
                "vs_hf_greedy": ratio(m, "hf_greedy"),
                "vs_hf_assisted": ratio(m, "hf_assisted"),
                "warm_up_seconds": warm_up[m],
                "same_as_hf_greedy": outputs[m] == outputs.get("hf_greedy", outputs[m]),
            }
            for m in args.methods
        },
    }
    print("| method | tok/s | vs HF greedy | vs HF assisted | warm-up s | = HF greedy |")
    print("|---|---|---|---|---|---|")
    for m, row in results["methods"].items():
        ratios = [f"{row[k]:.2f}x" if row[k] else "-" for k in ("vs_hf_greedy", "vs_hf_assisted")]
        print(
            f"| {m} | {row['tokens_per_second']:.0f} | {ratios[0]} | {ratios[1]} "
            f"| {row['warm_up_seconds']:.1f} | {row['same_as_hf_greedy']} |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
