"""What a newcomer pays: one-shot `saguaro.generate` calls, a fresh process's first call, peak memory.

Each scenario runs in a fresh Python process, as a user's program would, on the demo pair (or
--target/--draft), greedy, the library's defaults, one held-out prompt:

  * one-shot: `saguaro.generate(target, ids, draft_model=draft)` three times in one process, then the
    same prompt through a kept drop-in (`saguaro.enable` + `target.generate`, one warm-up call); the
    2nd and 3rd one-shot calls against the kept generator's warm call.
  * first call: a fresh process's first `saguaro.generate`, with the on-disk measurement cache cold
    (a new folder) and then warm (the same folder again); its setup is the first call's time minus
    a warm call's.
  * memory: the machine's used memory (MemTotal - MemAvailable, so the drafter worker counts too)
    sampled every 20 ms from before loading the models through `enable` + generate with `auto`,
    `speculative` and `saguaro`; its peak over the baseline against the weights' bytes.
  * staleness: after writing the target's weights through `.data`, the next call of a kept drop-in
    against HF greedy on the new weights.

    python benchmarks/first_call.py [--target DIR --draft DIR] [--max-new-tokens 96] [--bench]

`--bench` also samples the machine's memory during a bare `saguaro bench` (a few minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from saguaro.bench.memory_sampler import MemorySampler

HERE = Path(__file__).resolve().parent


# The scenarios, each run by a fresh interpreter (`python first_call.py --scenario NAME ...`).


def _load(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saguaro.bench.workload import encode

    tokenizer = AutoTokenizer.from_pretrained(args.target)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.bfloat16).eval()
    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=torch.bfloat16).eval()
    prompt = json.loads((HERE / "heldout.jsonl").read_text().splitlines()[0])["prompt"]
    return target, draft, encode(tokenizer, prompt)


def _weights_bytes(*models) -> int:
    return sum(p.numel() * p.element_size() for m in models for p in m.parameters())


def _timed(call) -> tuple[float, object]:
    start = time.perf_counter()
    out = call()
    return time.perf_counter() - start, out


def scenario_one_shot(args) -> dict:
    import saguaro

    target, draft, ids = _load(args)
    n = args.max_new_tokens
    one_shot, chosen = [], []
    for _ in range(3):
        seconds, out = _timed(
            lambda: saguaro.generate(
                target, ids, draft_model=draft, max_new_tokens=n, return_dict_in_generate=True
            )
        )
        one_shot.append(seconds)
        chosen.append(f"{out.stats.method} (setup {out.stats.setup_seconds:.2f} s)")
    out = out.sequences
    saguaro.enable(target, draft_model=draft)
    kept = [_timed(lambda: target.generate(ids, max_new_tokens=n, do_sample=False))[0] for _ in range(2)]
    saguaro.disable(target)
    return {
        "one_shot_seconds": one_shot,
        "one_shot_methods": chosen,
        "kept_seconds": kept,
        "new_tokens": out.shape[1] - ids.shape[1],
    }


def scenario_first_call(args) -> dict:
    start = time.perf_counter()
    import saguaro

    target, draft, ids = _load(args)
    loaded = time.perf_counter() - start
    n = args.max_new_tokens
    first = _timed(lambda: saguaro.generate(target, ids, draft_model=draft, max_new_tokens=n))[0]
    second = _timed(lambda: saguaro.generate(target, ids, draft_model=draft, max_new_tokens=n))[0]
    return {"load_seconds": loaded, "first_seconds": first, "second_seconds": second}


def scenario_memory(args) -> dict:
    sampler = MemorySampler()
    import saguaro

    target, draft, ids = _load(args)
    weights = _weights_bytes(target, draft)
    for method in ("auto", "speculative", "saguaro"):
        saguaro.enable(target, draft_model=draft, method=method)
        target.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
        saguaro.disable(target)
    peak = sampler.stop()
    return {
        "weights_bytes": weights,
        "peak_over_baseline_bytes": peak,
        "tree_peak_bytes": sampler.tree_peak_over_baseline(),
    }


def scenario_stale(args) -> dict:
    import torch

    import saguaro

    target, draft, ids = _load(args)
    n = 24
    saguaro.enable(target, draft_model=draft)
    target.generate(ids, max_new_tokens=n, do_sample=False)
    with torch.no_grad():
        for layer in target.model.layers[:16]:
            layer.mlp.down_proj.weight.data.mul_(1.5)
    ours = target.generate(ids, max_new_tokens=n, do_sample=False)
    saguaro.disable(target)
    reference = target.generate(ids, max_new_tokens=n, do_sample=False)
    return {"equal_after_data_write": bool(torch.equal(ours, reference))}


SCENARIOS = {
    "one_shot": scenario_one_shot,
    "first_call": scenario_first_call,
    "memory": scenario_memory,
    "stale": scenario_stale,
}


def run_scenario(name: str, args, env: dict | None = None) -> dict:
    # A finished scenario's drafter worker may outlive it by a second (it notices its parent's
    # exit by polling): let it go, so that it is not in the next scenario's memory baseline.
    time.sleep(3)
    command = [sys.executable, __file__, "--scenario", name, "--target", args.target, "--draft", args.draft]
    command += ["--max-new-tokens", str(args.max_new_tokens)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode:
        raise RuntimeError(f"scenario {name} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_memory() -> dict:
    sampler = MemorySampler()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            ["saguaro", "bench", "--out", str(Path(out) / "results.json")], check=True, capture_output=True
        )
    peak = sampler.stop()
    return {
        "seconds": time.perf_counter() - start,
        "peak_over_baseline_bytes": peak,
        "tree_peak_bytes": sampler.tree_peak_over_baseline(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="target model folder (default: the demo pair)")
    parser.add_argument("--draft", help="draft model folder")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--bench", action="store_true", help="also sample memory during a bare saguaro bench")
    parser.add_argument("--scenario", choices=SCENARIOS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scenario:
        print(json.dumps(SCENARIOS[args.scenario](args)))
        return
    if not args.target:
        from saguaro.bench import demo_models

        args.target, args.draft = map(str, demo_models.fetch_demo_pair())
    from saguaro.bench.environment import cpu_model

    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as cache:
        env = {"SAGUARO_CACHE_DIR": cache}
        cold = run_scenario("first_call", args, env)
        warm = run_scenario("first_call", args, env)
        one_shot = run_scenario("one_shot", args, env)
        memory = run_scenario("memory", args, env)
        stale = run_scenario("stale", args, env)
    kept = one_shot["kept_seconds"][-1]
    calls = one_shot["one_shot_seconds"]
    gib = 2**30
    listed = ", ".join(f"{s:.2f}" for s in calls)
    print(f"\none-shot saguaro.generate, {one_shot['new_tokens']} new tokens (s): {listed}")
    print(f"  auto chose: {', '.join(one_shot['one_shot_methods'])}")
    print(
        f"kept drop-in, warm call: {kept:.2f} s; 2nd and 3rd one-shot calls: {calls[1] / kept:.2f}x", end=""
    )
    print(f", {calls[2] / kept:.2f}x of it")
    for label, run in (("cold", cold), ("warm", warm)):
        setup = run["first_seconds"] - run["second_seconds"]
        print(
            f"fresh process, {label} disk cache: load {run['load_seconds']:.1f} s, "
            f"first call {run['first_seconds']:.1f} s, second {run['second_seconds']:.1f} s: "
            f"first-call setup {setup:.1f} s"
        )
    weights = memory["weights_bytes"]
    peak = memory["peak_over_baseline_bytes"]
    tree = memory["tree_peak_bytes"]
    print(
        "peak used memory over baseline, load + enable + generate (auto, speculative, saguaro): "
        f"{peak / gib:.2f} GiB = {peak / weights:.2f}x the weights' {weights / gib:.2f} GiB "
        f"(this process and its workers alone: {tree / gib:.2f} GiB = {tree / weights:.2f}x)"
    )
    equal = stale["equal_after_data_write"]
    print(f"after a .data write, the kept drop-in equals HF greedy on the new weights: {equal}")
    if args.bench:
        bench = bench_memory()
        peak, tree = bench["peak_over_baseline_bytes"], bench["tree_peak_bytes"]
        print(
            f"bare saguaro bench: {bench['seconds']:.0f} s, peak used memory over baseline "
            f"{peak / gib:.2f} GiB = {peak / weights:.2f}x the weights (its processes alone: "
            f"{tree / gib:.2f} GiB = {tree / weights:.2f}x)"
        )


if __name__ == "__main__":
    main()
