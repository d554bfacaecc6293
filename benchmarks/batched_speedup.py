"""Batched generation through the drop-in: HF's batched greedy vs saguaro on the same batch.

A left-padded batch of held-out prompts goes through `model.generate` twice per repeat, in one
process: as HF's own batched greedy, then after `saguaro.enable(model, draft_model=draft,
method=...)` (batched speculative decoding: every live row verified in one target forward per
round). Prints both times, their ratio (median over repeats), how many rows equal HF's rows, and
what the speculation did; then the same batch through saguaro without drafts
(method="autoregressive"), which shows what its runners gain by themselves (prepacked linears).

    python benchmarks/batched_speedup.py [--target DIR --draft DIR] [--batch-size 4]
        [--max-new-tokens 48] [--repeats 1] [--method speculative]
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import saguaro
from saguaro.bench import demo_models
from saguaro.bench.workload import plain_greedy_config

HELDOUT = Path(__file__).resolve().parent / "heldout.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="target model folder (default: the demo pair)")
    parser.add_argument("--draft", help="draft model folder")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--method", default="speculative")
    args = parser.parse_args()
    if not args.target:
        args.target, args.draft = map(str, demo_models.fetch_demo_pair())
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    tokenizer.padding_side = "left"
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.bfloat16).eval()
    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=torch.bfloat16).eval()
    target.generation_config = plain_greedy_config(target)
    prompts = [json.loads(line)["prompt"] for line in HELDOUT.read_text().splitlines() if line.strip()]
    # The held-out prompts in order, cycled for a batch larger than the set.
    chat = [[{"role": "user", "content": prompts[i % len(prompts)]}] for i in range(args.batch_size)]
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chat]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=False)

    # HF's own generate, also while the model is enabled (the instance's generate is saguaro's).
    def hf_generate(**kwargs):
        return type(target).generate(target, **batch, **kwargs)

    # First calls pay for lazy initialisation (and saguaro's draft choice): keep them out of the times.
    hf_generate(max_new_tokens=2, do_sample=False)
    # No prefix reuse: the warm-up sent the same prompts, whose prefill HF has to compute again.
    saguaro.enable(target, draft_model=draft, method=args.method, prefix_cache=False)
    target.generate(**batch, max_new_tokens=8, do_sample=False)
    hf_seconds, saguaro_seconds = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        expected = hf_generate(**options)
        hf_seconds.append(time.perf_counter() - start)
        start = time.perf_counter()
        out = target.generate(**batch, **options, return_dict_in_generate=True)
        saguaro_seconds.append(time.perf_counter() - start)
        width = min(out.sequences.shape[1], expected.shape[1])
        same = sum(a.tolist() == b.tolist() for a, b in zip(out.sequences[:, :width], expected[:, :width]))
        print(
            f"HF batched greedy {hf_seconds[-1]:.1f} s, saguaro {saguaro_seconds[-1]:.1f} s "
            f"({hf_seconds[-1] / saguaro_seconds[-1]:.2f}x); rows equal to HF's: {same}/{len(expected)}; "
            f"new tokens/round per row {out.stats.mean_accepted_length:.2f}",
            flush=True,
        )
        draft = out.stats.draft_configuration
        rounds = " ".join(
            f"{r['drafted']}/{r['accepted']},{r['draft_seconds'] * 1000:.0f},{r['verify_seconds'] * 1000:.0f}"
            for r in out.row_stats[0].round_log
        )
        print(
            f"draft {draft['quantization']}/{draft['vocab_size']}; "
            f"prefill {out.stats.prefill_seconds:.2f} s; "
            f"row 0's rounds (drafted/accepted, draft ms, verify ms): {rounds}",
            flush=True,
        )
    ratio = statistics.median(h / s for h, s in zip(hf_seconds, saguaro_seconds))
    saguaro.disable(target)
    print(f"median speedup over HF batched greedy: {ratio:.2f}x (batch {args.batch_size}, {args.method})")
    # What saguaro's runners gain without drafting (prepacked linears on CPU in bf16, model/packed_linear.py):
    # the same batch as plain batched steps, so the speculation's own share can be read off.
    saguaro.enable(target, method="autoregressive", prefix_cache=False)
    target.generate(**batch, max_new_tokens=2, do_sample=False)
    plain = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        target.generate(**batch, **options)
        plain.append(time.perf_counter() - start)
    saguaro.disable(target)
    plain_seconds = statistics.median(plain)
    plain_ratio = statistics.median(hf_seconds) / plain_seconds
    print(f"saguaro without drafts (method='autoregressive'): {plain_seconds:.1f} s, {plain_ratio:.2f}x HF")


if __name__ == "__main__":
    main()
