"""Scale past one device: a tensor-parallel target on several ranks, the drafter on its own rank.

The topology (the Saguaro paper's): ranks 0..N-1 hold the target, sharded by transformers' own
tensor parallelism (its `tp_plan`), and rank N, if there is one, holds the whole draft model.
All ranks are one torch.distributed process group (NCCL or gloo for the target's shards; the small
control messages below always travel over gloo groups, which can be polled and time out on CPU).

Only rank 0, the leader, decodes; the other target ranks replay its steps (distributed/consensus.py).

The drafter rank runs the ordinary Saguaro worker loop (`ssd.worker.serve_drafter`) over a
`RankChannel` (rank_channel.py), a pipe over torch.distributed point-to-point messages:
pre-speculation overlaps the target's sharded verification exactly as a drafter process does on one
machine, and a dead or stalled drafter rank makes the leader draft inline (`DraftWorker` placement
"rank"), losing no token.

Faults. Every collective is bounded by the process group's timeout (`init(timeout=)`), the sharded
model's own all-reduces included (the device mesh's groups are made with it): a dead or stalled
target rank raises `DistributedFailure` on the others instead of hanging, naming the rank(s) that
did not answer and, for a rank on this host, whether its process is gone or stopped.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from saguaro.distributed.rank_channel import RankChannel
from saguaro.faults import logger

DEFAULT_TIMEOUT = 120.0  # seconds any collective may wait for another rank


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
    processes: list = field(default_factory=list, repr=False)  # (host, pid) of every rank, by rank
    failure: str | None = None  # why a collective of the target ranks failed: none can run after it

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

    def describe(self, ranks) -> str:
        """`ranks` (that did not answer) by pid and, where this host can tell, what became of them."""
        described = []
        for rank in ranks:
            if rank >= len(self.processes):
                described.append(f"rank {rank}")
                continue
            host, pid = self.processes[rank]
            if host != socket.gethostname():
                described.append(f"rank {rank} (pid {pid} on {host})")
                continue
            state = _process_state(pid)
            described.append(f"rank {rank} (pid {pid}{', ' + state if state else ''})")
        return " or ".join(described) or "no other rank"

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
    `saguaro.ssd.worker.serve_drafter`. backend: "nccl" on CUDA, "gloo" on CPU by default.
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
    mesh = _target_mesh(device_type, tp, seconds)
    _topology = Topology(targets, drafter, timeout, control, link, mesh, processes=_processes())
    return _topology


def _processes() -> list[tuple[str, int]]:
    """(host, pid) of every rank, so that a failure can say which process did not answer."""
    processes = [None] * dist.get_world_size()
    dist.all_gather_object(processes, (socket.gethostname(), os.getpid()))
    return processes


def _process_state(pid: int) -> str | None:
    """What became of a process on this host: "gone", "stopped (...)", "running"; None: cannot tell."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone" if os.path.isdir("/proc/self") else None
    except (OSError, IndexError):
        return None
    if state in ("Z", "X"):
        return "gone"
    if state in ("T", "t"):
        return f"stopped (SIGSTOP or a debugger: `kill -CONT {pid}` resumes it, `kill -9 {pid}` ends it)"
    return "running"


def _target_mesh(device_type: str, tp: int, timeout: datetime.timedelta):
    """transformers' device meshes (dense and expert views) over the target ranks only."""
    from torch.distributed.device_mesh import DeviceMesh
    from transformers.distributed.utils import TransformersDeviceMesh

    # The sharded model's all-reduces run on these groups, inside transformers' forward, where only
    # the group's own timeout can end a wait for a stalled rank: a group made without one waits
    # torch's default (30 min), so each is made with the run's timeout.
    if dist.get_backend() == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options.is_high_priority_stream = False
    else:
        options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout  # DeviceMesh passes it on as new_group's timeout
    overrides = ((None, options),) * 4
    ranks = torch.arange(tp).reshape(1, 1, 1, tp)
    dense = DeviceMesh(
        device_type, ranks, mesh_dim_names=("pp", "dp_replicate", "fsdp", "tp"), backend_override=overrides
    )
    expert = DeviceMesh(
        device_type, ranks, mesh_dim_names=("pp", "dp_replicate", "efsdp", "ep"), backend_override=overrides
    )
    return TransformersDeviceMesh(dense, expert)


def topology() -> Topology | None:
    return _topology


def load_target(path, **kwargs):
    """The target, sharded over the target ranks by transformers' tensor parallelism (`tp_plan`)."""
    from saguaro.hf import internals as hf_internals

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
        # Bounded as init's groups are (new_group's default is torch's 30 min).
        seconds = datetime.timedelta(seconds=DEFAULT_TIMEOUT)
        control = dist.new_group(ranks, backend="gloo", timeout=seconds)
        _topology = Topology(ranks, None, DEFAULT_TIMEOUT, control, None, processes=_processes())
    if _topology.is_drafter:
        raise RuntimeError(
            "the drafter rank holds no target: call saguaro.ssd.worker.serve_drafter(draft_model) there"
        )
    return _topology


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
