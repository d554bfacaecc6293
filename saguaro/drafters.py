"""Drafters: whatever proposes the tokens the target then verifies.

A drafter follows the committed sequence through three calls:
  reset(tokens)          - a new sequence, all of `tokens` committed;
  propose(k)             - k draft tokens continuing the committed sequence, with the distribution
                           each was drawn from (None for a deterministic proposal);
  commit(accepted, next) - the first `accepted` drafts were kept, then `next` was emitted.
The engines never look inside; later drafters (prompt lookup, the Saguaro pool) plug in here.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from .runner import ModelRunner
from .sampling import TokenSampler


@dataclass
class Proposal:
    tokens: torch.Tensor  # [k] token ids
    probs: torch.Tensor | None  # [k, V]: what tokens[i] was drawn from; None = deterministic


class Drafter(ABC):
    @abstractmethod
    def reset(self, tokens: list[int]) -> None: ...

    @abstractmethod
    def propose(self, num_tokens: int) -> Proposal: ...

    @abstractmethod
    def commit(self, accepted: int, next_token: int) -> None: ...


class ModelDrafter(Drafter):
    """Drafts autoregressively with a small causal LM, reusing its KV cache across rounds.

    Its cache always holds a prefix of committed tokens, then the drafts fed during the last
    propose(); commit() rolls back to the drafts that survived and feeds the rest next time.
    """

    def __init__(self, model, sampler: TokenSampler, vocab_size: int | None = None, capacity: int = 256):
        self.runner = ModelRunner(model, capacity)
        self.sampler = sampler
        # Ids the target cannot emit (a draft embedding padded beyond the target's) are never
        # proposed: they could only be rejected. q is then the distribution over the rest.
        self.vocab_size = vocab_size
        self.committed: list[int] = []
        self._last: list[int] = []

    def reset(self, tokens: list[int]) -> None:
        self.runner.reset()
        self.committed = list(tokens)
        self._last = []

    def propose(self, num_tokens: int) -> Proposal:
        self._last = []
        if num_tokens == 0:
            return Proposal(torch.empty(0, dtype=torch.long), None)
        pending = self.committed[self.runner.length :]
        logits = self.runner.forward(pending, last_only=True)[-1, : self.vocab_size]
        tokens, probs = [], []
        for i in range(num_tokens):
            if self.sampler.greedy:
                token = int(logits.argmax(-1))
            else:
                dist = self.sampler.probs(logits)
                token = int(self.sampler.draw(dist))
                probs.append(dist)
            tokens.append(token)
            if i + 1 < num_tokens:  # the last draft is fed next round, once we know it survived
                logits = self.runner.forward([token])[-1, : self.vocab_size]
        self._last = tokens
        return Proposal(torch.tensor(tokens), torch.stack(probs) if probs else None)

    def commit(self, accepted: int, next_token: int) -> None:
        # The cache holds the committed tokens, then drafts 1..k-1: keep the accepted ones.
        self.runner.rollback(len(self.committed) + accepted)
        self.committed += self._last[:accepted] + [next_token]
        self._last = []
