"""Load on `saguaro.Engine`: the agentic workload (4 concurrent sessions of 3 turns behind one shared
system prompt, each turn's prompt the whole conversation so far through the chat template, 48 new
tokens a turn, greedy) through the engine with its defaults, against the same requests sent one by
one to a kept `SpeculativeGenerator`; then plain chat at concurrency 1 / 4 / 8 through the engine.

Prints throughput, time to first token (TTFT, from submit) and per-token latency (a request's
decode time over its tokens after the first) at p50 / p95, the prefix-reuse rate (prompt tokens
loaded from the prefix cache), acceptance, peak memory and the CPU; and the two targets: the
median TTFT of turns 2-3 against a cold first token of a turn-3 prompt on a fresh engine (<= 0.3x)
and the engine's throughput against the kept generator's (>= 1.5x).

    python benchmarks/engine_load.py [--target DIR --draft DIR] [--out FILE]
    python benchmarks/engine_load.py --tiny      # a smoke run on tiny random models

Both sides first serve a warm-up session (other questions, the same system prompt), which also
settles method="auto"'s measurements (once per process and model pair).
"""

import argparse
import functools
import json
import subprocess
import threading
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import saguaro
from saguaro.bench import demo_models
from saguaro.bench.memory_sampler import MemorySampler

SYSTEM = (
    "You are a careful senior software engineer working as a coding agent inside a developer's "
    "repository. You answer in English and write Python 3.11 unless asked otherwise. Rules: "
    "1. Read the request fully before answering; restate the goal in one sentence. "
    "2. Prefer the standard library; name any third-party package you use and why. "
    "3. Code must be complete and runnable: imports, type hints, docstrings, no placeholders. "
    "4. Keep functions short; one idea per function; names that explain themselves. "
    "5. Handle errors at the boundary: validate inputs and raise ValueError or TypeError with a "
    "message that says what was wrong and what was expected. "
    "6. Tests: give pytest tests for every public function, covering the edge cases (empty input, "
    "one element, duplicates, large input, invalid input). "
    "7. Performance: state the time and memory complexity; avoid quadratic loops on large inputs. "
    "8. Security: never evaluate untrusted input, never build shell commands or SQL by string "
    "concatenation, never log secrets. "
    "9. When you change existing code, show only the changed functions, with a one-line reason each. "
    "Tools: read_file(path), write_file(path, text), run_tests(pattern), search(query). "
    "Format: a short plan, then the code in one fenced block, then the tests in another."
)
SESSIONS = [
    [
        "Write a function that parses an ISO 8601 duration like P3DT4H into seconds.",
        "Now also accept weeks (P2W) and fractional seconds.",
        "Add the tests for the invalid inputs.",
    ],
    [
        "Implement an LRU cache class with get and put in O(1).",
        "Make it thread-safe.",
        "Add a method that returns the hit rate.",
    ],
    [
        "Write a function that merges overlapping intervals.",
        "Make it work on a stream of intervals sorted by start.",
        "What is the complexity now?",
    ],
    [
        "Write a tokenizer for arithmetic expressions with + - * / and parentheses.",
        "Now write a recursive-descent parser on top of it.",
        "Evaluate the parsed tree.",
    ],
]
WARMUP = [["Write a retry decorator with exponential backoff.", "Add jitter."]]
CHAT = [
    "Explain the difference between a process and a thread in three sentences.",
    "Write a Python function that reverses the words of a sentence.",
    "What does the GIL do in CPython?",
    "Write a SQL query that returns the ten most recent orders per customer.",
    "How do I read a CSV file with the standard library?",
    "Write a bash one-liner that counts lines in all .py files.",
    "What is a closure? Give a short example.",
    "Write a function that checks whether a string is a palindrome.",
]
TURN_TOKENS = 48


def cpu_description() -> dict:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        lines = []
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    flags = fields.get("Flags", "").split()
    return {
        "model": fields.get("Model name", "unknown").strip(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "threads": torch.get_num_threads(),
    }


def encode(tokenizer, messages: list[dict]) -> torch.Tensor:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt").input_ids


class Record:
    """One request: its turn, timings and counts."""

    def __init__(self, prompt: torch.Tensor, turn: int, submitted: float):
        self.prompt, self.turn, self.submitted = prompt, turn, submitted
        self.first = self.last = None
        self.tokens = self.prompt_tokens = self.reused = self.drafted = self.accepted = 0

    def token_times(self, now: float, count: int) -> None:
        self.first = self.first or now
        self.last = now
        self.tokens += count

    @property
    def ttft(self) -> float:
        return self.first - self.submitted

    @property
    def per_token(self) -> float | None:
        return (self.last - self.first) / (self.tokens - 1) if self.tokens > 1 else None


def through_engine(engine, prompt: torch.Tensor, turn: int) -> tuple[list[int], Record]:
    record = Record(prompt, turn, time.perf_counter())
    handle = engine.submit(prompt, max_new_tokens=TURN_TOKENS)
    for tokens in handle:
        record.token_times(time.perf_counter(), len(tokens))
    out = handle.result()
    stats = out.stats
    record.prompt_tokens, record.reused = stats.prompt_tokens, stats.reused_prompt_tokens
    record.drafted, record.accepted = stats.drafted, stats.accepted
    return out.sequences[0, prompt.shape[1] :].tolist(), record


class Stamps:
    """An HF-style streamer that timestamps the new tokens of a generate call."""

    def __init__(self, record: Record):
        self.record, self.prompt_seen = record, False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.record.token_times(time.perf_counter(), value.numel())
        self.prompt_seen = True

    def end(self) -> None:
        pass


def through_generator(generator, prompt: torch.Tensor, turn: int) -> tuple[list[int], Record]:
    record = Record(prompt, turn, time.perf_counter())
    out = generator.generate(
        prompt, max_new_tokens=TURN_TOKENS, return_dict_in_generate=True, streamer=Stamps(record)
    )
    stats = out.stats
    record.prompt_tokens, record.reused = stats.prompt_tokens, stats.reused_prompt_tokens
    record.drafted, record.accepted = stats.drafted, stats.accepted
    return out.sequences[0, prompt.shape[1] :].tolist(), record


def session(serve, tokenizer, turns: list[str], records: list[Record]) -> None:
    """A conversation: each turn's prompt is the system prompt and every earlier turn with its answer."""
    messages = [{"role": "system", "content": SYSTEM}]
    for turn, question in enumerate(turns, 1):
        messages.append({"role": "user", "content": question})
        answer, record = serve(encode(tokenizer, messages), turn)
        records.append(record)
        messages.append({"role": "assistant", "content": tokenizer.decode(answer, skip_special_tokens=True)})


def run_sessions(serve, tokenizer, sessions: list[list[str]], concurrent: bool) -> tuple[list[Record], float]:
    records: list[Record] = []
    start = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=session, args=(serve, tokenizer, s, records)) for s in sessions]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    else:
        for turns in sessions:
            session(serve, tokenizer, turns, records)
    return records, time.perf_counter() - start


def run_chat(engine, tokenizer, concurrency: int) -> tuple[list[Record], float]:
    """CHAT's prompts, `concurrency` clients at a time, each sending its share one after another.
    Each level's questions are new to the engine (tagged with the level), or a level would reuse
    the KV of the same requests at the level before."""
    records: list[Record] = []
    prompts = [
        encode(tokenizer, [{"role": "user", "content": f"({concurrency}) {question}"}]) for question in CHAT
    ]

    def client(share):
        for prompt in share:
            records.append(through_engine(engine, prompt, 1)[1])

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(prompts[i::concurrency],)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return records, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def summary(records: list[Record], seconds: float) -> dict:
    tokens = sum(r.tokens for r in records)
    drafted = sum(r.drafted for r in records)
    return {
        "requests": len(records),
        "new_tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "ttft_p50": percentile([r.ttft for r in records], 0.5),
        "ttft_p95": percentile([r.ttft for r in records], 0.95),
        "per_token_p50": percentile([r.per_token for r in records], 0.5),
        "per_token_p95": percentile([r.per_token for r in records], 0.95),
        "prefix_reuse": sum(r.reused for r in records) / max(1, sum(r.prompt_tokens for r in records)),
        "acceptance": sum(r.accepted for r in records) / drafted if drafted else None,
        "drafted": drafted,
    }


def load(args):
    if args.tiny:
        return tiny_pair()
    if not args.target:
        args.target, args.draft = map(str, demo_models.fetch_demo_pair())
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.bfloat16).eval()
    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=torch.bfloat16).eval()
    return tokenizer, target, draft


def tiny_pair():
    """Tiny random Qwen2 models on the demo tokenizer (its chat template), the draft a noisy copy."""
    import copy

    from transformers import Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(demo_models.default_dest() / demo_models.TARGET.folder)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    target = AutoModelForCausalLM.from_config(config).eval()
    draft = copy.deepcopy(target)
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.002)
    return tokenizer, target, draft


def show(name: str, result: dict) -> None:
    def fmt(value, scale=1.0, unit=""):
        return "-" if value is None else f"{value * scale:.3g}{unit}"

    print(
        f"{name:<28} {result['requests']:>3} req {result['new_tokens']:>5} tok "
        f"{result['tokens_per_second']:7.2f} tok/s  TTFT p50 {fmt(result['ttft_p50'], 1, 's')} "
        f"p95 {fmt(result['ttft_p95'], 1, 's')}  per token p50 {fmt(result['per_token_p50'], 1000, 'ms')} "
        f"p95 {fmt(result['per_token_p95'], 1000, 'ms')}  reuse {result['prefix_reuse']:.0%}  "
        f"acceptance {fmt(result['acceptance'])}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="target model folder (default: the demo pair)")
    parser.add_argument("--draft", help="draft model folder")
    parser.add_argument("--tiny", action="store_true", help="tiny random models: a smoke run")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    tokenizer, target, draft = load(args)
    memory = MemorySampler()
    results = {"cpu": cpu_description()}
    print("CPU:", results["cpu"])

    generator = saguaro.SpeculativeGenerator(target, draft)
    run_sessions(functools.partial(through_generator, generator), tokenizer, WARMUP, concurrent=False)
    records, seconds = run_sessions(
        functools.partial(through_generator, generator), tokenizer, SESSIONS, False
    )
    results["kept_generator"] = summary(records, seconds)
    generator.close()
    show("agentic, kept generator", results["kept_generator"])

    with saguaro.Engine(target, draft) as engine:
        run_sessions(functools.partial(through_engine, engine), tokenizer, WARMUP, concurrent=True)
        records, seconds = run_sessions(functools.partial(through_engine, engine), tokenizer, SESSIONS, True)
        results["engine"] = summary(records, seconds)
        results["engine"]["later_turns_ttft_p50"] = percentile([r.ttft for r in records if r.turn > 1], 0.5)
        results["engine_method"] = str(engine.method)
        show("agentic, engine", results["engine"])
        for concurrency in (1, 4, 8):
            chat, seconds = run_chat(engine, tokenizer, concurrency)
            results[f"chat_{concurrency}"] = summary(chat, seconds)
            show(f"chat, concurrency {concurrency}", results[f"chat_{concurrency}"])

    # A cold first token: a turn-3 prompt of the measured run (the same conversation, as greedy
    # answers are exact) on a fresh engine, whose prefix caches are empty.
    turn3 = next(record.prompt for record in records if record.turn == 3)
    with saguaro.Engine(target, draft) as engine:
        _, cold = through_engine(engine, turn3, 3)
    results["cold_turn3_ttft"] = cold.ttft
    results["peak_memory_bytes"] = memory.stop()
    results["process_peak_memory_bytes"] = memory.tree_peak_over_baseline()

    later = results["engine"]["later_turns_ttft_p50"]
    ttft_ratio = later / cold.ttft
    speedup = results["engine"]["tokens_per_second"] / results["kept_generator"]["tokens_per_second"]
    results["targets"] = {"later_turn_ttft_vs_cold": ttft_ratio, "throughput_vs_kept_generator": speedup}
    print(f"engine method: {results['engine_method']}")
    print(
        f"TTFT of turns 2-3 (p50) {later:.3g}s vs a cold turn-3 first token {cold.ttft:.3g}s: "
        f"{ttft_ratio:.2f}x (target <= 0.3x)"
    )
    print(f"throughput vs the kept generator: {speedup:.2f}x (target >= 1.5x)")
    gib = 1 << 30
    if results["peak_memory_bytes"] is not None:
        print(
            f"peak memory over the start: {results['peak_memory_bytes'] / gib:.2f} GiB machine-wide, "
            f"{(results['process_peak_memory_bytes'] or 0) / gib:.2f} GiB this process"
        )
    if args.out:
        with open(args.out, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
