"""Speedup benchmark: HF greedy, HF assisted generation and saguaro's methods, side by side.

All methods run in one process on the same prompts, interleaved per prompt, so the ratios compare
like with like on a machine whose speed drifts. Greedy outputs are checked against HF greedy: in
fp32 they must be identical; in bf16 a kernel's different summation order can flip a near-tie,
and any such mismatch is reported, never hidden.

    saguaro bench --target DIR --draft DIR [--dtype bfloat16] [--num-prompts 3] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from importlib import resources
from pathlib import Path

import torch

HF_METHODS = ("hf_greedy", "hf_assisted")
STAT_KEYS = ("mean_accepted_length", "acceptance_rate", "accepted_histogram", "hit_rate", "prefill_seconds",
             "draft_seconds", "verify_seconds", "drafter_busy_seconds", "rounds", "target_idle_fraction")
DEFAULT_METHODS = HF_METHODS + ("autoregressive", "prompt_lookup", "speculative", "tree", "saguaro")


def load_prompts(path: str | None, limit: int | None) -> list[dict]:
    text = Path(path).read_text() if path else resources.files("saguaro").joinpath("prompts.jsonl").read_text()
    prompts = [json.loads(line) for line in text.splitlines() if line.strip()]
    if limit:
        # Round-robin over kinds so a short run still sees code, chat and summaries.
        kinds = sorted({p["kind"] for p in prompts})
        by_kind = [[p for p in prompts if p["kind"] == k] for k in kinds]
        prompts = [group[i] for i in range(len(prompts)) for group in by_kind if i < len(group)][:limit]
    return prompts


def encode(tokenizer, text: str) -> torch.Tensor:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(text, return_tensors="pt").input_ids
    return ids


def plain_greedy_config(model):
    """The model's generation config with its sampling defaults removed (Qwen ships top_p, top_k,
    repetition_penalty): every method is measured on the same plain greedy decoding."""
    from transformers import GenerationConfig

    old = model.generation_config
    return GenerationConfig(bos_token_id=old.bos_token_id, eos_token_id=old.eos_token_id,
                            pad_token_id=old.pad_token_id if old.pad_token_id is not None else old.eos_token_id)


def run_method(method: str, generators: dict, ids: torch.Tensor, max_new_tokens: int, threads: int):
    """Returns (new token ids, seconds, saguaro stats or {})."""
    # Saguaro's target runs on one core while its drafter process uses another; every other
    # method gets all `threads`.
    torch.set_num_threads(1 if method == "saguaro" else threads)
    start = time.perf_counter()
    if method in HF_METHODS:
        target, draft = generators["models"]
        extra = {"assistant_model": draft} if method == "hf_assisted" else {}
        out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                              do_sample=False, **extra)
        return out[0, ids.shape[1] :].tolist(), time.perf_counter() - start, {}
    result = generators[method].generate(ids, max_new_tokens=max_new_tokens, return_dict_in_generate=True)
    return result.sequences[0, ids.shape[1] :].tolist(), time.perf_counter() - start, result.stats.as_dict()


def benchmark(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import saguaro

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=dtype).eval()
    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=dtype).eval()
    target.generation_config = plain_greedy_config(target)
    draft.generation_config = plain_greedy_config(draft)
    prompts = load_prompts(args.prompts, args.num_prompts)
    methods = args.methods
    generators = {"models": (target, draft)}
    for method in methods:
        if method not in HF_METHODS:
            generators[method] = saguaro.SpeculativeGenerator(
                target, draft, method=method, num_speculative_tokens=args.num_speculative_tokens,
                tree_branching=args.tree_branching)

    warm = encode(tokenizer, "Say hello.")
    for method in methods:  # first calls pay for lazy initialisation; keep that out of the numbers
        run_method(method, generators, warm, 8, args.threads)

    rows = {m: [] for m in methods}
    for i, prompt in enumerate(prompts):
        ids = encode(tokenizer, prompt["prompt"])
        reference = None
        for method in methods:
            tokens, seconds, stats = run_method(method, generators, ids, args.max_new_tokens, args.threads)
            if method == "hf_greedy":
                reference = tokens
            row = {"prompt": i, "kind": prompt["kind"], "new_tokens": len(tokens), "seconds": seconds,
                   "tokens_per_second": len(tokens) / seconds,
                   "matches_hf_greedy": None if reference is None else tokens == reference, **
                   {k: stats[k] for k in STAT_KEYS if k in stats}}
            rows[method].append(row)
            print(f"prompt {i:2d} {prompt['kind']:9s} {method:15s} {row['tokens_per_second']:6.2f} tok/s"
                  + (f"  accepted/round {row['mean_accepted_length']:.2f}" if "mean_accepted_length" in row else "")
                  + (f"  hit rate {row['hit_rate']:.2f}" if method == "saguaro" else "")
                  + ("" if row["matches_hf_greedy"] in (None, True) else "  OUTPUT DIFFERS FROM HF GREEDY"),
                  flush=True)
    for generator in generators.values():
        if isinstance(generator, saguaro.SpeculativeGenerator):
            generator.close()
    return {"setup": setup_description(args), "summary": summarize(rows), "runs": rows}


def summarize(rows: dict[str, list[dict]]) -> dict:
    """Median tokens/s per method, and median per-prompt ratios against the HF baselines."""
    summary = {}
    for method, runs in rows.items():
        entry = {"median_tokens_per_second": statistics.median(r["tokens_per_second"] for r in runs)}
        for base in HF_METHODS:
            if base in rows and base != method:
                ratios = [r["tokens_per_second"] / b["tokens_per_second"] for r, b in zip(runs, rows[base])]
                entry[f"speedup_vs_{base}"] = statistics.median(ratios)
        if "mean_accepted_length" in runs[0]:
            entry["median_accepted_length"] = statistics.median(r["mean_accepted_length"] for r in runs)
        if "hit_rate" in runs[0] and method == "saguaro":
            entry["median_hit_rate"] = statistics.median(r["hit_rate"] for r in runs)
        checked = [r["matches_hf_greedy"] for r in runs if r["matches_hf_greedy"] is not None]
        if checked:
            entry["outputs_matching_hf_greedy"] = f"{sum(checked)}/{len(checked)}"
        summary[method] = entry
    return summary


def setup_description(args) -> dict:
    import transformers

    return {"target": args.target, "draft": args.draft, "dtype": args.dtype, "threads": args.threads,
            "max_new_tokens": args.max_new_tokens, "num_speculative_tokens": args.num_speculative_tokens,
            "tree_branching": args.tree_branching,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "machine": f"{cpu_model()} ({platform.machine()}, {os.cpu_count()} logical CPUs)"}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def print_table(summary: dict) -> None:
    print(f"\n{'method':15s} {'tok/s':>7s} {'vs HF greedy':>13s} {'vs HF assisted':>15s} {'acc. len':>9s} "
          f"{'=HF greedy':>11s} {'hit rate':>9s}")
    for method, s in summary.items():
        cells = [f"{s['median_tokens_per_second']:7.2f}"]
        for key in ("speedup_vs_hf_greedy", "speedup_vs_hf_assisted"):
            cells.append(f"{s[key]:.2f}x" if key in s else "-")
        cells.append(f"{s['median_accepted_length']:.2f}" if "median_accepted_length" in s else "-")
        cells.append(s.get("outputs_matching_hf_greedy", "-"))
        cells.append(f"{s['median_hit_rate']:.2f}" if "median_hit_rate" in s else "-")
        print(f"{method:15s} {cells[0]} {cells[1]:>13s} {cells[2]:>15s} {cells[3]:>9s} {cells[4]:>11s} {cells[5]:>9s}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="target model: local folder or hub id")
    parser.add_argument("--draft", required=True, help="draft model sharing the target's tokenizer")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                        help=f"methods to run, in order (default: {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--prompts", help="JSONL file with {'kind', 'prompt'} per line (default: the shipped set)")
    parser.add_argument("--num-prompts", type=int, default=3, help="how many prompts to run (0 = all)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--num-speculative-tokens", type=int, default=4, help="draft tokens per round (K)")
    parser.add_argument("--tree-branching", type=int, nargs="+", default=[2, 2, 1, 1],
                        help="children per node at each depth, for method 'tree'")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--out", default="results.json", help="where to write the JSON results")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="saguaro bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    missing = [m for m in args.methods if m not in DEFAULT_METHODS]
    if missing:
        parser.error(f"unknown method(s) {missing}; choose from {list(DEFAULT_METHODS)}")
    results = benchmark(args)
    print_table(results["summary"])
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
