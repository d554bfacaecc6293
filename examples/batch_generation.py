"""Batch generation: left-padded prompts of different lengths, one `generate` call.

Each row is decoded exactly as it would be alone (greedy: identical to HF's batched generate);
rows that finish early are padded with pad_token_id, as HF does.

    python examples/batch_generation.py [--target DIR --draft DIR]
"""

from _models import load_pair, parse_args

import saguaro

args = parse_args(__doc__.splitlines()[0])
tokenizer, target, draft, prompts = load_pair(args)
tokenizer.padding_side = "left"  # decoder-only models append after the last token
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
batch = tokenizer(prompts, return_tensors="pt", padding=True)

expected = target.generate(**batch, max_new_tokens=32, do_sample=False)
with saguaro.enable(target, draft_model=draft, method="speculative"):
    out = target.generate(**batch, max_new_tokens=32, do_sample=False)
for row, text in enumerate(
    tokenizer.batch_decode(out[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
):
    print(f"[{row}] {text!r}")
print(f"identical to HF batched generate: {out.tolist() == expected.tolist()}")
