"""Agreement between the ranks of a tensor-parallel target: rank 0 decides, the others replay.

Only rank 0, the leader, decodes: it drafts (or asks the drafter rank), verifies, samples and
chooses draft lengths exactly as on one device, on a `LeaderRunner`, which broadcasts every
operation on the target's runner (feed a prompt, forward these tokens in this tree, keep this
path, roll back to this length) before running it. Every other target rank `follow`s: it replays
those operations on its own runner, so every rank feeds identical tokens to its shard and the
sharded forwards always match. Nothing that may differ between ranks (a seed, a timing, a sampling
draw) can make them diverge, and at the end every rank returns the leader's tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from saguaro.distributed import DistributedFailure, Topology
from saguaro.model.tree import TokenTree

FRAME = 64  # int64 words per broadcast; a longer message takes a second broadcast


class Consensus:
    """One generation's agreement between the target ranks, through the leader's broadcasts."""

    FEED, FORWARD, COMMIT, ROLLBACK, DONE, ABORT = range(6)

    def __init__(self, topology: Topology):
        self.topology = topology

    @property
    def leads(self) -> bool:
        return self.topology.is_leader

    def _send(self, op: int, payload: list[int]) -> None:
        frame = torch.zeros(FRAME, dtype=torch.long)
        head = [op, len(payload), *payload[: FRAME - 2]]
        frame[: len(head)] = torch.tensor(head, dtype=torch.long)
        self._broadcast(frame)
        if len(payload) > FRAME - 2:
            self._broadcast(torch.tensor(payload[FRAME - 2 :], dtype=torch.long))

    def _receive(self) -> tuple[int, list[int]]:
        frame = torch.empty(FRAME, dtype=torch.long)
        self._broadcast(frame)
        op, size = int(frame[0]), int(frame[1])
        payload = frame[2 : 2 + min(size, FRAME - 2)].tolist()
        if size > FRAME - 2:
            rest = torch.empty(size - (FRAME - 2), dtype=torch.long)
            self._broadcast(rest)
            payload += rest.tolist()
        return op, payload

    def _broadcast(self, tensor: torch.Tensor) -> None:
        if self.topology.failure is not None:  # fail at once, not after another timeout
            raise DistributedFailure(
                f"rank {self.topology.rank}: an earlier collective failed ({self.topology.failure})"
            )
        if self.leads:
            guard = self.guard("sending a step")
        else:  # only the leader can keep a follower waiting here
            guard = self.guard("waiting for the leader's next step", [self.topology.leader])
        with guard:
            dist.broadcast(tensor, src=self.topology.leader, group=self.topology.control)

    def guard(self, doing: str, peers: list[int] | None = None):
        """Errors of the collectives inside as DistributedFailure; `peers`: the ranks that could have
        failed to answer (every other target rank by default)."""
        if peers is None:
            peers = [rank for rank in self.topology.target_ranks if rank != self.topology.rank]
        return _Guard(self.topology, doing, peers)

    def lead(self, runner) -> LeaderRunner:
        return LeaderRunner(runner, self)

    def finish(self, new: list[int]) -> None:
        self._send(self.DONE, new)

    def abort(self) -> None:
        """The leader failed mid-generation: release the followers with an error, not a timeout."""
        if self.topology.failure is not None:
            # A collective failed: a stalled follower would keep this broadcast waiting out the
            # timeout once more, and the followers that still answer fail on their own collectives.
            return
        try:
            self._send(self.ABORT, [])
        except DistributedFailure:
            pass  # they are gone too: nothing to release

    def follow(self, runner, prompt: list[int]) -> list[int]:
        """Replay the leader's operations on this rank's runner; return the leader's new tokens."""
        while True:
            op, payload = self._receive()
            if op == self.FEED:
                if payload != prompt:
                    raise DistributedFailure(
                        f"rank {self.topology.rank} was given a different prompt than the leader: call "
                        "generate with the same arguments on every target rank"
                    )
                with self.guard("prefilling"):
                    runner.feed(prompt)
            elif op == self.FORWARD:
                cached_nodes, last_only, count, *rest = payload
                tokens, parents = rest[:count], tuple(rest[count:])
                with self.guard("verifying"):
                    runner.forward(tokens, TokenTree(parents), cached_nodes, bool(last_only))
            elif op == self.COMMIT:
                runner.commit_path(payload[0], payload[1:])
            elif op == self.ROLLBACK:
                runner.rollback(payload[0])
            elif op == self.DONE:
                return payload
            else:
                raise DistributedFailure(
                    f"the leader (rank {self.topology.leader}) failed during this generation; see its error"
                )


class _Guard:
    """Turns a failed or timed-out collective into a DistributedFailure that says what to check."""

    def __init__(self, topology: Topology, doing: str, peers: list[int]):
        self.topology, self.doing, self.peers = topology, doing, peers

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if kind is None or not issubclass(kind, RuntimeError) or isinstance(error, DistributedFailure):
            return False
        failure = (
            f"rank {self.topology.rank}: a target rank is gone or stalled past {self.topology.timeout:g}s "
            f"while {self.doing}: {self.topology.describe(self.peers)} did not answer "
            f"({type(error).__name__}: {error}). The process group cannot recover: end the stalled rank, "
            "then restart every rank"
        )
        self.topology.failure = failure  # the ranks are out of step now, for good
        raise DistributedFailure(failure) from error


class LeaderRunner:
    """The leader's target runner: each operation is broadcast to the followers, then run here."""

    def __init__(self, runner, consensus: Consensus):
        self._runner, self._consensus = runner, consensus

    def __getattr__(self, name):
        return getattr(self._runner, name)  # length, remember, model, ...: read-only or rank-local

    def feed(self, tokens: list[int]):
        self._consensus._send(Consensus.FEED, list(tokens))
        with self._consensus.guard("prefilling"):
            return self._runner.feed(tokens)

    def forward(self, tokens, tree: TokenTree | None = None, cached_nodes: int = 0, last_only: bool = False):
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1).tolist()
        tree = tree or TokenTree.chain(len(tokens))
        payload = [cached_nodes, int(last_only), len(tokens), *tokens, *tree.parents]
        self._consensus._send(Consensus.FORWARD, payload)
        with self._consensus.guard("verifying"):
            return self._runner.forward(tokens, tree, cached_nodes, last_only)

    def commit_path(self, start: int, keep) -> None:
        keep = [int(k) for k in keep]
        self._consensus._send(Consensus.COMMIT, [start, *keep])
        self._runner.commit_path(start, keep)

    def rollback(self, length: int) -> None:
        self._consensus._send(Consensus.ROLLBACK, [length])
        self._runner.rollback(length)
