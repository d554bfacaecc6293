"""The `saguaro` command: `saguaro bench ...` (speedup benchmark), `saguaro generate ...` (one answer)."""
from __future__ import annotations

import argparse
import sys

from . import benchmark


def generate_main(argv) -> None:
    parser = argparse.ArgumentParser(prog="saguaro generate", description="Answer one prompt, speculatively.")
    parser.add_argument("prompt", help="the user message (the chat template is applied when the tokenizer has one)")
    parser.add_argument("--target", required=True, help="target model: local folder or hub id")
    parser.add_argument("--draft", help="draft model sharing the target's tokenizer (needed unless autoregressive)")
    parser.add_argument("--method", default="speculative", help="autoregressive or speculative")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--num-speculative-tokens", type=int, default=4, help="draft tokens per round (K)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import saguaro

    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=dtype).eval()
    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=dtype).eval() if args.draft else None
    ids = benchmark.encode(tokenizer, args.prompt)
    out = saguaro.generate(target, ids, draft_model=draft, method=args.method, max_new_tokens=args.max_new_tokens,
                           num_speculative_tokens=args.num_speculative_tokens, do_sample=args.do_sample,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           return_dict_in_generate=True)
    print(tokenizer.decode(out.sequences[0, ids.shape[1] :], skip_special_tokens=True))
    s = out.stats
    print(f"\n[{s.new_tokens} tokens, {s.tokens_per_second:.2f} tok/s, {s.mean_accepted_length:.2f} tokens per "
          f"target forward]", file=sys.stderr)


COMMANDS = {"bench": benchmark.main, "generate": generate_main}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print("usage: saguaro {bench,generate} [--help]\n"
              "  bench     speedup benchmark: HF greedy, HF assisted and saguaro methods side by side\n"
              "  generate  answer one prompt with a chosen method", file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
