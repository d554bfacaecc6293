"""The one protocol through which the decoding loop sees drafts (`engines.speculative` serves the
methods speculative, tree, prompt_lookup and saguaro with it).

A `DraftStream` follows the committed sequence and hands over the next draft at each step:
  reset(committed, depth, draft)  - a new sequence, all of `committed` final; the first draft (with
                                    draft=False none: the drafter only feeds the sequence, its
                                    prefill, while the target prefills);
  resolve(path, next, verify_seconds, depth)
                                  - the last draft's nodes `path` (root to leaf) were accepted,
                                    then the target emitted `next`: the next draft;
  catch_up(committed, depth)      - the target went on without drafts (speculation was off):
                                    continue from `committed`, which extends the sequence the
                                    stream last saw; the next draft.
Every draft is cut to `depth` levels, the depth the target will verify. Each call has an
asynchronous form, `begin(request)` (a `Reset`, `Resolve` or `CatchUp`) then `end(ticket)`, so
the target works while the drafter answers: a stream that drafts `concurrent`ly (the Saguaro
worker) answers from what it prepared during the verification; an inline one
(`drafters.InlineDrafts`) drafts in `begin`.

Two streams exist: `drafters.InlineDrafts`, a `Drafter` (draft model chain or tree, prompt lookup)
drafting on request, and `ssd.worker.DraftWorker`, the Saguaro worker pre-speculating in a process,
a thread, a rank, or inline.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum

import torch

from saguaro.model.tree import TokenTree


class DraftSource(str, Enum):
    """Where a round's draft came from. A str, so stats and JSON read it as plain text."""

    MODEL = "model"  # drafted by the draft model for this round
    LOOKUP = "lookup"  # copied from the sequence itself (prompt lookup)
    CACHE = "cache"  # a Saguaro branch pre-speculated while the previous round was verified
    OFF = "off"  # no draft: speculation was off, the round was a plain target step

    def __str__(self) -> str:
        return self.value


@dataclass
class Draft:
    """What the target verifies next: token `tokens[i]` is node i of `tree` (a chain if not given),
    drawn from `probs[i]` (None: deterministic, verified as q = one-hot)."""

    tokens: list[int]
    probs: torch.Tensor | None = None  # [len(tokens), V]
    source: DraftSource = DraftSource.MODEL
    tree: TokenTree | None = None  # None at construction: the chain tokens[0] -> tokens[1] -> ...
    busy_seconds: float = 0.0  # drafter compute since the previous draft was handed over
    prepared_branches: int = 0  # outcomes pre-speculated while the previous draft was verified

    def __post_init__(self):
        if self.tree is None:
            self.tree = TokenTree.chain(len(self.tokens))
        elif len(self.tree) != len(self.tokens):
            raise ValueError(f"{len(self.tokens)} draft tokens but {len(self.tree)} tree nodes")

    @classmethod
    def off(cls) -> Draft:
        """No draft: the round is a plain target step."""
        return cls([], None, DraftSource.OFF)

    def cut(self, depth: int) -> Draft:
        """The nodes less than `depth` levels deep (a chain: its first `depth` tokens), in order."""
        keep = [node for node, level in enumerate(self.tree.depths()) if level < depth]
        if len(keep) == len(self.tokens):
            return self
        index = {-1: -1, **{node: i for i, node in enumerate(keep)}}  # a kept node's parent is kept
        self.tokens = [self.tokens[node] for node in keep]
        self.probs = None if self.probs is None else self.probs[keep]
        self.tree = TokenTree(tuple(index[self.tree.parents[node]] for node in keep))
        return self


@dataclass(frozen=True)
class Reset:
    """A new sequence, all of `committed` final; draft `depth` levels after it (none if not `draft`)."""

    committed: list[int]
    depth: int
    draft: bool = True
    kind = "reset"  # the call's name, on a worker's wire


@dataclass(frozen=True)
class Resolve:
    """The last draft's nodes `path` (root to leaf) were accepted, then the target emitted
    `next_token` (verification took `verify_seconds`); draft `depth` levels after it."""

    path: list[int]
    next_token: int
    verify_seconds: float
    depth: int
    kind = "resolve"


@dataclass(frozen=True)
class CatchUp:
    """The target went on without drafts: `committed` extends the sequence the stream last saw;
    draft `depth` levels after it."""

    committed: list[int]
    depth: int
    kind = "catch_up"


DraftRequest = Reset | Resolve | CatchUp


class DraftStream(ABC):
    """Hands over drafts for the committed sequence (the calls: see the module docstring).

    A stream implements the asynchronous halves: `begin(request)` starts a call and returns a
    ticket, `end(ticket)` returns that call's draft.
    """

    concurrent = False  # True while a drafter works beside the target (the target's threads split)
    # A worker process's shared flag, up while it works (placement.hand_back_when_idle).
    working = None

    @abstractmethod
    def begin(self, request: DraftRequest): ...

    @abstractmethod
    def end(self, ticket) -> Draft: ...

    def reset(self, committed: list[int], depth: int, draft: bool = True) -> Draft:
        return self.end(self.begin(Reset(committed, depth, draft)))

    def resolve(self, path: list[int], next_token: int, verify_seconds: float, depth: int) -> Draft:
        return self.end(self.begin(Resolve(path, next_token, verify_seconds, depth)))

    def catch_up(self, committed: list[int], depth: int) -> Draft:
        return self.end(self.begin(CatchUp(committed, depth)))

    def pause(self) -> None:
        """No outcome of the last verification will come (plain steps follow, or the call ends):
        stop preparing drafts for it. A stream that drafts only when asked has nothing to stop."""
        return
