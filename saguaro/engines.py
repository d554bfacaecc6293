"""Decoding loops. Each takes a prompt and returns the new token ids, exactly as the target alone
would produce them (greedy) or distributed as the target alone would sample them.

Round structure of `speculative` (positions are explicit: the target cache holds the committed
sequence minus its last token `token`, which every round feeds first):
    drafts  = drafter.propose(k)                       # d_1..d_k continuing ... token
    logits  = target.forward([token, d_1..d_k])         # p_1..p_{k+1}, one forward
    n, next = verify(...)                               # accept d_1..d_n, then the target's `next`
    target keeps token, d_1..d_n; `next` becomes the new `token`
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .drafters import Drafter
from .runner import ModelRunner
from .sampling import TokenSampler, pad_vocab
from .stats import GenerationStats
from .verify import one_hot_probs, verify_greedy, verify_sampled


@dataclass(frozen=True)
class StopRule:
    max_new_tokens: int
    eos_token_ids: frozenset[int] = frozenset()

    def remaining(self, generated: list[int]) -> int:
        return self.max_new_tokens - len(generated)

    def finished(self, generated: list[int]) -> bool:
        return self.remaining(generated) <= 0 or bool(self.eos_token_ids.intersection(generated))

    def trim(self, generated: list[int]) -> list[int]:
        """Cut after the first end-of-sequence token and at max_new_tokens."""
        for i, token in enumerate(generated[: self.max_new_tokens]):
            if token in self.eos_token_ids:
                return generated[: i + 1]
        return generated[: self.max_new_tokens]


def autoregressive(
    target: ModelRunner, prompt: list[int], sampler: TokenSampler, stop: StopRule, stats: GenerationStats
) -> list[int]:
    """The baseline: one target forward per token, on the same runner as every other method."""
    start = time.perf_counter()
    logits = target.forward(prompt, last_only=True)[-1]
    stats.prefill_seconds = time.perf_counter() - start
    generated = [sampler.choose(logits)]
    while not stop.finished(generated):
        logits = target.forward(generated[-1:])[-1]
        generated.append(sampler.choose(logits))
        stats.record_round(0, 0)
    stats.verify_seconds = time.perf_counter() - start - stats.prefill_seconds
    return stop.trim(generated)


def speculative(
    target: ModelRunner,
    drafter: Drafter,
    prompt: list[int],
    sampler: TokenSampler,
    stop: StopRule,
    stats: GenerationStats,
    num_speculative_tokens: int,
) -> list[int]:
    """Chain speculative decoding: the drafter proposes k tokens, the target checks them in one forward."""
    start = time.perf_counter()
    logits = target.forward(prompt, last_only=True)[-1]
    stats.prefill_seconds = time.perf_counter() - start
    generated = [sampler.choose(logits)]
    drafter.reset(prompt + generated)
    while not stop.finished(generated):
        # Never draft past max_new_tokens: a round emits at most k + 1 tokens.
        k = min(num_speculative_tokens, stop.remaining(generated) - 1)
        tick = time.perf_counter()
        proposal = drafter.propose(k)
        tock = time.perf_counter()
        base = target.length
        logits = target.forward([generated[-1], *proposal.tokens.tolist()])
        accepted, next_token = verify_proposal(logits, proposal.tokens, proposal.probs, sampler)
        target.rollback(base + 1 + accepted)
        drafter.commit(accepted, next_token)
        generated += proposal.tokens[:accepted].tolist() + [next_token]
        stats.draft_seconds += tock - tick
        stats.verify_seconds += time.perf_counter() - tock
        stats.record_round(len(proposal.tokens), accepted)
    return stop.trim(generated)


def verify_proposal(
    target_logits: torch.Tensor, tokens: torch.Tensor, draft_probs: torch.Tensor | None, sampler: TokenSampler
) -> tuple[int, int]:
    """Greedy or sampled chain verification of `tokens` against target logits [k+1, V]."""
    if sampler.greedy:
        return verify_greedy(target_logits, tokens)
    p = sampler.probs(target_logits)
    q = one_hot_probs(tokens, p.shape[-1]) if draft_probs is None else draft_probs
    width = max(p.shape[-1], q.shape[-1])
    return verify_sampled(pad_vocab(p, width), pad_vocab(q.to(p.device), width), tokens, sampler)
