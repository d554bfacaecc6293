"""Cost and agreement of the draft's cheap variants (saguaro.draft.compression) on the machine at hand.

Per variant (quantization none / int8 / int4 x full / reduced vocabulary): the median forward over
T new tokens on a 200-token context per thread count, and the teacher-forced top-1 agreement with
the unmodified draft over 200 tokens of code and 200 of prose (this repository's own text). With
--auto, also what draft_quantization="auto" / draft_vocab_size="auto" pick on the code sample.

    python benchmarks/cheap_drafts.py --draft DRAFT_DIR [--threads 1 2] [--vocab 32768] [--auto TARGET_DIR]
"""

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from saguaro.draft.compression import prepare_draft
from saguaro.draft.quantize import compress_draft
from saguaro.tune import step_costs

ROOT = Path(__file__).resolve().parent.parent


def samples(tokenizer, length: int) -> dict[str, list[int]]:
    code = (ROOT / "saguaro" / "verify.py").read_text()
    code = code[code.index("def verify_tree_greedy") :]
    prose = (ROOT / "README.md").read_text()
    return {name: tokenizer(text)["input_ids"][:length] for name, text in (("code", code), ("prose", prose))}


@torch.no_grad()
def top1(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].argmax(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draft", required=True, help="draft model folder")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--vocab", type=int, default=32768, help="reduced vocabulary size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--auto", metavar="TARGET_DIR", help="also run the auto choice against this target")
    args = parser.parse_args()
    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=getattr(torch, args.dtype)).eval()
    texts = samples(AutoTokenizer.from_pretrained(args.draft), 200)
    reference = {name: top1(draft, ids) for name, ids in texts.items()}
    columns = [f"T={t} {n}t" for n in args.threads for t in args.tokens]
    print("| quantization | vocabulary | build s | " + " | ".join(f"{c} ms" for c in columns), end="")
    print(" | agreement code | agreement prose |")
    print("|---" * (len(columns) + 5) + "|")
    for vocab in (None, args.vocab):
        for quantization in (None, "int8", "int4"):
            start = time.perf_counter()
            model = compress_draft(draft, quantization, vocab)
            build = time.perf_counter() - start
            costs = []
            for threads in args.threads:
                torch.set_num_threads(threads)
                curve = step_costs.forward_costs(model, args.tokens, args.repeats, context=200)
                costs += [curve.points[t] * 1e3 for t in args.tokens]
            agree = [
                float((top1(model, ids) == reference[name]).float().mean()) for name, ids in texts.items()
            ]
            print(
                f"| {quantization or 'none'} | {vocab or 'full'} | {build:.1f} | "
                + " | ".join(f"{c:.0f}" for c in costs)
                + f" | {agree[0]:.3f} | {agree[1]:.3f} |",
                flush=True,
            )
    if args.auto:
        target = AutoModelForCausalLM.from_pretrained(args.auto, dtype=draft.dtype).eval()
        for threads in args.threads:
            torch.set_num_threads(threads)
            _, record = prepare_draft(draft, target, "auto", "auto", texts["code"], threads)
            print(f"auto, {threads} threads: {record}")


if __name__ == "__main__":
    main()
