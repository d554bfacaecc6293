"""Scale past one device: a tensor-parallel target on several ranks, the drafter on its own rank.

The topology (the Saguaro paper's): ranks 0..N-1 hold the target, sharded by transformers' own
tensor parallelism (its `tp_plan`), and rank N, if there is one, holds the whole draft model.
All ranks are one torch.distributed process group (NCCL or gloo for the target's shards; the small
control messages below always travel over gloo groups, which can be polled and time out on CPU).

Consensus. Only rank 0, the leader, decodes: it drafts (or asks the drafter rank), verifies,
samples, chooses draft lengths, all exactly as on one device. Every other target rank follows:
`LeaderRunner` broadcasts each operation on the target's runner (feed a prompt, forward these
tokens in this tree, keep this path, roll back to this length) before running it, and
`follow` replays them on the follower's runner, so every rank feeds identical tokens to its shard
and the sharded forwards always match. Nothing that may differ between ranks (a seed, a timing, a
sampling draw) can make them diverge, and at the end every rank returns the leader's tokens.

The drafter rank runs the ordinary Saguaro worker loop (`workers._serve`) over a `RankChannel`,
a pipe-like object over torch.distributed point-to-point messages: pre-speculation overlaps the
target's sharded verification exactly as a drafter process does on one machine, and a dead or
stalled drafter rank makes the leader draft inline (`DraftWorker` placement "rank"), losing no token.

Faults. Every collective is bounded by the process group's timeout (`init(timeout=)`): a dead or
stalled target rank raises `DistributedFailure` on the others instead of hanging.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import pickle
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .faults import logger
from .tree import TokenTree

DEFAULT_TIMEOUT = 120.0  # seconds any collective may wait for another rank
FRAME = 64  # int64 words per broadcast; a longer message takes a second broadcast


class DistributedFailure(RuntimeError):
    """A target rank died, stalled past the timeout, or the ranks were not given the same call."""


@dataclass
class Topology:
    """Who is who: the target's ranks (the first leads), the drafter's rank (or None)."""

    target_ranks: list[int]
    drafter_rank: int | None
    timeout: float
    control: object  # gloo group over the target ranks: the leader's broadcasts
    link: object | None  # gloo group {leader, drafter}: drafts and outcomes
    mesh: object | None = None  # transformers' TransformersDeviceMesh over the target ranks
    channel: RankChannel | None = field(default=None, repr=False)

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def leader(self) -> int:
        return self.target_ranks[0]

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leader

    @property
    def is_drafter(self) -> bool:
        return self.rank == self.drafter_rank

    def drafter_channel(self) -> RankChannel | None:
        """The leader's one channel to the drafter rank (None without one, or once it failed)."""
        if self.drafter_rank is None or not self.is_leader:
            return None
        if self.channel is None:
            self.channel = RankChannel(self.drafter_rank, self.link)
        return None if self.channel.failed else self.channel


_topology: Topology | None = None


def init(
    tp: int, drafter_rank: bool = False, backend: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> Topology:
    """Join the process group (torchrun's RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT) as one of
    `tp` target ranks, or as the drafter rank (the last one) when `drafter_rank`. Every rank calls it,
    first; then target ranks load the target with `load_target` and the drafter rank calls
    `serve_drafter`. backend: "nccl" on CUDA, "gloo" on CPU by default.
    """
    global _topology
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp (the number of target ranks) must be a positive int, got {tp!r}")
    if _topology is not None:
        raise RuntimeError("saguaro.distributed.init() was already called in this process")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    world = dist.get_world_size()
    if world != tp + drafter_rank:
        raise ValueError(
            f"{world} processes were started but tp={tp}{' + 1 drafter rank' if drafter_rank else ''} "
            f"needs {tp + drafter_rank}: launch with torchrun --nproc-per-node {tp + drafter_rank}"
        )
    targets = list(range(tp))
    drafter = tp if drafter_rank else None
    # new_group is collective over the whole world: every rank creates every group, in this order.
    seconds = datetime.timedelta(seconds=timeout)
    control = dist.new_group(targets, backend="gloo", timeout=seconds)
    # The drafter rank idles between calls for as long as the leader likes: its link never times out
    # by itself (it ends when either side is gone); the leader bounds each wait by worker_timeout.
    forever = datetime.timedelta(days=365)
    link = dist.new_group([0, drafter], backend="gloo", timeout=forever) if drafter is not None else None
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = _target_mesh(device_type, tp)
    _topology = Topology(targets, drafter, timeout, control, link, mesh)
    return _topology


def _target_mesh(device_type: str, tp: int):
    """transformers' device meshes (dense and expert views) over the target ranks only."""
    from torch.distributed.device_mesh import DeviceMesh
    from transformers.distributed.utils import TransformersDeviceMesh

    ranks = torch.arange(tp).reshape(1, 1, 1, tp)
    dense = DeviceMesh(device_type, ranks, mesh_dim_names=("pp", "dp_replicate", "fsdp", "tp"))
    expert = DeviceMesh(device_type, ranks, mesh_dim_names=("pp", "dp_replicate", "efsdp", "ep"))
    return TransformersDeviceMesh(dense, expert)


def topology() -> Topology | None:
    return _topology


def load_target(path, **kwargs):
    """The target, sharded over the target ranks by transformers' tensor parallelism (`tp_plan`)."""
    from . import hf_internals

    if _topology is None or _topology.is_drafter:
        raise RuntimeError("load_target runs on target ranks after saguaro.distributed.init(tp=...)")
    return hf_internals.load_tensor_parallel(path, _topology.mesh, len(_topology.target_ranks), **kwargs)


def shutdown() -> None:
    """On the leader: release the drafter rank. On every rank: leave the process group."""
    global _topology
    if _topology is not None and _topology.is_leader and _topology.channel is not None:
        # Even after a failure: a drafter rank that only stalled must not wait for ever.
        with contextlib.suppress(BrokenPipeError):
            _topology.channel.send(("exit",))
        _topology.channel.say_goodbye()
    _topology = None
    if dist.is_initialized():
        dist.destroy_process_group()


def tensor_parallel_target(model) -> Topology | None:
    """The topology a target sharded over several ranks decodes in; None for a one-device target.

    A target loaded with plain `tp_plan="auto"` (no `init`: every process is a target rank) gets a
    topology here, on its first generator; every rank builds its generators in the same order.
    """
    global _topology
    if (getattr(model, "_tp_size", None) or 1) <= 1 or not dist.is_initialized():
        return None
    if _topology is None:
        ranks = list(range(dist.get_world_size()))
        control = dist.new_group(ranks, backend="gloo")
        _topology = Topology(ranks, None, DEFAULT_TIMEOUT, control, None)
    if _topology.is_drafter:
        raise RuntimeError("the drafter rank holds no target: call serve_drafter(draft_model) there")
    return _topology


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
        with self.guard("waiting for the leader's next step" if not self.leads else "sending a step"):
            dist.broadcast(tensor, src=self.topology.leader, group=self.topology.control)

    def guard(self, doing: str):
        return _Guard(self.topology, doing)

    def lead(self, runner) -> LeaderRunner:
        return LeaderRunner(runner, self)

    def finish(self, new: list[int]) -> None:
        self._send(self.DONE, new)

    def abort(self) -> None:
        """The leader failed mid-generation: release the followers with an error, not a timeout."""
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

    def __init__(self, topology: Topology, doing: str):
        self.topology, self.doing = topology, doing

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if kind is None or not issubclass(kind, RuntimeError) or isinstance(error, DistributedFailure):
            return False
        raise DistributedFailure(
            f"rank {self.topology.rank}: a target rank is gone or stalled past {self.topology.timeout:g}s "
            f"while {self.doing} ({type(error).__name__}: {error}); restart every rank"
        ) from error


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


class _HostPickler(pickle.Pickler):
    """Pickles tensors from host memory: a draft's distributions computed on the drafter's GPU
    arrive as CPU tensors, not as tensors on a device of another rank."""

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor) and obj.device.type != "cpu":
            return obj.cpu().__reduce_ex__(pickle.HIGHEST_PROTOCOL)
        return NotImplemented


class RankChannel:
    """A pipe to another rank (send / recv / poll of picklable objects), over torch.distributed.

    It stands in for a multiprocessing Connection in the worker protocol. Each message is its size,
    then its pickled bytes, sent without waiting (two ranks sending at once never deadlock). gloo's
    point-to-point receives cannot be polled, so a daemon thread receives in turn and queues what
    arrives; a peer that is gone (or a failed transfer) reads as EOFError, as a closed pipe does.
    One channel per peer for the life of the process, ended by a "bye" from either side.
    """

    def __init__(self, peer: int, group):
        self.peer, self.group = peer, group
        self.failed = False
        self.last_seq = 0  # the highest request number sent: a new worker numbers after it
        self.owner = None  # weakref to the DraftWorker whose session the peer serves
        self._inbox: queue.Queue = queue.Queue()
        self._peeked = None  # a message poll took from the inbox, next in line for recv
        self._sends: list = []
        self._receiver = threading.Thread(target=self._receive_all, daemon=True, name="saguaro-rank-channel")
        self._receiver.start()

    def _receive_all(self) -> None:
        while True:
            try:
                size = torch.zeros(1, dtype=torch.long)
                dist.recv(size, self.peer, group=self.group)
                data = torch.empty(int(size[0]), dtype=torch.uint8)
                dist.recv(data, self.peer, group=self.group)
                message = pickle.loads(data.numpy().tobytes())
            except Exception as error:  # gloo: "Connection closed by peer", a failed transfer
                self._inbox.put(EOFError(f"rank {self.peer} is gone ({error})"))
                return
            self._inbox.put(message)
            if message == ("bye",):
                return

    def send(self, message) -> None:
        if isinstance(message[0], int):
            self.last_seq = max(self.last_seq, message[0])
        buffer = io.BytesIO()
        _HostPickler(buffer).dump(message)
        data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
        size = torch.tensor([len(data)], dtype=torch.long)
        try:
            self._sends = [(w, t) for w, t in self._sends if not w.is_completed()]
            for tensor in (size, data):
                # The tensors must outlive the transfer: keep them with their pending work.
                self._sends.append((dist.isend(tensor, self.peer, group=self.group), tensor))
        except RuntimeError as error:
            self.failed = True
            raise BrokenPipeError(f"rank {self.peer} is gone ({error})") from error

    def poll(self, timeout: float | None = 0.0) -> bool:
        """Whether a message is waiting; waits up to `timeout` seconds for one (None: for ever)."""
        if self._peeked is None:
            try:
                self._peeked = self._inbox.get(timeout=timeout)
            except queue.Empty:
                return False
        return True

    def recv(self):
        message, self._peeked = self._peeked if self._peeked is not None else self._inbox.get(), None
        if isinstance(message, EOFError):
            self.failed = True
            self._peeked = message  # every later read sees the end too
            raise message
        return message

    def say_goodbye(self, timeout: float = 10.0) -> None:
        """End the channel on both sides: the peer's receiver gets "bye", ours waits for its "bye"."""
        with contextlib.suppress(BrokenPipeError):
            self.send(("bye",))
        deadline = time.monotonic() + timeout
        for work, _ in self._sends:
            with contextlib.suppress(RuntimeError):
                work.wait(datetime.timedelta(seconds=max(0.1, deadline - time.monotonic())))
        self._receiver.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        """Nothing to release: the channel lives as long as the process group (see `shutdown`)."""


def claim_drafter_rank(worker) -> RankChannel | None:
    """The channel to the drafter rank, for `worker` (a DraftWorker) alone: the one that held it
    before drafts inline from now on. None without a usable drafter rank."""
    channel = _topology.drafter_channel() if _topology is not None else None
    if channel is None:
        return None
    previous = channel.owner() if channel.owner is not None else None
    if previous is not None and previous is not worker and previous.concurrent:
        previous.detach()
    channel.owner = weakref.ref(worker)
    return channel


def serve_drafter(draft_model) -> None:
    """The drafter rank's whole life: serve the leader's Saguaro workers until it shuts down or dies.

    Each of the leader's workers opens a session ("session", options) and closes it; in between,
    this rank runs the ordinary worker loop, pre-speculating while the target ranks verify.
    """
    from .prespeculation import PreSpeculator
    from .workers import _serve

    if _topology is None or not _topology.is_drafter:
        raise RuntimeError(
            "serve_drafter runs on the drafter rank, after saguaro.distributed.init(..., drafter_rank=True)"
        )
    channel = RankChannel(_topology.leader, _topology.link)
    draft_model.eval()
    while True:
        try:
            message = channel.recv()
        except EOFError:
            logger.warning("saguaro: the leader rank is gone; the drafter rank stops")
            return
        if message[0] in ("exit", "bye"):
            channel.say_goodbye()
            return
        if message[0] == "session":
            options = message[1]
            _serve(channel, lambda options=options: PreSpeculator(draft_model, **options))
        # Anything else is a request of a session that was closed meanwhile: it expects no answer.


def settle_options(topology: Topology, method: str, has_draft: bool, placement, quantization, vocab_size):
    """(method, placement, draft_quantization, draft_vocab_size) for a tensor-parallel target.

    The "auto" choices time forwards of the target on the leader alone, which the other target
    ranks could not mirror: here they settle without timing, on the setup the topology was built
    for (Saguaro with a drafter rank, else speculative decoding; the plain draft). A Saguaro worker
    runs on the drafter rank when there is one.
    """
    if method == "auto":
        method = "saguaro" if topology.drafter_rank is not None else "speculative"
        method = method if has_draft else "prompt_lookup"
        logger.info("saguaro: method='auto' on a tensor-parallel target takes %s (untimed)", method)
    if placement is None and topology.drafter_rank is not None:
        placement = "rank"
    plain = [None if option == "auto" else option for option in (quantization, vocab_size)]
    return method, placement, *plain
