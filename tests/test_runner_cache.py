"""The runner's KV cache: rollback and commit_path leave it exactly as a fresh computation would."""

import pytest
import torch
from conftest import ARCHITECTURES, tiny_model

from saguaro.model.runner import ModelRunner
from saguaro.model.tree import TokenTree

PROMPT = [1, 17, 33, 5, 80, 42, 9, 64, 23, 11, 7]


def fresh_logits(model, tokens):
    """Logits of the last token from a forward over the whole sequence with no cache."""
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0, -1]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_chain_forward_matches_plain_forward(arch):
    model = tiny_model(arch)
    runner = ModelRunner(model, capacity=4)  # tiny capacity: the buffers must grow on the way
    runner.forward(PROMPT[:5])
    logits = runner.forward(PROMPT[5:])
    with torch.no_grad():
        expected = model(torch.tensor([PROMPT])).logits[0, 5:]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_rollback_then_continue_equals_recompute(arch):
    model = tiny_model(arch)
    runner = ModelRunner(model)
    runner.forward(PROMPT)
    runner.forward([3, 4, 5, 6])  # a speculation that will be rejected after its first token
    runner.rollback(len(PROMPT) + 1)
    logits = runner.forward([50])[-1]
    torch.testing.assert_close(logits, fresh_logits(model, PROMPT + [3, 50]), rtol=1e-5, atol=1e-5)


TREE = TokenTree((-1, -1, 0, 0, 1, 2, 4))  # two roots; node 6 = root 1 -> 4 -> 6


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tree_forward_scores_every_branch(arch):
    model = tiny_model(arch)
    runner = ModelRunner(model)
    runner.forward(PROMPT)
    tokens = [21, 22, 23, 24, 25, 26, 27]
    logits = runner.forward(tokens, TREE)
    for node in range(len(TREE)):
        branch = [tokens[i] for i in TREE.path_to(node)]
        torch.testing.assert_close(logits[node], fresh_logits(model, PROMPT + branch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_commit_path_then_continue_equals_recompute(arch):
    model = tiny_model(arch)
    runner = ModelRunner(model)
    runner.forward(PROMPT)
    tokens = [21, 22, 23, 24, 25, 26, 27]
    runner.forward(tokens, TREE)
    path = TREE.path_to(6)  # [1, 4, 6]: not contiguous in the block
    runner.commit_path(len(PROMPT), path)
    assert runner.length == len(PROMPT) + len(path)
    logits = runner.forward([60])[-1]
    expected = fresh_logits(model, PROMPT + [tokens[i] for i in path] + [60])
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_commit_path_rejects_unordered_indices():
    runner = ModelRunner(tiny_model())
    runner.forward(PROMPT)
    runner.forward([3, 4, 5])
    with pytest.raises(ValueError, match="increasing"):
        runner.commit_path(len(PROMPT), [2, 0])


def test_sliding_window_is_respected_past_the_window():
    # The mistral test config has a 24-token window; a 40-token context crosses it.
    model = tiny_model("mistral")
    tokens = [(7 * i + 3) % 90 + 3 for i in range(40)]
    runner = ModelRunner(model)
    runner.forward(tokens[:30])
    logits = runner.forward(tokens[30:])[-1]
    torch.testing.assert_close(logits, fresh_logits(model, tokens), rtol=1e-5, atol=1e-5)


def test_tree_validation():
    with pytest.raises(ValueError, match="parent"):
        TokenTree((-1, 2, 0))
    chain = TokenTree.chain(4)
    assert chain.is_chain and chain.depths() == [0, 1, 2, 3]
    assert TREE.depths() == [0, 0, 1, 1, 1, 2, 2]
    assert TREE.children(-1) == [0, 1] and TREE.children(0) == [2, 3]
    assert TREE.ancestor_mask()[6].nonzero().flatten().tolist() == [1, 4, 6]
