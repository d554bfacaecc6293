"""Forward cost vs number of new tokens, the quantity every speculative method's speed rests on.

Speculation pays when verifying T tokens costs about as much as generating one. This prints the
median time of one forward over T new tokens (on a 256-token context) for each model and thread
count, so that assumption can be checked on the machine at hand:

    python benchmarks/step_costs.py --models TARGET_DIR DRAFT_DIR --dtype bfloat16
    python benchmarks/step_costs.py --models TARGET_DIR --random-weights --device cuda   # config only
"""

import argparse

import torch
from transformers import AutoModelForCausalLM

from saguaro.tune import step_costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="model folders or hub ids")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 5, 8, 16])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--random-weights", action="store_true", help="build the models from their configs only"
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    for path in args.models:
        if args.random_weights:
            model = step_costs.random_weights_model(path, dtype, args.device)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
        for threads in sorted(set(args.threads)):
            torch.set_num_threads(threads)
            costs = step_costs.forward_costs(model, args.tokens, args.repeats)
            ratios = "  ".join(
                f"T={t}: {costs(t) * 1000:.1f} ms ({costs(t) / costs(args.tokens[0]):.1f}x)"
                for t in args.tokens
            )
            print(f"{path} {args.dtype} {args.device} {threads} thread(s): {ratios}", flush=True)


if __name__ == "__main__":
    main()
