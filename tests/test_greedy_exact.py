"""Greedy output of every method is token-for-token the target's own greedy generate() (fp32)."""

import pytest
import torch
from conftest import ARCHITECTURES, perturbed_copy, tiny_model

import saguaro

PROMPT = torch.tensor([[1, 17, 33, 5, 80, 42, 9, 64, 23]])


def hf_greedy(model, ids, max_new_tokens, eos_token_id=None):
    kwargs = {} if eos_token_id is None else {"eos_token_id": eos_token_id}
    return model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("draft_kind", ["agreeing", "disagreeing"])
def test_speculative_greedy_matches_target(arch, draft_kind):
    target = tiny_model(arch, seed=0)
    # An agreeing draft exercises long accepted runs and the bonus token; an unrelated one makes
    # almost every first draft token wrong, exercising the correction path.
    draft = perturbed_copy(target, 0.003) if draft_kind == "agreeing" else tiny_model(arch, seed=1)
    expected = hf_greedy(target, PROMPT, 48, eos_token_id=[])
    out = saguaro.generate(
        target,
        PROMPT,
        draft_model=draft,
        method="speculative",
        max_new_tokens=48,
        speculation_schedule="constant",
        num_speculative_tokens=4,
        eos_token_id=[],
        return_dict_in_generate=True,
    )
    assert out.sequences.tolist() == expected.tolist()
    hist = out.stats.accepted_histogram
    if draft_kind == "agreeing":
        assert out.stats.acceptance_rate > 0.5 and hist[-1] > 0
    else:
        assert hist[0] > sum(hist) / 2


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_autoregressive_greedy_matches_target(arch):
    target = tiny_model(arch, seed=0)
    expected = hf_greedy(target, PROMPT, 40, eos_token_id=[])
    out = saguaro.generate(target, PROMPT, method="autoregressive", max_new_tokens=40, eos_token_id=[])
    assert out.tolist() == expected.tolist()


@pytest.mark.parametrize("k", [1, 2, 7])
def test_every_lookahead_matches_target(k):
    target = tiny_model("qwen2", seed=3)
    draft = perturbed_copy(target, 0.01)
    expected = hf_greedy(target, PROMPT, 33, eos_token_id=[])
    out = saguaro.generate(
        target,
        PROMPT,
        draft_model=draft,
        max_new_tokens=33,
        speculation_schedule="constant",
        num_speculative_tokens=k,
        eos_token_id=[],
    )
    assert out.tolist() == expected.tolist()


def test_draft_with_larger_vocabulary():
    # Same tokenizer, padded embedding: the draft may propose ids the target never emits.
    target = tiny_model("llama", seed=0, vocab=96)
    draft = tiny_model("llama", seed=4, vocab=100)  # padded by 4 rows, as families pad embeddings
    expected = hf_greedy(target, PROMPT, 30, eos_token_id=[])
    out = saguaro.generate(
        target, PROMPT, draft_model=draft, max_new_tokens=30, eos_token_id=[], speculation_schedule="constant"
    )
    assert out.tolist() == expected.tolist()


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize(
    "branching",
    [[3, 2, 1], [1, 1, 1, 1], [4], saguaro.DynamicTree(4, 3, 10)],
    ids=["static", "chain", "one-level", "dynamic"],
)
def test_tree_greedy_matches_target(arch, branching):
    target = tiny_model(arch, seed=0)
    draft = perturbed_copy(target, 0.01)
    expected = hf_greedy(target, PROMPT, 40, eos_token_id=[])
    out = saguaro.generate(
        target,
        PROMPT,
        draft_model=draft,
        method="tree",
        tree_branching=branching,
        max_new_tokens=40,
        eos_token_id=[],
        return_dict_in_generate=True,
    )
    assert out.sequences.tolist() == expected.tolist()
    depth = branching.depth if isinstance(branching, saguaro.DynamicTree) else len(branching)
    assert len(out.stats.accepted_histogram) - 1 <= depth


def test_tree_accepts_more_than_chain_with_a_weak_draft():
    # Siblings give the target more chances to find its token: a behavioural check that the tree is
    # really searched, not only its first branch.
    target = tiny_model("llama", seed=0)
    draft = perturbed_copy(target, 0.03)
    kwargs = dict(draft_model=draft, max_new_tokens=60, eos_token_id=[], return_dict_in_generate=True)
    kwargs["speculation_schedule"] = "constant"  # full trees: the adaptive depth follows timings
    chain = saguaro.generate(target, PROMPT, method="tree", tree_branching=[1, 1, 1], **kwargs)
    tree = saguaro.generate(target, PROMPT, method="tree", tree_branching=[4, 2, 1], **kwargs)
    assert tree.sequences.tolist() == chain.sequences.tolist()
    assert tree.stats.mean_accepted_length > chain.stats.mean_accepted_length


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
def test_tree_with_tree_attention_kernel_matches_target(arch):
    # The target verifies through the "saguaro_tree" backend: packed tree mask, our kernel
    # (its SDPA fallback on CPU without the Triton interpreter).
    target = tiny_model(arch, seed=0)
    expected = hf_greedy(target, PROMPT, 40, eos_token_id=[])
    target.set_attn_implementation(saguaro.TREE_ATTENTION)
    out = saguaro.generate(
        target,
        PROMPT,
        draft_model=perturbed_copy(target, 0.01),
        method="tree",
        tree_branching=[3, 2, 1],
        max_new_tokens=40,
        eos_token_id=[],
    )
    assert out.tolist() == expected.tolist()


def test_best_prefixes_keeps_siblings_in_draw_order():
    from saguaro.draft.drafters import best_prefixes

    offers = [[(10, None, 0.2), (11, None, 0.7)], [(20, None, 0.5), (21, None, 0.4)]]
    # Sibling 11 scores best but comes after 10 in draw order: it can only follow 10.
    assert best_prefixes(offers, [1.0, 1.0], 1) == [(1, 0)]
    assert best_prefixes(offers, [1.0, 1.0], 3) == [(0, 0), (1, 0), (1, 1)]
    assert best_prefixes(offers, [1.0, 0.1], 2) == [(0, 0), (0, 1)]
    assert best_prefixes(offers, [1.0, 1.0], None) == [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_prompt_lookup_greedy_matches_target(arch):
    target = tiny_model(arch, seed=0)
    expected = hf_greedy(target, PROMPT, 48, eos_token_id=[])
    out = saguaro.generate(
        target,
        PROMPT,
        method="prompt_lookup",
        max_new_tokens=48,
        speculation_schedule="constant",
        eos_token_id=[],
        return_dict_in_generate=True,
    )
    assert out.sequences.tolist() == expected.tolist()
    assert out.stats.accepted > 0  # random tiny models loop, so copying from the sequence pays


def test_lookup_continuation_prefers_the_longest_latest_match():
    from saguaro.draft.drafters import lookup_continuation

    tokens = [5, 6, 7, 1, 5, 6, 8, 2, 6, 7, 3, 5, 6]
    assert lookup_continuation(tokens, 3) == [8, 2, 6]  # "5 6" last seen before "8 2 6"
    assert lookup_continuation(tokens + [7], 2) == [1, 5]  # "5 6 7" (at the start) beats the later "6 7"
    assert lookup_continuation([1, 2, 3], 4) == []
