"""Decoding loops. Each takes a prompt and returns the new token ids, exactly as the target alone
would produce them (greedy) or distributed as the target alone would sample them.

Round structure of `speculative` (positions are explicit: the target cache holds the committed
sequence minus its last token `token`, which every round feeds first, as the root of the tree):
    draft      = drafter.propose(k)                    # a tree (or chain) of depth <= k
    logits     = target.forward([token, *draft])        # the root and every node, one forward
    path, next = verify(...)                            # accepted nodes, then the target's `next`
    target keeps token + the path's entries; `next` becomes the new `token`
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .drafters import Drafter, Proposal
from .runner import ModelRunner
from .sampling import TokenSampler, pad_vocab
from .stats import GenerationStats
from .workers import WorkerFailed
from .tree import TokenTree
from .verify import one_hot_probs, verify_tree_greedy, verify_tree_sampled


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
    max_depth: int,
) -> list[int]:
    """Speculative decoding: the drafter proposes a chain or tree, the target checks it in one forward."""
    start = time.perf_counter()
    logits = target.forward(prompt, last_only=True)[-1]
    stats.prefill_seconds = time.perf_counter() - start
    generated = [sampler.choose(logits)]
    drafter.reset(prompt + generated)
    while not stop.finished(generated):
        # Never draft past max_new_tokens: a round emits at most depth + 1 tokens.
        tick = time.perf_counter()
        proposal = drafter.propose(min(max_depth, stop.remaining(generated) - 1))
        tock = time.perf_counter()
        base = target.length
        logits = target.forward([generated[-1], *proposal.tokens.tolist()], proposal.tree.under_root())
        path, next_token = verify_proposal(logits, proposal, sampler)
        target.commit_path(base, [0] + [1 + node for node in path])
        drafter.commit(path, next_token)
        generated += proposal.tokens[path].tolist() + [next_token]
        stats.draft_seconds += tock - tick
        stats.verify_seconds += time.perf_counter() - tock
        stats.record_round(len(proposal.tokens), len(path))
    return stop.trim(generated)


def verify_proposal(target_logits: torch.Tensor, proposal: Proposal, sampler: TokenSampler) -> tuple[list[int], int]:
    """Greedy or sampled verification of a proposal against target logits [1 + T, V]."""
    if sampler.greedy:
        return verify_tree_greedy(target_logits, proposal.tokens, proposal.tree)
    p = sampler.probs(target_logits)
    q = proposal.probs
    if q is None:
        q = one_hot_probs(proposal.tokens, max([p.shape[-1], *(proposal.tokens + 1).tolist()]))
    width = max(p.shape[-1], q.shape[-1])
    p, q = pad_vocab(p, width), pad_vocab(q.to(p.device), width)
    return verify_tree_sampled(p, q, proposal.tokens, proposal.tree, sampler)


def saguaro(
    target: ModelRunner,
    worker,
    prompt: list[int],
    sampler: TokenSampler,
    stop: StopRule,
    stats: GenerationStats,
    fallback,
) -> list[int]:
    """Speculative speculative decoding: the next draft was prepared while the target verified.

    `worker` (a workers.DraftWorker) hands over a draft for the committed sequence and, after each
    verification, the next one: from its speculation cache on a hit, drafted afresh on a miss.
    If it fails, `fallback()` returns an inline worker, reset to the committed sequence, and
    generation goes on with no token lost: the target's state never depends on the worker.
    """
    start = time.perf_counter()
    logits = target.forward(prompt, last_only=True)[-1]
    stats.prefill_seconds = time.perf_counter() - start
    generated = [sampler.choose(logits)]
    seed = int(torch.randint(0, 2**62, (), generator=sampler.generator))  # the drafter's own RNG

    def ask(call, *args):
        nonlocal worker
        tick = time.perf_counter()
        try:
            draft = call(worker)(*args)
        except WorkerFailed:
            stats.worker_failures += 1
            worker = fallback()
            draft = worker.reset(prompt + generated, sampler.config, seed)
        stats.draft_seconds += time.perf_counter() - tick  # time the target waited for a draft
        stats.drafter_busy_seconds += draft.busy_seconds
        return draft

    draft = ask(lambda w: w.reset, prompt + generated, sampler.config, seed)
    while not stop.finished(generated):
        depth = min(len(draft.tokens), stop.remaining(generated) - 1)
        tree = TokenTree.chain(depth)
        probs = None if draft.probs is None else draft.probs[:depth]
        proposal = Proposal(torch.tensor(draft.tokens[:depth], dtype=torch.long), probs, tree)
        tick = time.perf_counter()
        base = target.length
        logits = target.forward([generated[-1], *draft.tokens[:depth]], tree.under_root())
        path, next_token = verify_proposal(logits, proposal, sampler)
        target.rollback(base + 1 + len(path))
        verify_seconds = time.perf_counter() - tick
        stats.verify_seconds += verify_seconds
        stats.record_round(depth, len(path), draft.source)
        generated += draft.tokens[: len(path)] + [next_token]
        if not stop.finished(generated):
            draft = ask(lambda w: w.resolve, len(path), next_token, verify_seconds)
    return stop.trim(generated)
