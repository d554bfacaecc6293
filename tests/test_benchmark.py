"""`saguaro bench` end to end on tiny models saved as folders (with a word-level tokenizer)."""

import json

import pytest
from conftest import WORDS, perturbed_copy, tiny_model, word_tokenizer

from saguaro import benchmark


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


@pytest.mark.timeout(600)
def test_bench_writes_json_markdown_and_plot_with_every_method(pair_on_disk, tmp_path):
    out = tmp_path / "results.json"
    benchmark.main(
        [
            "--target",
            str(pair_on_disk / "target"),
            "--draft",
            str(pair_on_disk / "draft"),
            "--tokenizer",
            str(pair_on_disk / "tokenizer"),
            "--dtype",
            "float32",
            "--prompts",
            str(pair_on_disk / "prompts.jsonl"),
            "--num-prompts",
            "2",
            "--repeats",
            "2",
            "--max-new-tokens",
            "10",
            "--threads",
            "1",
            "--step-repeats",
            "1",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    results = json.loads(out.read_text())
    summary = results["summary"]
    assert list(summary) == list(benchmark.DEFAULT_METHODS)
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


def test_unknown_method_is_rejected(pair_on_disk):
    with pytest.raises(SystemExit):
        benchmark.main(["--target", "x", "--draft", "y", "--methods", "medusa"])
