"""Tree verification as tensor operations gives exactly the node-by-node walk's results."""

import pytest
import torch

from saguaro.decode.sampling import SamplingConfig, TokenSampler
from saguaro.decode.verify import (
    tree_greedy_outcome,
    tree_layout,
    tree_rejection_outcome,
    verify_tree_greedy,
    verify_tree_sampled,
)
from saguaro.decode.verify_walk import verify_tree_greedy_walk, verify_tree_sampled_walk
from saguaro.model.tree import TokenTree, static_tree

VOCAB = 5  # small, so that drafts often match and siblings repeat tokens
REQUIRES_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=REQUIRES_CUDA)]


def random_tree(size: int, generator: torch.Generator) -> TokenTree:
    return TokenTree(tuple(int(torch.randint(-1, node, (1,), generator=generator)) for node in range(size)))


def trees(generator: torch.Generator):
    """Random forests of 1..12 nodes, plus the shapes the engines use."""
    for _ in range(300):
        yield random_tree(int(torch.randint(1, 13, (1,), generator=generator)), generator)
    for shape in ([4, 2, 1], [3, 1], [2, 2, 2]):
        for _ in range(50):
            yield static_tree(shape)


@pytest.mark.parametrize("device", DEVICES)
def test_tree_greedy_matches_the_walk(device):
    generator = torch.Generator().manual_seed(0)
    depths = []
    for tree in trees(generator):
        scores = torch.randn(len(tree) + 1, VOCAB, generator=generator)
        choice = scores.argmax(-1)
        # Mostly the parent's argmax (accepted), else a random token (often a rejection).
        tokens = torch.tensor([int(choice[p + 1]) for p in tree.parents])
        noise = torch.randint(0, VOCAB, (len(tree),), generator=generator)
        tokens = torch.where(torch.rand(len(tree), generator=generator) < 0.6, tokens, noise)
        scores, tokens = scores.to(device), tokens.to(device)
        expected = verify_tree_greedy_walk(scores, tokens, tree)
        assert verify_tree_greedy(scores, tokens, tree) == expected
        depths.append(len(expected[0]))
    # Both outcomes and deep paths were exercised.
    assert min(depths) == 0 and max(depths) >= 4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deterministic", [False, True], ids=["sampled_q", "one_hot_q"])
def test_tree_sampled_matches_the_walk(deterministic, device):
    generator = torch.Generator().manual_seed(1)
    depths = []
    for seed, tree in enumerate(trees(generator)):
        size = len(tree)
        target = torch.softmax(2 * torch.randn(size + 1, VOCAB, generator=generator), -1)
        target[:, 0] = 0  # a token the target never emits
        target = target / target.sum(-1, keepdim=True)
        draft = torch.softmax(2 * torch.randn(size, VOCAB, generator=generator), -1)
        tokens = torch.multinomial(draft, 1, generator=generator)[:, 0]
        if deterministic:  # top-k children / prompt lookup: verified as q = one-hot(x)
            draft = torch.nn.functional.one_hot(tokens, VOCAB).float()
        results = []
        for verify in (verify_tree_sampled_walk, verify_tree_sampled):
            generator = torch.Generator(device).manual_seed(seed)
            sampler = TokenSampler(SamplingConfig(do_sample=True), generator)
            results.append(verify(target.to(device), draft.to(device), tokens.to(device), tree, sampler))
        assert results[1] == results[0], tree
        depths.append(len(results[0][0]))
    assert min(depths) == 0 and max(depths) >= 3


def test_one_layout_per_tree_shape():
    tree = static_tree([2, 2])
    assert tree_layout(tree, torch.device("cpu")) is tree_layout(TokenTree(tree.parents), torch.device("cpu"))


@pytest.mark.parametrize("shape", [[4, 2, 1], [2, 2, 2]])
def test_device_side_is_one_graph_without_breaks(shape):
    """What a round does on the device traces as one graph (fullgraph=True raises at any break),
    so it can be compiled or captured; the eager backend keeps the check cheap."""
    tree = static_tree(shape)
    layout = tree_layout(tree, torch.device("cpu"))
    generator = torch.Generator().manual_seed(2)
    scores = torch.randn(len(tree) + 1, VOCAB, generator=generator)
    draft = torch.softmax(torch.randn(len(tree), VOCAB, generator=generator), -1)
    tokens = torch.multinomial(draft, 1, generator=generator)[:, 0]
    uniforms = torch.rand(len(tree), generator=generator)
    greedy = torch.compile(tree_greedy_outcome, fullgraph=True, backend="eager")
    sampled = torch.compile(tree_rejection_outcome, fullgraph=True, backend="eager")
    for compiled, eager, args in (
        (greedy, tree_greedy_outcome, (scores, tokens, layout)),
        (sampled, tree_rejection_outcome, (torch.softmax(scores, -1), draft, tokens, uniforms, layout)),
    ):
        for got, expected in zip(compiled(*args), eager(*args)):
            assert torch.equal(got, expected)
