"""Tensor-parallel check for a machine with several GPUs (benchmarks/gpu_check.sh runs it).

A random-weight Llama-shaped target sharded over --tp ranks, its drafter on one more rank (the
Saguaro topology): each method's greedy output against HF's own greedy generate on the same
sharded target, and its tokens/s, accepted tokens per round and Saguaro hit rate. The draft is the
target's first layers (shared embeddings and head), so it agrees with the target some of the time
even with random weights. On CPU (gloo) it runs as well, with --small.

    python benchmarks/tp_check.py --tp 2 --out tp.json [--small]
"""

import argparse
import json
import statistics
import tempfile
import time

import torch

import saguaro
from saguaro import distributed, launch

METHODS = ("autoregressive", "speculative", "tree", "saguaro")


def build_pair(folder: str, small: bool) -> tuple[str, str]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    if not small:  # Llama-3.2-1B-like, a vocabulary of 32000
        shape = dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
        )
    config = LlamaConfig(**shape, vocab_size=32000, tie_word_embeddings=True)
    torch.manual_seed(0)
    target = AutoModelForCausalLM.from_config(config)
    draft_config = LlamaConfig(**{**config.to_dict(), "num_hidden_layers": 2})
    draft = AutoModelForCausalLM.from_config(draft_config)
    draft.load_state_dict(target.state_dict(), strict=False)  # the target's first two layers
    target.save_pretrained(f"{folder}/target")
    draft.save_pretrained(f"{folder}/draft")
    return f"{folder}/target", f"{folder}/draft"


def main(topology, target_path: str, draft_path: str, out: str, repeats: int) -> None:
    from transformers import AutoModelForCausalLM

    target = distributed.load_target(target_path, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_path, dtype=torch.float32).to(target.device).eval()
    ids = torch.randint(4, 32000, (1, 64), generator=torch.Generator().manual_seed(1)).to(target.device)
    expected = target.generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=None)[0].tolist()
    results = {"target_ranks": topology.target_ranks, "drafter_rank": topology.drafter_rank, "methods": {}}
    for method in METHODS:
        with saguaro.SpeculativeGenerator(
            target, draft, method=method, speculation_schedule="constant"
        ) as gen:
            gen.generate(ids, max_new_tokens=8, eos_token_id=[])  # warm-up
            runs = []
            for _ in range(repeats):
                start = time.perf_counter()
                result = gen.generate(ids, max_new_tokens=64, eos_token_id=[], return_dict_in_generate=True)
                runs.append((time.perf_counter() - start, result))
        seconds = statistics.median(s for s, _ in runs)
        stats = runs[-1][1].stats
        results["methods"][method] = {
            "identical_to_hf_greedy": all(r.sequences[0].tolist() == expected for _, r in runs),
            "tokens_per_second": 64 / seconds,
            "accepted_per_round": stats.mean_accepted_length,
            "hit_rate": stats.hit_rate if method == "saguaro" else None,
        }
    if topology.is_leader:
        print(json.dumps(results, indent=2))
        with open(out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2, help="target ranks (one more rank drafts)")
    parser.add_argument("--out", default="tp_check.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="a tiny model (a CPU run)")
    args = parser.parse_args()
    target_path, draft_path = build_pair(tempfile.mkdtemp(), args.small)
    launch.run_ranks(main, args.tp, draft_path, "float32", target_path, draft_path, args.out, args.repeats)
