"""Start a tensor-parallel run from one command (`saguaro generate/bench --tp N`).

Under torchrun this process already is one rank (torchrun sets RANK and WORLD_SIZE); otherwise
`run_ranks` spawns the ranks with torch.multiprocessing on a free local port and waits for them.
Target ranks run `main(topology, *args)` (it loads the target with `distributed.load_target`);
the drafter rank, when a draft is given, loads it and serves drafts until the leader is done.
Only rank 0 prints: the other ranks' stdout is discarded (their errors still reach stderr).
A rank that fails ends the run: the others are killed, never left behind.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import torch
import torch.multiprocessing as mp

GRACE_SECONDS = 10.0  # how long the remaining ranks get to finish once one has ended


class RankFailed(RuntimeError):
    """A rank of the run exited with an error (its traceback is on stderr above)."""


def add_arguments(parser) -> None:
    """--tp and --no-drafter-rank, for the commands that can shard the target."""
    parser.add_argument(
        "--tp",
        type=int,
        default=1,
        help="shard the target over this many ranks (transformers' tensor parallelism; GPUs with NCCL, "
        "else CPU processes with gloo), spawned here or, under torchrun, this process being one of them",
    )
    parser.add_argument(
        "--no-drafter-rank",
        dest="drafter_rank",
        action="store_false",
        help="with --tp: no rank of its own for the Saguaro drafter (rank 0 drafts beside its shard)",
    )


def run_ranks(main, tp: int, draft_path: str | None, dtype: str, *args) -> None:
    """Run `main(topology, *args)` on `tp` target ranks, plus a drafter rank serving `draft_path`."""
    world = tp + (draft_path is not None)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun: one rank of it
        _rank_main(int(os.environ["RANK"]), main, tp, draft_path, dtype, args)
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ctx = mp.get_context("spawn")
    ranks = [
        ctx.Process(
            target=_spawned_rank,
            args=(rank, world, port, main, tp, draft_path, dtype, args),
            name=f"saguaro-rank{rank}",
        )
        for rank in range(world)
    ]
    for process in ranks:
        process.start()
    try:
        _wait(ranks[:tp])
    finally:
        deadline = time.monotonic() + GRACE_SECONDS
        for process in ranks:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
    failed = [(process.name, process.exitcode) for process in ranks if process.exitcode != 0]
    if failed:
        raise RankFailed(f"ranks failed (name, exit code): {failed}; their errors are above")


def _wait(targets) -> None:
    """Until every target rank has exited, or one has failed."""
    while any(process.is_alive() for process in targets):
        if any(process.exitcode not in (None, 0) for process in targets):
            return
        time.sleep(0.2)


def _spawned_rank(rank, world, port, main, tp, draft_path, dtype, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    _rank_main(rank, main, tp, draft_path, dtype, args)


def _rank_main(rank, main, tp, draft_path, dtype, args) -> None:
    from transformers import AutoModelForCausalLM

    from saguaro import distributed
    from saguaro.ssd.worker import serve_drafter

    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of this rank's process
    world = tp + (draft_path is not None)
    if not torch.cuda.is_available():  # the ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    topology = distributed.init(tp, drafter_rank=draft_path is not None)
    try:
        if topology.is_drafter:
            draft = AutoModelForCausalLM.from_pretrained(draft_path, dtype=getattr(torch, dtype))
            if torch.cuda.is_available():
                draft = draft.to(f"cuda:{torch.cuda.current_device()}")
            serve_drafter(draft.eval())
        else:
            main(topology, *args)
    finally:
        distributed.shutdown()
