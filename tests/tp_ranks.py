"""The program each rank of the tensor-parallel tests runs (2 target ranks + 1 drafter rank, gloo).

`launch` starts the ranks as spawned processes and returns what each one saved; the scenarios run
inside the ranks, the assertions in tests/test_distributed.py.
"""

import os
import socket
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp

PROMPT = [1, 4, 9, 16, 25, 36, 7]
CHI_PROMPT = [1, 4, 3]
TP, WORLD = 2, 3  # ranks 0-1 hold the target, rank 2 the draft
COLLECTIVE_TIMEOUT = {"stalled_target_rank": 5.0}  # init(timeout=) per scenario; 30 s for the others


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, models: str, timeout: float = 240.0) -> tuple[list[dict | None], list[int | None]]:
    """Run `scenario` on 3 ranks; (what each rank saved, each exit code). Ranks still running after
    `timeout` seconds are killed (their exit code then says so). A free port can be taken by another
    process before rank 0 binds it: then the ranks run once more, on another port."""
    saved, codes = _launch_once(scenario, models, timeout)
    if any("EADDRINUSE" in (result or {}).get("error", "") for result in saved):
        saved, codes = _launch_once(scenario, models, timeout)
    return saved, codes


def _launch_once(scenario: str, models: str, timeout: float):
    port, out = free_port(), tempfile.mkdtemp()
    ctx = mp.get_context("spawn")
    ranks = [ctx.Process(target=_rank_main, args=(r, port, scenario, models, out)) for r in range(WORLD)]
    for process in ranks:
        process.start()
    deadline = time.monotonic() + timeout  # one deadline for all: hung ranks must not add up
    for process in ranks:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in ranks:
        if process.is_alive():
            process.kill()  # SIGKILL: also ends a stopped (SIGSTOP) rank
            process.join()
    results = []
    for r in range(WORLD):
        path = os.path.join(out, f"rank{r}.pt")
        results.append(torch.load(path) if os.path.exists(path) else None)
    return results, [p.exitcode for p in ranks]


def _rank_main(rank: int, port: int, scenario: str, models: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from saguaro import distributed
    from saguaro.ssd.worker import serve_drafter

    saved: dict = {"pid": os.getpid()}
    os.environ["SAGUARO_TEST_SAVE_TO"] = os.path.join(out, f"rank{rank}.pt")
    try:
        topology = distributed.init(tp=TP, drafter_rank=True, timeout=COLLECTIVE_TIMEOUT.get(scenario, 30.0))
        pids = [None] * WORLD
        torch.distributed.all_gather_object(pids, os.getpid())
        os.environ["SAGUARO_TEST_DRAFTER_PID"] = str(pids[TP])
        saved["pids"] = pids
        draft_path = os.path.join(models, "draft")
        draft = AutoModelForCausalLM.from_pretrained(draft_path, dtype=torch.float32).eval()
        if topology.is_drafter:
            saved["drafter_pid"] = os.getpid()
            torch.save(saved, os.environ["SAGUARO_TEST_SAVE_TO"])  # before serving: it may be killed
            serve_drafter(draft)
            saved["served"] = True
        else:
            target = distributed.load_target(os.path.join(models, "target"), dtype=torch.float32).eval()
            SCENARIOS[scenario](target, draft, rank, saved)
    except Exception:
        saved["error"] = traceback.format_exc()
    torch.save(saved, os.environ["SAGUARO_TEST_SAVE_TO"])
    distributed.shutdown()


def _summary(out) -> dict:
    s = out.stats
    sequence = out.sequences[0].tolist()
    return {"sequence": sequence, "drafted": s.drafted, "accepted": s.accepted, "hits": s.hits}


def exactness(target, draft, rank, saved) -> None:
    """Greedy per method and sampling with a seed per rank."""
    import saguaro

    ids = torch.tensor([PROMPT])
    for method in ("speculative", "tree", "saguaro"):
        out = saguaro.generate(
            target,
            ids,
            draft,
            method=method,
            max_new_tokens=24,
            speculation_schedule="constant",
            return_dict_in_generate=True,
            eos_token_id=[],
        )
        saved[f"greedy_{method}"] = _summary(out)
    for method in ("speculative", "saguaro"):
        torch.manual_seed(1000 + rank)  # a different seed on every rank: the leader's draws win
        out = saguaro.generate(
            target, ids, draft, method=method, max_new_tokens=24, do_sample=True, eos_token_id=[]
        )
        saved[f"sampled_{method}"] = out[0].tolist()


def lifecycle(target, draft, rank, saved) -> None:
    """exactness, then the drop-in, 20 calls of one generator, and a drafter rank killed between
    two calls (the leader drafts inline, with no token lost)."""
    import signal

    import saguaro

    exactness(target, draft, rank, saved)
    ids = torch.tensor([PROMPT])
    with saguaro.enable(target, draft, method="saguaro", speculation_schedule="constant"):
        out = target.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None)
        saved["enabled"] = out[0].tolist()
    with saguaro.SpeculativeGenerator(
        target, draft, method="saguaro", speculation_schedule="constant", worker_timeout=10
    ) as generator:
        saved["repeated"] = [
            generator.generate(ids, max_new_tokens=8, eos_token_id=[])[0].tolist() for _ in range(20)
        ]
        if rank == 0:
            os.kill(int(os.environ["SAGUARO_TEST_DRAFTER_PID"]), signal.SIGKILL)
        after = generator.generate(ids, max_new_tokens=24, eos_token_id=[], return_dict_in_generate=True)
    saved["after_kill"] = _summary(after)
    saved["after_kill_failures"] = after.stats.worker_failures


def chi_square(target, draft, rank, saved, samples: int = 400) -> None:
    """Counts of the first two sampled tokens; then the same with drafts not drawn from their q."""
    from stats_helpers import argmax_with_sampled_q

    import saguaro
    from saguaro.draft.drafters import ModelDrafter

    def counts(method):
        table = torch.zeros(6, 6)
        torch.manual_seed(7 + rank)
        with saguaro.SpeculativeGenerator(
            target, draft, method=method, num_speculative_tokens=2, speculation_schedule="constant"
        ) as generator:
            for _ in range(samples):
                ids = torch.tensor([CHI_PROMPT])
                out = generator.generate(ids, max_new_tokens=3, do_sample=True, eos_token_id=[])
                table[tuple(out[0, len(CHI_PROMPT) : len(CHI_PROMPT) + 2].tolist())] += 1
        return table

    saved["counts"] = counts("speculative")
    real_propose = ModelDrafter.propose

    def greedy_draft_sampled_q(self, depth):
        return argmax_with_sampled_q(real_propose(self, depth))

    ModelDrafter.propose = greedy_draft_sampled_q
    saved["planted_counts"] = counts("speculative")
    ModelDrafter.propose = real_propose


def dead_target_rank(target, draft, rank, saved) -> None:
    """exactness, then target rank 1 dies: rank 0's next call fails with a clear error, at once."""
    import signal
    import time

    import saguaro
    from saguaro import distributed

    exactness(target, draft, rank, saved)
    if rank == 1:
        torch.save(saved, os.environ["SAGUARO_TEST_SAVE_TO"])  # what it returned, before it dies
        os.kill(os.getpid(), signal.SIGKILL)
    start = time.monotonic()
    try:
        saguaro.generate(target, torch.tensor([PROMPT]), draft, method="speculative", max_new_tokens=8)
    except distributed.DistributedFailure as error:
        saved["dead_target_error"] = str(error)
    saved["dead_target_seconds"] = time.monotonic() - start


def stalled_target_rank(target, draft, rank, saved) -> None:
    """Target rank 1 stops (SIGSTOP) mid-call, inside its sharded forward: rank 0, waiting in the
    model's tensor-parallel all-reduce, raises DistributedFailure within about the timeout; then it
    resumes rank 1 (SIGCONT), whose call fails too, and every rank exits."""
    import signal

    import saguaro
    from saguaro import distributed

    forwards = 0

    def stop_at_the_tenth_forward(module, args):
        nonlocal forwards
        forwards += 1
        if forwards == 10:
            saved["stopped_at"] = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process
            torch.save(saved, os.environ["SAGUARO_TEST_SAVE_TO"])  # in case it never resumes
            os.kill(os.getpid(), signal.SIGSTOP)

    if rank == 1:  # before its last layer: rank 0 waits in that layer's all-reduce
        target.model.layers[-1].register_forward_pre_hook(stop_at_the_tenth_forward)
    start = time.monotonic()
    try:
        saguaro.generate(
            target, torch.tensor([PROMPT]), draft, method="speculative", max_new_tokens=400, eos_token_id=[]
        )
        saved["stall_error"] = None
    except distributed.DistributedFailure as error:
        saved["stall_error"] = str(error)
    saved["failed_at"] = time.monotonic()
    saved["stall_seconds"] = saved["failed_at"] - start
    if rank == 0:
        os.kill(saved["pids"][1], signal.SIGCONT)


SCENARIOS = {
    "exactness": exactness,
    "dead_target_rank": dead_target_rank,
    "stalled_target_rank": stalled_target_rank,
    "lifecycle": lifecycle,
    "chi_square": chi_square,
}
