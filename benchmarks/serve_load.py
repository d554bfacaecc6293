"""Load on `saguaro serve` and on `transformers serve --continuous-batching`, same model, through the
async `openai` client on 127.0.0.1: the agentic workload (sessions of several turns behind one shared
system prompt, each turn's prompt the whole conversation so far) and plain chat at concurrency
1 / 4 / 8; throughput, time to first token (TTFT) and inter-token latency (ITL: a request's decode
time over its tokens after the first) at p50 / p95, errors; and how long SIGTERM takes to stop
saguaro serve with a request running.

    python benchmarks/serve_load.py [--target DIR --draft DIR] [--no-transformers] [--out FILE]
    python benchmarks/serve_load.py --tiny      # a smoke test on tiny random models, minutes

The requests are benchmarks/engine_load.py's, which measures the engine without HTTP. Each server
serves its warm-up session (other questions, the same system prompt) first. transformers serve is
optional: if it does not start, saguaro serve is reported alone.
"""

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import openai
from engine_load import CHAT, SESSIONS, SYSTEM, TURN_TOKENS, WARMUP, cpu_description, tiny_pair

from saguaro.bench.memory_sampler import MemorySampler

REQUEST_SECONDS = 600  # one request's limit; a phase's limit is --phase-seconds


@dataclass
class Sample:
    ttft: float
    itl: float | None
    tokens: int
    turn: int = 0


@dataclass
class Phase:
    name: str
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        tokens = sum(s.tokens for s in self.samples)
        later = [s.ttft for s in self.samples if s.turn > 0]
        itl = [s.itl for s in self.samples if s.itl is not None]
        return {
            "requests": len(self.samples) + len(self.errors),
            "errors": len(self.errors),
            "tokens_per_second": tokens / self.seconds if self.seconds else 0.0,
            "ttft_p50": _percentile([s.ttft for s in self.samples], 50),
            "ttft_p95": _percentile([s.ttft for s in self.samples], 95),
            "itl_p50": _percentile(itl, 50),
            "itl_p95": _percentile(itl, 95),
            "later_turns_ttft_p50": _percentile(later, 50) if later else None,
            "first_errors": self.errors[:3],
        }


def _percentile(values: list[float], p: int) -> float | None:
    ordered = sorted(values)
    return ordered[round(p / 100 * (len(ordered) - 1))] if ordered else None


async def stream_chat(client, model: str, messages: list[dict], max_tokens: int) -> tuple[str, Sample]:
    """One streamed, greedy chat request: its text and timings."""
    start = time.perf_counter()
    first = last = None
    text, tokens, pieces = "", None, 0
    chunks = await client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in chunks:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.content:
                last = time.perf_counter()
                first = first or last
                text, pieces = text + choice.delta.content, pieces + 1
    if first is None:
        raise RuntimeError("no text came back")
    tokens = tokens or pieces  # without usage, a chunk a token
    itl = (last - first) / (tokens - 1) if tokens > 1 else None
    return text, Sample(first - start, itl, tokens)


async def agentic(client, model: str, sessions: list[list[str]], phase: Phase) -> None:
    """Every session at once; in each, the turns one after another, each resending the conversation."""

    async def session(turns: list[str]) -> None:
        messages = [{"role": "system", "content": SYSTEM}]
        for turn, user in enumerate(turns):
            messages.append({"role": "user", "content": user})
            try:
                text, sample = await stream_chat(client, model, messages, TURN_TOKENS)
            except Exception as error:  # noqa: BLE001 - counted and reported, the load goes on
                phase.errors.append(f"{type(error).__name__}: {error}")
                return
            sample.turn = turn
            phase.samples.append(sample)
            messages.append({"role": "assistant", "content": text})

    await asyncio.gather(*(session(turns) for turns in sessions))


async def chat(client, model: str, concurrency: int, phase: Phase) -> None:
    """CHAT's questions, `concurrency` at a time, tagged with the level as engine_load's are (or a
    level would reuse the KV of the same requests at the level before)."""
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt: str) -> None:
        async with gate:
            try:
                messages = [{"role": "user", "content": f"({concurrency}) {prompt}"}]
                _, sample = await stream_chat(client, model, messages, TURN_TOKENS)
                phase.samples.append(sample)
            except Exception as error:  # noqa: BLE001
                phase.errors.append(f"{type(error).__name__}: {error}")

    await asyncio.gather(*(one(p) for p in CHAT))


async def timed(phase: Phase, work, seconds: float) -> Phase:
    start = time.perf_counter()
    try:
        await asyncio.wait_for(work, seconds)
    except TimeoutError:
        phase.errors.append(f"the phase ran past its {seconds:.0f} s limit")
    phase.seconds = time.perf_counter() - start
    return phase


async def load(url: str, model: str, args) -> dict:
    results = {}
    async with openai.AsyncOpenAI(
        base_url=url + "/v1", api_key="none", timeout=REQUEST_SECONDS, max_retries=0
    ) as client:
        warmup = Phase("warm-up")
        await timed(warmup, agentic(client, model, WARMUP, warmup), args.phase_seconds)
        phase = Phase("agentic")
        work = agentic(client, model, SESSIONS, phase)
        results["agentic"] = (await timed(phase, work, args.phase_seconds)).summary()
        for concurrency in args.concurrency:
            phase = Phase(f"chat@{concurrency}")
            work = chat(client, model, concurrency, phase)
            results[phase.name] = (await timed(phase, work, args.phase_seconds)).summary()
    return results


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status
    except OSError as error:
        return getattr(error, "code", 0)


class Server:
    """A server in a subprocess, its output in a log file."""

    def __init__(self, name: str, command: list[str], port: int, log_dir: Path):
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self.log = log_dir / f"{name}.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        with self.log.open("w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.process.poll() is None:
            if http_status(self.url + "/health") == 200:
                return True
            time.sleep(0.5)
        return False

    def stop(self, seconds: float = 30.0) -> float | None:
        """SIGTERM; the seconds until it exited, or None if it had to be killed."""
        start = time.perf_counter()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(seconds)
            return time.perf_counter() - start
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)
            return None

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])


def sigterm_with_a_request_running(server: Server, model: str) -> dict:
    """Start a long streamed request; once its first token arrived, SIGTERM and time the exit."""

    async def running_request(started: asyncio.Event) -> str:
        messages = [{"role": "user", "content": "Explain quicksort, then implement it, then test it."}]
        url = server.url + "/v1"
        try:
            async with openai.AsyncOpenAI(base_url=url, api_key="none", timeout=120, max_retries=0) as client:
                chunks = await client.chat.completions.create(
                    model=model, messages=messages, max_tokens=256, temperature=0, stream=True
                )
                finish = None
                async for chunk in chunks:
                    started.set()
                    finish = next((c.finish_reason for c in chunk.choices if c.finish_reason), finish)
            return f"completed ({finish})"
        except Exception as error:  # noqa: BLE001 - cancelled at the drain's timeout: reported
            return f"{type(error).__name__}: {error}"

    async def scenario() -> tuple[float | None, str]:
        started = asyncio.Event()
        request = asyncio.create_task(running_request(started))
        await asyncio.wait_for(started.wait(), 120)
        seconds = await asyncio.to_thread(server.stop, 60.0)
        return seconds, await asyncio.wait_for(request, 60)

    seconds, outcome = asyncio.run(scenario())
    within = seconds is not None and seconds <= 30
    return {"sigterm_to_exit_seconds": seconds, "within_30_s": within, "running_request": outcome}


def tiny_folders(root: Path) -> tuple[str, str]:
    """engine_load's tiny random pair (fp32), saved as two model folders for the servers."""
    tokenizer, target, draft = tiny_pair()
    for name, model in (("tiny-target", target), ("tiny-draft", draft)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return str(root / "tiny-target"), str(root / "tiny-draft")


def transformers_command(target: str, port: int, dtype: str) -> list[str]:
    executable = Path(sys.executable).parent / "transformers"
    launcher = (
        [str(executable)]
        if executable.exists()
        else [
            sys.executable,
            "-c",
            "import sys; from transformers.cli.transformers import main; sys.exit(main())",
        ]
    )
    return launcher + [
        "serve",
        target,
        "--continuous-batching",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--device",
        "cpu",
    ]


def note_peak_memory(results: dict, server: str, memory: MemorySampler) -> None:
    """The peak over the start of a server's run (loading, every workload, the stop): the machine's
    used memory, and this benchmark's process tree (the server is its child)."""
    machine, tree = memory.stop(), memory.tree_peak_over_baseline()
    results["servers"].setdefault(server, {})["peak_memory_bytes"] = {
        "machine": machine,
        "process_tree": tree,
    }
    gib = [f"{value / 2**30:.2f} GiB" if value is not None else "unknown" for value in (machine, tree)]
    results["notes"].append(
        f"{server}: peak memory {gib[0]} machine-wide, {gib[1]} for the server and client"
    )


def report(results: dict) -> None:
    columns = [
        "requests",
        "errors",
        "tokens_per_second",
        "ttft_p50",
        "ttft_p95",
        "itl_p50",
        "itl_p95",
        "later_turns_ttft_p50",
    ]
    print("| server | workload | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for server, workloads in results["servers"].items():
        for workload, figures in workloads.items():
            if isinstance(figures, dict) and "requests" in figures:
                cells = [
                    f"{figures[c]:.3f}" if isinstance(figures[c], float) else str(figures[c]) for c in columns
                ]
                print(f"| {server} | {workload} | " + " | ".join(cells) + " |")
    for line in results["notes"]:
        print(f"- {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="target model folder (default: the demo pair)")
    parser.add_argument("--draft", help="draft model folder")
    parser.add_argument("--tiny", action="store_true", help="tiny random models (fp32): a smoke test")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--method", default="auto", help="saguaro serve's --method")
    parser.add_argument("--no-transformers", action="store_true", help="measure saguaro serve alone")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--phase-seconds", type=float, default=900, help="limit of one workload")
    parser.add_argument("--ready-seconds", type=float, default=900, help="limit for a server to load")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve_load-"))
    if args.tiny:
        args.target, args.draft = tiny_folders(work)
        args.dtype = "float32"
    elif not args.target:
        from saguaro.bench import demo_models

        args.target, args.draft = demo_models.demo_pair_paths()
    results = {"cpu": cpu_description(), "target": args.target, "draft": args.draft, "dtype": args.dtype}
    results.update(servers={}, notes=[])
    print("CPU:", results["cpu"])

    port = free_port()
    command = [
        sys.executable,
        "-m",
        "saguaro.cli",
        "serve",
        "--target",
        args.target,
        "--port",
        str(port),
        "--dtype",
        args.dtype,
        "--method",
        args.method,
    ]
    command += ["--draft", args.draft] if args.draft else []
    memory = MemorySampler()
    saguaro_server = Server("saguaro", command, port, work)
    try:
        if not saguaro_server.wait_ready(args.ready_seconds):
            raise SystemExit(f"saguaro serve did not start; its log ends:\n{saguaro_server.tail()}")
        model = Path(args.target).name
        results["servers"]["saguaro serve"] = asyncio.run(load(saguaro_server.url, model, args))
        stop = sigterm_with_a_request_running(saguaro_server, model)
        results["servers"]["saguaro serve"]["sigterm"] = stop
        results["notes"].append(f"saguaro serve, SIGTERM with a request running: {stop}")
    finally:
        saguaro_server.stop()
    note_peak_memory(results, "saguaro serve", memory)

    if not args.no_transformers:
        port = free_port()
        memory = MemorySampler()
        hf_server = Server("transformers", transformers_command(args.target, port, args.dtype), port, work)
        try:
            if hf_server.wait_ready(args.ready_seconds):
                results["servers"]["transformers serve --cb"] = asyncio.run(
                    load(hf_server.url, args.target, args)
                )
            else:
                results["notes"].append(
                    f"transformers serve did not start; its log ends:\n{hf_server.tail()}"
                )
        finally:
            hf_server.stop()
        note_peak_memory(results, "transformers serve --cb", memory)
        measured = results["servers"]
        if "transformers serve --cb" in measured:
            ours = measured["saguaro serve"]["agentic"]["tokens_per_second"]
            theirs = measured["transformers serve --cb"]["agentic"]["tokens_per_second"]
            results["notes"].append(f"agentic throughput, saguaro / transformers: {ours / theirs:.2f}x")
    results["notes"].append(f"server logs: {work}")
    report(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
