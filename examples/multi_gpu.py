"""Multi-GPU placement: the target sharded over the GPUs with device_map="auto", the drafter on a
GPU of its own (as in the Saguaro paper), drafting in a thread while the target verifies.

Without two GPUs it runs everything on what there is (CPU, or one GPU with the drafter on its own
CUDA stream), so it still shows the calls.

    python examples/multi_gpu.py [--target DIR --draft DIR]
"""

import torch
from _models import load_pair, parse_args

import saguaro

args = parse_args(__doc__.splitlines()[0])
gpus = torch.cuda.device_count()
if gpus >= 2 and args.target:
    # Target on all GPUs but the last; the drafter alone on the last one.
    budget = {i: torch.cuda.get_device_properties(i).total_memory for i in range(gpus - 1)}
    tokenizer, target, draft, prompts = load_pair(args, device_map="auto", max_memory={**budget, gpus - 1: 0})
    draft_device = f"cuda:{gpus - 1}"
    draft = draft.to(draft_device)
else:
    tokenizer, target, draft, prompts = load_pair(args)
    draft_device = "cuda:0" if gpus else "cpu"
    target, draft = target.to(draft_device), draft.to(draft_device)
print(f"target on {target.device}, drafter on {draft_device}")

inputs = tokenizer(prompts[0], return_tensors="pt").to(target.device)
expected = target.generate(**inputs, max_new_tokens=40, do_sample=False)  # plain HF
with saguaro.enable(
    target, draft_model=draft, method="saguaro", placement="thread", draft_device=draft_device
):
    out = target.generate(**inputs, max_new_tokens=40, do_sample=False, return_dict_in_generate=True)
print(tokenizer.decode(out.sequences[0, inputs.input_ids.shape[1] :], skip_special_tokens=True))
print(
    f"identical to HF generate: {out.sequences.tolist() == expected.tolist()}; "
    f"cache hit rate {out.stats.hit_rate:.2f}, {out.stats.mean_accepted_length:.2f} tokens per target forward"
)
