"""Batched speculative decoding: every live row verified in one target forward per round, each row
accepting its own count, finished rows dropping out; each row exactly as alone."""

import pytest
import torch
from conftest import perturbed_copy, tiny_model
from stats_helpers import argmax_with_sampled_q, chi_square_pvalue
from test_sampling_exact import exact_joint

import saguaro
from saguaro.decode.batched import BatchedModelDrafter
from saguaro.decode.stats import GenerationStats
from saguaro.model import batched_runner

PROMPTS = [[1, 17, 33, 5, 80, 42, 9, 64, 23], [1, 5, 6], [1, 44, 45, 46, 47, 48], [1, 90, 12, 13, 14, 15, 16]]


def left_padded(prompts, pad=0):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def alone(model, prompt, max_new_tokens, eos_token_id=None):
    """The target's own greedy generate() on one prompt: the reference for its row."""
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=eos_token_id,
    )
    return out[0, len(prompt) :].tolist()


def speculative_batch(target, draft, max_new_tokens, **options):
    """saguaro.generate on the left-padded PROMPTS with method="speculative" and a plain draft
    unless `options` say otherwise; returns (ids, output with .stats)."""
    ids, mask = left_padded(PROMPTS)
    options = {
        "method": "speculative",
        "eos_token_id": [],
        "draft_quantization": None,
        "draft_vocab_size": None,
        **options,
    }
    out = saguaro.generate(
        target,
        ids,
        draft_model=draft,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        return_dict_in_generate=True,
        **options,
    )
    return ids, out


def target_forward_shapes(model):
    """(rows, tokens) of every forward of `model` (a hook; remove it with .remove())."""
    shapes = []

    def hook(module, args, kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))

    return shapes, model.register_forward_pre_hook(hook, with_kwargs=True)


# The prefill: every prompt packed into one sequence, no padding, their common first token fed once.
PACKED_PREFILL = (1, sum(len(prompt) for prompt in PROMPTS) - (len(PROMPTS) - 1))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "mistral"])
def test_each_row_equals_its_prompt_alone_with_ragged_acceptance(arch):
    # gpt2: learned absolute positions; mistral: a sliding window the 48 tokens cross.
    target = tiny_model(arch, seed=0)
    draft = perturbed_copy(target, 0.003)
    shapes, hook = target_forward_shapes(target)
    ids, out = speculative_batch(target, draft, 48, speculation_schedule="constant")
    hook.remove()
    for row, prompt in enumerate(PROMPTS):
        assert out.sequences[row, ids.shape[1] :].tolist() == alone(target, prompt, 48, eos_token_id=[]), row
    stats = out.stats
    assert stats.drafted > 0 and 0 < stats.accepted < stats.drafted  # speculation, some of it rejected
    logs = [row.round_log for row in out.row_stats]
    assert any(len({log[i]["accepted"] for log in logs if i < len(log)}) > 1 for i in range(len(logs[0]))), (
        "no round where rows accepted different counts"
    )
    # One target forward per round for all live rows (plus the prefill), all 4 rows at once.
    assert len(shapes) == 1 + max(len(log) for log in logs)
    assert shapes[0] == PACKED_PREFILL and shapes[1][0] == len(PROMPTS)


def test_a_prefill_over_the_packing_budget_runs_in_groups_and_stays_exact(monkeypatch):
    # Prompts of 9, 3, 6 and 7 tokens under a 9-token budget: [9], [3 + 6 - the shared 1], [7].
    monkeypatch.setattr(batched_runner, "PACKED_PREFILL_TOKENS", 9)
    target = tiny_model("mistral", seed=1)  # a sliding window, masked per packed row too
    draft = perturbed_copy(target, 0.003)
    shapes, hook = target_forward_shapes(target)
    ids, out = speculative_batch(target, draft, 20, speculation_schedule="constant")
    hook.remove()
    assert shapes[:4] == [(1, 9), (1, 8), (1, 7), (len(PROMPTS), 5)]
    assert out.stats.drafted > out.stats.accepted > 0
    for row, prompt in enumerate(PROMPTS):
        assert out.sequences[row, ids.shape[1] :].tolist() == alone(target, prompt, 20, eos_token_id=[]), row


SYSTEM = [1, 7, 8, 9, 10, 11, 12]  # a system prompt every request starts with
ALIKE = [SYSTEM + [20, 21, 22], SYSTEM + [30], SYSTEM + [40, 41, 42, 43, 44]]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral"])
def test_rows_that_start_alike_feed_their_common_prefix_once(arch, monkeypatch):
    target = tiny_model(arch, seed=4)
    shapes, hook = target_forward_shapes(target)
    shared = batched_runner.BatchedRunner(target)
    logits, _ = shared.prefill(ALIKE)
    hook.remove()
    # The second row keeps its last token (whose logits it needs): the common prefix is SYSTEM.
    assert shapes == [(1, len(SYSTEM) + 3 + 1 + 5)]
    monkeypatch.setattr(batched_runner, "_shared_prefix", lambda rests: [])
    alone_rows = batched_runner.BatchedRunner(target)
    expected, _ = alone_rows.prefill(ALIKE)
    torch.testing.assert_close(logits, expected)
    for row in range(len(ALIKE)):
        for (keys, values), (want_keys, want_values) in zip(shared.row_kv(row), alone_rows.row_kv(row)):
            torch.testing.assert_close(keys, want_keys)
            torch.testing.assert_close(values, want_values)
    assert torch.equal(shared.slot_positions, alone_rows.slot_positions)
    assert torch.equal(shared.visible, alone_rows.visible)


def test_a_batch_sharing_a_system_prompt_equals_each_prompt_alone():
    target = tiny_model("qwen2", seed=5)
    draft = perturbed_copy(target, 0.003)
    ids, mask = left_padded(ALIKE)
    shapes, hook = target_forward_shapes(target)
    out = saguaro.generate(
        target,
        ids,
        draft_model=draft,
        attention_mask=mask,
        max_new_tokens=24,
        method="speculative",
        eos_token_id=[],
        draft_quantization=None,
        draft_vocab_size=None,
        speculation_schedule="constant",
        prefix_cache=False,
        return_dict_in_generate=True,
    )
    hook.remove()
    assert shapes[0] == (1, len(SYSTEM) + 9)
    assert out.stats.drafted > out.stats.accepted > 0
    for row, prompt in enumerate(ALIKE):
        assert out.sequences[row, ids.shape[1] :].tolist() == alone(target, prompt, 24, eos_token_id=[]), row


def test_the_shared_prefix_leaves_every_row_its_last_token():
    assert batched_runner._shared_prefix([[1, 2, 3]]) == []  # one row: nothing to share
    assert batched_runner._shared_prefix([[1, 2, 3], [1, 2, 3]]) == [1, 2]
    assert batched_runner._shared_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2]]) == [1]
    assert batched_runner._shared_prefix([[1, 2], [3, 2]]) == []


def test_rows_finish_at_different_times_and_drop_out():
    target = tiny_model("llama", seed=0)
    draft = perturbed_copy(target, 0.003)
    free = [alone(target, prompt, 40, eos_token_id=[]) for prompt in PROMPTS]
    # An EOS that row 0 emits early and row 1 never does: rows end at EOS and at max_new_tokens.
    eos = next(t for t in free[0][2:12] if t not in free[1])
    shapes, hook = target_forward_shapes(target)
    ids, out = speculative_batch(target, draft, 40, eos_token_id=eos, pad_token_id=0)
    hook.remove()
    lengths = []
    for row, prompt in enumerate(PROMPTS):
        expected = alone(target, prompt, 40, eos_token_id=eos)
        new = out.sequences[row, ids.shape[1] :].tolist()
        assert new[: len(expected)] == expected and set(new[len(expected) :]) <= {0}, row
        lengths.append(len(expected))
        assert out.row_stats[row].new_tokens == len(expected)
    assert lengths[0] < 12 and lengths[1] == 40
    assert shapes[-1][0] < len(PROMPTS)  # finished rows left the batch
    # The merged stats of a batch count every row, but its time once (the rows ran side by side).
    assert out.stats.new_tokens == sum(lengths)
    assert out.stats.total_seconds == max(row.total_seconds for row in out.row_stats)


@pytest.mark.parametrize("method", ["autoregressive", "prompt_lookup", "saguaro", "auto"])
def test_every_batched_method_equals_each_prompt_alone(method):
    # Adaptive draft lengths (the default schedule): rounds mix speculation and plain batched steps.
    target = tiny_model("qwen2", seed=3)
    draft = perturbed_copy(target, 0.01)
    ids, mask = left_padded(PROMPTS)
    shapes, hook = target_forward_shapes(target)
    with saguaro.SpeculativeGenerator(target, draft, method=method, placement="inline") as generator:
        out = generator.generate(
            ids, max_new_tokens=30, attention_mask=mask, eos_token_id=[], return_dict_in_generate=True
        )
    hook.remove()
    for row, prompt in enumerate(PROMPTS):
        assert out.sequences[row, ids.shape[1] :].tolist() == alone(target, prompt, 30, eos_token_id=[]), row
    if method != "auto":  # auto may choose a tree, whose batch runs row after row
        # One forward per round for all rows: a prefill and at most 29 steps, not 4 x 30 forwards.
        assert shapes[0] == PACKED_PREFILL and shapes[1][0] == len(PROMPTS) and len(shapes) <= 30
    if method == "saguaro":  # served by the batched speculative loop
        assert out.stats.method == "speculative" and out.stats.drafted > 0


def test_enabled_generate_of_a_batch_equals_hf_batched_generate():
    target = tiny_model("gemma", seed=2)
    draft = perturbed_copy(target, 0.003)
    ids, mask = left_padded(PROMPTS)
    kwargs = dict(attention_mask=mask, max_new_tokens=32, do_sample=False, repetition_penalty=1.2)
    expected = target.generate(ids, **kwargs)
    with saguaro.enable(target, draft_model=draft, method="speculative", strict=True):
        out = target.generate(ids, **kwargs, return_dict_in_generate=True)
    assert out.sequences.tolist() == expected.tolist()
    assert out.stats.accepted > 0 and len(out.row_stats) == len(PROMPTS)


VOCAB = 6
SAMPLED_PROMPTS = [[1, 4, 3], [1, 5, 2, 4, 3]]  # the first is left-padded


def sampled_batch_counts(target, draft, samples: int, seed: int) -> torch.Tensor:
    """Counts of each row's first three sampled tokens over `samples` batched calls: the first from
    the prefill, the next from a round of two drafts per row, then (after a rejection) the next."""
    ids, mask = left_padded(SAMPLED_PROMPTS)
    counts = torch.zeros(len(SAMPLED_PROMPTS), VOCAB, VOCAB, VOCAB)
    drafted = 0
    torch.manual_seed(seed)
    with saguaro.SpeculativeGenerator(
        target, draft, method="speculative", num_speculative_tokens=2, speculation_schedule="constant"
    ) as generator:
        for _ in range(samples):
            out = generator.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=4,
                do_sample=True,
                temperature=0.9,
                eos_token_id=[],
                return_dict_in_generate=True,
            )
            drafted += out.stats.drafted
            for row in range(len(SAMPLED_PROMPTS)):
                counts[(row, *out.sequences[row, ids.shape[1] : ids.shape[1] + 3].tolist())] += 1
    assert drafted > samples  # every call speculated
    return counts


@pytest.fixture(scope="module")
def small_vocab_pair():
    target = tiny_model("llama", seed=0, vocab=VOCAB, layers=1, hidden=16, init=0.6)
    return target, tiny_model("llama", seed=5, vocab=VOCAB, layers=1, hidden=16, init=0.6)


def row_pvalues(target, counts) -> list[float]:
    return [
        chi_square_pvalue(counts[row], exact_joint(target, 3, prompt=prompt, temperature=0.9))
        for row, prompt in enumerate(SAMPLED_PROMPTS)
    ]


@pytest.mark.timeout(300)
def test_sampled_batch_rows_have_the_target_distribution(small_vocab_pair):
    target, draft = small_vocab_pair
    counts = sampled_batch_counts(target, draft, samples=1500, seed=21)
    assert min(row_pvalues(target, counts)) > 1e-3


@pytest.mark.timeout(300)
def test_sampled_batch_test_catches_draft_not_drawn_from_q(small_vocab_pair, monkeypatch):
    # Planted bug (HF #47932): propose each row's argmax while reporting the q it should be drawn from.
    real_propose = BatchedModelDrafter.propose

    def greedy_tokens_sampled_q(self, depths):
        return [argmax_with_sampled_q(p) for p in real_propose(self, depths)]

    monkeypatch.setattr(BatchedModelDrafter, "propose", greedy_tokens_sampled_q)
    target, draft = small_vocab_pair
    counts = sampled_batch_counts(target, draft, samples=1500, seed=21)
    assert min(row_pvalues(target, counts)) < 1e-6


def test_concurrent_merge_takes_the_longest_row_time():
    rows = [
        GenerationStats("speculative", new_tokens=3, total_seconds=2.0),
        GenerationStats("speculative", new_tokens=7, total_seconds=5.0),
    ]
    merged = GenerationStats.merge(rows, concurrent=True)
    assert (merged.new_tokens, merged.total_seconds) == (10, 5.0)
    assert GenerationStats.merge(rows).total_seconds == 7.0


def test_batches_reuse_and_store_prefixes_with_unchanged_output():
    target = tiny_model("qwen2", seed=3)
    draft = perturbed_copy(target, 0.01)
    system = [1, *range(10, 40)]  # a shared "system prompt"
    first = [system + [50, 51], system + [60, 61, 62]]
    options = dict(method="speculative", speculation_schedule="constant", draft_quantization=None)
    with saguaro.SpeculativeGenerator(target, draft, **options) as warm:
        ids, mask = left_padded(first)
        out = warm.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
        answer = out[0, ids.shape[1] :].tolist()
        # Turn 2 of row 0's chat, another request behind the system prompt, and an unrelated prompt.
        second = [first[0] + answer + [70, 71], system + [80], [1, 90, 91, 92]]
        ids, mask = left_padded(second)
        result = warm.generate(
            ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[], return_dict_in_generate=True
        )
        single = warm.generate(
            torch.tensor([second[1]]), max_new_tokens=12, eos_token_id=[], return_dict_in_generate=True
        )
    reused = [row.reused_prompt_tokens for row in result.row_stats]
    assert reused == [len(first[0]) + len(answer) - 1, len(system), 1]  # the last: its BOS
    assert result.stats.drafted > result.stats.accepted > 0
    for row, prompt in enumerate(second):
        assert result.sequences[row, ids.shape[1] :].tolist() == alone(target, prompt, 12, eos_token_id=[]), (
            row
        )
    # A single row reads what the batch stored (the whole of second[1] but its last token).
    assert single.stats.reused_prompt_tokens == len(second[1]) - 1
    assert single.sequences[0, len(second[1]) :].tolist() == alone(target, second[1], 12, eos_token_id=[])


@pytest.mark.parametrize(
    "quantization, vocab_size", [("int8", None), ("int4", 48)], ids=["int8", "int4+vocab48"]
)
def test_compressed_drafts_serve_a_batch(quantization, vocab_size):
    # The quantized kernels take contiguous activations; a batch's last positions are a strided view.
    target = tiny_model("llama", seed=0, hidden=128)
    draft = perturbed_copy(target, 0.003)
    ids, out = speculative_batch(
        target,
        draft,
        24,
        speculation_schedule="constant",
        draft_quantization=quantization,
        draft_vocab_size=vocab_size,
    )
    for row, prompt in enumerate(PROMPTS):
        assert out.sequences[row, ids.shape[1] :].tolist() == alone(target, prompt, 24, eos_token_id=[]), row
    assert 0 < out.stats.accepted < out.stats.drafted
