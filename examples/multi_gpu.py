"""Multi-GPU (the Saguaro topology): the target sharded over N ranks with transformers' tensor
parallelism, the drafter on a rank of its own, pre-speculating while the target ranks verify.

With 3 or more GPUs the ranks are GPUs (NCCL): 2 target ranks and the drafter on the third. On a
machine with fewer, the same code runs as 3 CPU processes over gloo. Every rank runs `main`; rank 0
decides each round and the others follow, so all of them return the same tokens.

    python examples/multi_gpu.py [--target DIR --draft DIR]
    torchrun --nproc-per-node 3 examples/multi_gpu.py --target DIR --draft DIR   # the same, by torchrun
"""

import tempfile

import torch
from _models import parse_args, tiny_pair

import saguaro
from saguaro import distributed, launch

TP = 2  # target ranks; one more rank drafts


def main(topology, target_path: str, draft_path: str, dtype: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target_path)
    target = distributed.load_target(target_path, dtype=getattr(torch, dtype)).eval()
    # Rank 0 keeps a copy of the draft: it drafts inline if the drafter rank dies.
    draft = (
        AutoModelForCausalLM.from_pretrained(draft_path, dtype=getattr(torch, dtype)).to(target.device).eval()
    )
    inputs = tokenizer("w0 w1 w2 w3 w4 w5", return_tensors="pt").to(target.device)
    expected = target.generate(**inputs, max_new_tokens=40, do_sample=False)  # plain HF, sharded
    with saguaro.SpeculativeGenerator(target, draft, method="saguaro") as generator:
        out = generator.generate(inputs.input_ids, max_new_tokens=40, return_dict_in_generate=True)
    if topology.is_leader:
        print(
            f"target on ranks {topology.target_ranks} ({target.device}), "
            f"drafter on rank {topology.drafter_rank}"
        )
        print(tokenizer.decode(out.sequences[0, inputs.input_ids.shape[1] :], skip_special_tokens=True))
        print(
            f"identical to HF generate: {out.sequences.tolist() == expected.tolist()}; "
            f"cache hit rate {out.stats.hit_rate:.2f}, "
            f"{out.stats.mean_accepted_length:.2f} tokens per target forward"
        )


if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0])
    if not args.target:  # the tiny random pair, saved where every rank can load it
        folder = tempfile.mkdtemp()
        tokenizer, target, draft, _ = tiny_pair()
        for name, model in (("target", target), ("draft", draft)):
            model.save_pretrained(f"{folder}/{name}")
            tokenizer.save_pretrained(f"{folder}/{name}")
        args.target, args.draft = f"{folder}/target", f"{folder}/draft"
    launch.run_ranks(main, TP, args.draft, args.dtype, args.target, args.draft, args.dtype)
