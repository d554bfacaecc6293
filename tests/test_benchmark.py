"""`saguaro bench` end to end on tiny models saved as folders (with a word-level tokenizer)."""

import json
import statistics

import pytest
from conftest import WORDS, perturbed_copy, slow_verification, tiny_model, word_tokenizer

from saguaro import cli
from saguaro.bench import benchmark, demo_models
from saguaro.bench import prefix_scenarios as prefix_benchmark
from saguaro.bench.methods import FULL_METHODS, SAGUARO_METHODS
from saguaro.bench.workload import load_prompts


@pytest.fixture(scope="module")
def pair_on_disk(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    target = tiny_model("qwen2", seed=3)
    for name, model in (("target", target), ("draft", perturbed_copy(target, 0.01))):
        model.save_pretrained(root / name)
    # In its own folder: beside a Qwen2 config, transformers would load it as a Qwen2 tokenizer.
    word_tokenizer().save_pretrained(root / "tokenizer")
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "\n".join(
            json.dumps({"kind": kind, "prompt": " ".join(WORDS[s : s + 12])})
            for kind, s in (("code", 0), ("chat", 20), ("summary", 40))
        )
    )
    return root


def tiny_options(root, out) -> list[str]:
    """The tiny pair's word tokenizer and prompts, fp32 (greedy outputs must then equal HF's), quiet."""
    return [
        "--tokenizer",
        str(root / "tokenizer"),
        "--dtype",
        "float32",
        "--prompts",
        str(root / "prompts.jsonl"),
        "--threads",
        "1",
        "--no-progress",
        "--out",
        str(out),
    ]


@pytest.mark.timeout(600)
def test_bench_by_default_is_quick_on_the_demo_pair(pair_on_disk, tmp_path, monkeypatch):
    fetched = []

    def fake_fetch(dest=None, progress=True):
        fetched.append(dest)
        return pair_on_disk / "target", pair_on_disk / "draft"

    monkeypatch.setattr(demo_models, "fetch_demo_pair", fake_fetch)
    out = tmp_path / "results.json"
    # No --target/--draft, no --methods, no sizes; --out a folder: results.json goes into it.
    benchmark.main(tiny_options(pair_on_disk, tmp_path))
    results = json.loads(out.read_text())
    assert fetched == [None]  # the default folder ($SAGUARO_MODELS or ~/.cache/saguaro-models)
    assert results["setup"]["target"] == str(pair_on_disk / "target")
    assert results["setup"]["max_new_tokens"] == 24 and results["setup"]["run"].startswith("quick")
    summary = results["summary"]
    assert list(summary) == ["hf_greedy", "hf_assisted", "speculative", "tree", "saguaro", "auto"]
    for method, entry in summary.items():
        assert entry["runs"] == 2, method  # 2 prompts x 1 repeat
        if method != "hf_greedy":
            assert entry["outputs_matching_hf_greedy"] == "2/2", method
    assert all(0 < r["new_tokens"] <= 24 for runs in results["runs"].values() for r in runs)
    assert [r["kind"] for r in results["runs"]["tree"]] == ["chat", "code"]
    # No step-cost sweeps, hence no cost-model check or projection, in a quick run.
    assert not {"step_costs", "projection"} & set(results)
    assert all("predicted_tokens_per_second" not in entry for entry in summary.values())
    markdown = out.with_suffix(".md").read_text()
    assert "| tree |" in markdown and "--full" in markdown and "Step costs" not in markdown
    assert out.with_suffix(".png").stat().st_size > 1000


@pytest.mark.timeout(600)
def test_bench_full_writes_json_markdown_and_plot_with_every_method(pair_on_disk, tmp_path, monkeypatch):
    slow_verification(monkeypatch, 0.01)  # as a large target's: Saguaro's pre-speculation fits in it
    out = tmp_path / "results.json"
    sizes = ["--num-prompts", "2", "--repeats", "2", "--max-new-tokens", "10", "--step-repeats", "1"]
    pair = ["--target", str(pair_on_disk / "target"), "--draft", str(pair_on_disk / "draft")]
    benchmark.main(["--full", *pair, *sizes, *tiny_options(pair_on_disk, out)])
    results = json.loads(out.read_text())
    summary = results["summary"]
    assert list(summary) == list(FULL_METHODS)
    assert results["setup"]["run"] == "full" and results["setup"]["max_new_tokens"] == 10  # given wins
    for method, entry in summary.items():
        assert entry["runs"] == 4 and entry["median_tokens_per_second"] > 0
        low, high = entry["quartiles_tokens_per_second"]
        assert low <= entry["median_tokens_per_second"] <= high
        if method != "hf_greedy" and not method.endswith("+sample"):
            assert entry["outputs_matching_hf_greedy"] == "4/4", method  # fp32: identical
    assert "outputs_matching_hf_greedy" not in summary["saguaro+sample"]
    # Speculation really ran: the close draft's tokens are accepted, Saguaro's speculation cache
    # hits, and plain decoding emits exactly one token per target forward.
    assert summary["speculative+constant"]["median_accepted_length"] > 1.5
    assert summary["saguaro+constant"]["median_hit_rate"] > 0
    assert summary["autoregressive"]["median_accepted_length"] == 1
    assert set(results["step_costs"]) == {"target@1", "draft@1"}
    assert results["projection"]["speculative"]["best_k"] in range(1, 9)
    markdown = out.with_suffix(".md").read_text()
    assert "| saguaro |" in markdown and "Step costs" in markdown
    assert out.with_suffix(".png").stat().st_size > 1000

    projected = tmp_path / "projected.json"
    benchmark.main(
        [
            "--random-weights",
            "--target",
            str(pair_on_disk / "target"),
            "--draft",
            str(pair_on_disk / "draft"),
            "--dtype",
            "float32",
            "--step-repeats",
            "1",
            "--acceptance-from",
            str(out),
            "--out",
            str(projected),
        ]
    )
    gpu_mode = json.loads(projected.read_text())
    assert "projected" in gpu_mode["setup"]["mode"]
    assert (
        gpu_mode["projection"]["acceptance_per_position"] == results["projection"]["acceptance_per_position"]
    )

    quick = tmp_path / "quick.json"
    quick.write_text(json.dumps({key: value for key, value in results.items() if key != "projection"}))
    with pytest.raises(SystemExit):
        benchmark.main(["--random-weights", "--target", "x", "--draft", "y", "--acceptance-from", str(quick)])


@pytest.mark.parametrize(
    "argv",
    [
        ["--target", "x", "--draft", "y", "--methods", "medusa"],
        ["--target", "x"],  # the demo pair is both models or neither
        ["--draft", "y"],
        ["--out", "/no/such/folder/results.json"],  # found out before a long run, not after it
    ],
)
def test_bad_arguments_are_rejected_before_any_fetch(argv, monkeypatch, capsys):
    def no_fetch(dest=None, progress=True):
        raise AssertionError("fetched the demo pair for a command that was going to fail")

    monkeypatch.setattr(demo_models, "fetch_demo_pair", no_fetch)
    with pytest.raises(SystemExit):
        benchmark.main(argv)
    assert "error:" in capsys.readouterr().err


def test_a_failed_demo_fetch_ends_the_command_with_its_advice(monkeypatch, capsys):
    def offline(dest=None, progress=True):
        raise demo_models.DemoFetchError("the registry is unreachable; pass --target DIR --draft DIR")

    monkeypatch.setattr(demo_models, "fetch_demo_pair", offline)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "hello"])
    assert exit_info.value.code == 1
    assert "saguaro generate: error: the registry is unreachable; pass --target DIR --draft DIR" in (
        capsys.readouterr().err
    )


@pytest.mark.timeout(600)
def test_bench_reports_rounds_one_thread_variants_and_what_auto_chose(pair_on_disk, tmp_path):
    out = tmp_path / "results.json"
    # saguaro+1thread drafts every round (+constant): the adaptive schedule may rightly find that
    # speculation does not pay on tiny models, whose verification costs less than a worker round trip.
    methods = ["hf_greedy", "speculative+1thread", "saguaro", "saguaro+1thread+constant", "auto"]
    benchmark.main(
        ["--target", str(pair_on_disk / "target"), "--draft", str(pair_on_disk / "draft")]
        + tiny_options(pair_on_disk, out)
        + ["--methods", *methods, "--num-prompts", "2", "--max-new-tokens", "20"]
        # Two threads: a Saguaro generator splits the caller's budget, and one thread has no split.
        + ["--threads", "2"]
    )
    results = json.loads(out.read_text())
    summary = results["summary"]
    assert all(r["peak_memory_bytes"] is not None for runs in results["runs"].values() for r in runs)
    assert "peak memory" in (tmp_path / "results.md").read_text()
    for method in ("speculative+1thread", "saguaro+1thread+constant", "auto"):
        entry = summary[method]
        assert entry["outputs_matching_hf_greedy"] == "2/2"
        runs = results["runs"][method]
        assert entry["tokens_per_round"] == statistics.median(r["new_tokens"] / r["rounds"] for r in runs)
        assert 0 <= entry["wait_fraction_of_decode"] < 1
    assert summary["saguaro+1thread+constant"]["drafter_busy_seconds_per_round"] > 0
    assert summary["auto"]["chosen_methods"] and set(summary["auto"]["chosen_methods"]) <= set(
        SAGUARO_METHODS
    )
    # The draft each method ran: auto keeps tiny drafts plain, and a Saguaro worker drafts on one thread.
    assert summary["speculative+1thread"]["draft_configuration"]["variant"] == "none/full"
    assert summary["saguaro"]["draft_configuration"]["threads"] == 1
    report = (tmp_path / "results.md").read_text()
    assert "## Rounds" in report and "## Draft configuration" in report
    assert "saguaro+1thread+constant" in report


@pytest.mark.timeout(600)
def test_bench_batch_sizes_and_shared_prefix_scenarios(pair_on_disk, tmp_path, monkeypatch):
    # A system prompt the tiny models' 512 positions hold twice (the real one is ~470 tokens).
    monkeypatch.setattr(prefix_benchmark, "SYSTEM", " ".join(WORDS[:60]))
    out = tmp_path / "results.json"
    benchmark.main(
        ["--target", str(pair_on_disk / "target"), "--draft", str(pair_on_disk / "draft")]
        + tiny_options(pair_on_disk, out)
        + ["--methods", "hf_greedy", "hf_assisted", "speculative", "autoregressive"]
        + ["--num-prompts", "3", "--max-new-tokens", "12", "--batch-sizes", "1", "2"]
        + ["--shared-prefix", "--repeats-prefix", "1"]
    )
    results = json.loads(out.read_text())
    summary, runs = results["summary"], results["runs"]
    assert set(summary) == {
        "hf_greedy",
        "hf_assisted",
        "speculative",
        "autoregressive",
        "hf_greedy@batch2",
        "speculative@batch2",
        "autoregressive@batch2",
    }  # HF's assisted generation takes one sequence: no batched run of it
    # 3 prompts in batches of 2: [0, 1] and [2, 0]; every row equals HF's batched greedy (fp32).
    assert [r["prompts"] for r in runs["speculative@batch2"]] == [[0, 1], [2, 0]]
    assert summary["speculative@batch2"]["outputs_matching_hf_greedy"] == "2/2"
    assert summary["speculative@batch2"]["speedup_vs_hf_greedy"] == statistics.median(
        r["tokens_per_second"] / b["tokens_per_second"]
        for r, b in zip(runs["speculative@batch2"], runs["hf_greedy@batch2"])
    )
    # Both rows' tokens count (up to each row's EOS), as in HF's batch.
    new_tokens = [r["new_tokens"] for r in runs["speculative@batch2"]]
    assert new_tokens == [r["new_tokens"] for r in runs["hf_greedy@batch2"]] and max(new_tokens) > 12
    scenarios = {s["scenario"]: s for s in results["shared_prefix"]}
    assert set(scenarios) == {"chat turn 2", "same system prompt"}
    for scenario in scenarios.values():
        assert scenario["same_output"] and scenario["reused_prompt_tokens"] >= 60
    report = (tmp_path / "results.md").read_text()
    assert "speculative@batch2" in report and "## Prefix reuse across calls" in report


def test_the_shipped_prompts_load_without_a_prompts_file():
    # The bare `saguaro bench` reads the prompt set shipped in the package (a link to benchmarks/).
    prompts = load_prompts(None, 3)
    assert len(prompts) == 3 and all(p["prompt"] and p["kind"] for p in prompts)
