"""Models for the examples: the pair given with --target/--draft, or a tiny random pair built here.

The tiny pair (a 2-layer llama and a slightly perturbed copy, with a word-level tokenizer over
"w0".."w91") lets every example run anywhere in seconds; its text is gibberish, its speculation real.
"""

import argparse

import torch


def parse_args(description: str, **extra) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--target", help="target model folder or hub id (default: a tiny random model)")
    parser.add_argument("--draft", help="draft model sharing the target's tokenizer")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    for flag, kwargs in extra.items():
        parser.add_argument(flag, **kwargs)
    return parser.parse_args()


def load_pair(args, **target_kwargs):
    """(tokenizer, target, draft, prompts): real models when given, else the tiny random pair."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, args.dtype)
    if args.target:
        tokenizer = AutoTokenizer.from_pretrained(args.target)
        target = AutoModelForCausalLM.from_pretrained(args.target, dtype=dtype, **target_kwargs).eval()
        draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=dtype).eval() if args.draft else None
        prompts = [
            "Write a Python function that checks whether a number is prime.",
            "Explain what a hash map is in two sentences.",
            "Summarise: The quick brown fox jumps over the lazy dog. The dog does not react.",
        ]
        return tokenizer, target, draft, prompts
    return tiny_pair(dtype)


def tiny_pair(dtype=torch.float32):
    import copy

    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(92)]
    vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2, "[UNK]": 3, **{w: i + 4 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="<s>",
        eos_token="</s>",
        model_input_names=["input_ids", "attention_mask"],
    )
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    target = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    draft = copy.deepcopy(target)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * 0.003)
    prompts = [" ".join(words[i : i + n]) for i, n in ((0, 6), (30, 11), (60, 3))]
    return tokenizer, target, draft, prompts
