"""Quickstart: one line makes `model.generate` speculative; the output stays the target's own.

python examples/quickstart.py [--target DIR --draft DIR]
"""

from _models import load_pair, parse_args

import saguaro

args = parse_args(__doc__.splitlines()[0])
tokenizer, target, draft, prompts = load_pair(args)
inputs = tokenizer(prompts[0], return_tensors="pt")

expected = target.generate(**inputs, max_new_tokens=40, do_sample=False)  # plain HF
saguaro.enable(target, draft_model=draft, method="speculative")  # the one-line switch
out = target.generate(**inputs, max_new_tokens=40, do_sample=False, return_dict_in_generate=True)
saguaro.disable(target)

print(tokenizer.decode(out.sequences[0, inputs.input_ids.shape[1] :], skip_special_tokens=True))
print(
    f"identical to HF generate: {out.sequences.tolist() == expected.tolist()}; "
    f"{out.stats.mean_accepted_length:.2f} tokens per target forward, {out.stats.tokens_per_second:.1f} tok/s"
)
