"""Prefix reuse across calls, measured: time to the first token on a warm generator vs a cold one.

Two scenarios share a long system prompt:
  * "chat turn 2": turn 1 ran on a kept `SpeculativeGenerator`; turn 2 sends the whole conversation
    again plus a new question;
  * "same system prompt": another request (another agent of the same workflow) behind the same
    system prompt, after turn 1 ran on the kept generator.
A warm generator reuses the stored KV (prefix_cache, on by default); a cold one (fresh, warmed up on
an unrelated prompt so that lazy initialisation is not timed) prefills everything. Each scenario also
checks that the warm answer equals the cold one. Used by `saguaro bench --shared-prefix` and
benchmarks/prefix_reuse.py.
"""

from __future__ import annotations

import statistics
import time

SYSTEM = "You are a careful senior Python reviewer. " + " ".join(
    f"Rule {i}: prefer clear names, small functions, explicit errors, tests for every branch, "
    "and comments that explain why."
    for i in range(1, 19)
)
QUESTIONS = (
    "Review this function: def add(a, b): return a+b. What would you change?",
    "And how would you test it?",
)
OTHER_REQUEST = "Review this function: def mean(xs): return sum(xs) / len(xs). What would you change?"


def shared_prefix_benchmark(
    target, draft, tokenizer, repeats: int = 3, answer_tokens: int = 48, check_tokens: int = 32, log=print
) -> list[dict]:
    """One dict per scenario: prompt and reused tokens, cold and warm first-token seconds (medians
    over `repeats`, each with a fresh warm generator that served turn 1 with `answer_tokens`), their
    ratio, and whether warm and cold answers agree over `check_tokens` tokens."""
    from saguaro.api import SpeculativeGenerator

    def ids(messages):
        if not getattr(tokenizer, "chat_template", None):  # a base model's tokenizer: plain text
            return tokenizer("\n".join(m["content"] for m in messages), return_tensors="pt").input_ids
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]

    warmup = ids([{"role": "user", "content": "Say hi."}])
    draft_options = {}  # after the first generator: its draft choice, so later ones skip measuring

    def new_generator():
        generator = SpeculativeGenerator(target, draft, **draft_options)
        generator.generate(warmup, max_new_tokens=4)  # lazy initialisation and the draft choice
        chosen = generator.draft_configuration
        draft_options.update(draft_quantization=chosen.quantization, draft_vocab_size=chosen.vocab_size)
        return generator

    turn1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}]
    first = ids(turn1)

    def warm_generator():
        """A generator that has served turn 1 (prompt and answer), untimed: what a warm one holds."""
        generator = new_generator()
        answer = generator.generate(first, max_new_tokens=answer_tokens)[0, first.shape[1] :]
        return generator, tokenizer.decode(answer, skip_special_tokens=True)

    generator, answer = warm_generator()
    generator.close()
    turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": QUESTIONS[1]}]
    other = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": OTHER_REQUEST}]
    results = []
    for name, prompt in (("chat turn 2", ids(turn2)), ("same system prompt", ids(other))):
        cold_seconds, warm_seconds, reused = [], [], 0
        for _ in range(repeats):  # a fresh warm generator each time: its cache holds turn 1 only
            with new_generator() as cold:
                start = time.perf_counter()
                cold.generate(prompt, max_new_tokens=1)
                cold_seconds.append(time.perf_counter() - start)
            warm = warm_generator()[0]
            with warm:
                start = time.perf_counter()
                out = warm.generate(prompt, max_new_tokens=1, return_dict_in_generate=True)
                warm_seconds.append(time.perf_counter() - start)
            reused = out.stats.reused_prompt_tokens
        warm = warm_generator()[0]
        with warm, new_generator() as cold:
            same = (
                warm.generate(prompt, max_new_tokens=check_tokens).tolist()
                == cold.generate(prompt, max_new_tokens=check_tokens).tolist()
            )
        cold_median, warm_median = statistics.median(cold_seconds), statistics.median(warm_seconds)
        results.append(
            {
                "scenario": name,
                "prompt_tokens": prompt.shape[1],
                "reused_prompt_tokens": reused,
                "cold_first_token_seconds": cold_median,
                "warm_first_token_seconds": warm_median,
                "warm_over_cold": warm_median / cold_median,
                "same_output": same,
            }
        )
        log(
            f"{name}: {prompt.shape[1]} prompt tokens, {reused} reused; first token cold "
            f"{cold_median:.2f} s, warm {warm_median:.2f} s (warm/cold {warm_median / cold_median:.2f}); "
            f"warm answer == cold: {same}"
        )
    return results
