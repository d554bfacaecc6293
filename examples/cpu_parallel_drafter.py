"""Saguaro on a CPU: the drafter runs in its own process (its own core) and pre-drafts the next
round for the likely verification outcomes while the target verifies.

    python examples/cpu_parallel_drafter.py [--target DIR --draft DIR]
"""

import torch
from _models import load_pair, parse_args

import saguaro

args = parse_args(__doc__.splitlines()[0])
tokenizer, target, draft, prompts = load_pair(args)
torch.set_num_threads(1)  # the target keeps one core; the drafter process takes another

# One generator for many calls: the worker process starts once and stops with the `with` block.
with saguaro.SpeculativeGenerator(target, draft, method="saguaro", placement="process") as generator:
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = generator.generate(ids, max_new_tokens=48, return_dict_in_generate=True)
        s = out.stats
        print(
            f"{s.new_tokens} tokens, {s.tokens_per_second:.1f} tok/s, cache hit rate {s.hit_rate:.2f}, "
            f"{s.mean_accepted_length:.2f} tokens per target forward, "
            f"target idle {s.target_idle_fraction:.0%}, "
            f"drafter idle {s.drafter_idle_fraction:.0%}"
        )
print("worker stopped:", generator.drafts.worker is None)
