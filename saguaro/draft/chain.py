"""A chain of drafts from the draft model: draw a token from a position's distribution, feed it, draw
the next. The one loop of the inline drafter (`ModelDrafter`, a chain round) and of Saguaro's
pre-speculator (a fresh draft after a reset, a catch-up or a miss; ssd/prespeculation.py).

Each token stays on the drafter's device and is fed back as a tensor; the host reads the chain
once at the end, with the flags that say whether every q was finite (`check_drafted`), so a GPU
drafts without waiting per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saguaro.decode.sampling import TokenSampler, check_drafted, drawable


@dataclass
class Chain:
    tokens: list[int]
    position_probs: list[torch.Tensor]  # the drafter's q [V] at each drafted position
    drawn_from: torch.Tensor | None  # [len, V]: the distribution each token was drawn from; None greedy


def draft_chain(
    runner,
    logits: torch.Tensor,
    length: int,
    sampler: TokenSampler,
    draw,
    vocab_size: int | None = None,
    finite: list[torch.Tensor] | None = None,
) -> Chain:
    """`length` drafts continuing `runner`'s sequence, whose next-token logits are `logits` [1, V].

    At each position q = the sampler's probabilities over the first `vocab_size` ids (a non-finite
    q is drawn from as uniform and reported at the read: a broken draft must not break the draw);
    `draw(q)` returns the token [1] and the distribution it was drawn from (None when greedy).
    `finite`: flags of earlier, unread distributions (from `drawable`), read with these tokens and
    extended in place. The last draft is not fed: it is fed next round, once its fate is known.
    """
    finite = [] if finite is None else finite
    tokens, position_probs, drawn_from = [], [], []
    for depth in range(length):
        q, ok = drawable(sampler.probs(logits[..., :vocab_size]))
        finite.append(ok)
        token, drawn = draw(q)
        tokens.append(token.reshape(1))
        position_probs.append(q[0])
        drawn_from.append(drawn)
        if depth + 1 < length:
            # The newest draft sees the committed context and the drafts before it: a plain step.
            logits = runner.forward(tokens[-1])
    read = check_drafted(tokens, finite)  # the chain's one host read
    greedy = not drawn_from or drawn_from[0] is None
    return Chain(read, position_probs, None if greedy else torch.cat(drawn_from))
