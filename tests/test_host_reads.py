"""The host reads a round's results once: drafting a chain and verifying a tree wait for the device
once per round, not once per token or node (on a GPU every read is a wait for the queue to drain).

A read is a tensor turned into Python values (int(), float(), bool(), .item(), .tolist(), .cpu())
by saguaro's own code; what transformers does inside a forward is not counted.
"""

import collections
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import saguaro
from saguaro.decode.sampling import SamplingConfig, TokenSampler
from saguaro.decode.verify import verify_tree_greedy, verify_tree_sampled
from saguaro.draft.drafters import ModelDrafter
from saguaro.model.tree import DynamicTree, static_tree
from saguaro.ssd.prespeculation import PreSpeculator

PACKAGE = str(Path(saguaro.__file__).parent)
READS = ("__int__", "__float__", "__bool__", "__index__", "item", "tolist", "cpu")
CHAIN = 5


@pytest.fixture
def host_reads(monkeypatch):
    """Counter of reads by saguaro's code, keyed by (file, line, how)."""
    reads = collections.Counter()

    def counting(name, real):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(PACKAGE):
                reads[(Path(caller).name, sys._getframe(1).f_lineno, name)] += 1
            return real(self, *args, **kwargs)

        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    return reads


@pytest.mark.parametrize("do_sample", [True, False], ids=["sampled", "greedy"])
def test_a_drafted_chain_is_read_once(host_reads, do_sample):
    sampler = TokenSampler(SamplingConfig(do_sample=do_sample), torch.Generator().manual_seed(0))
    drafter = ModelDrafter(tiny_model(), sampler)
    drafter.reset([1, 2, 3, 4])
    drafter.propose(CHAIN)  # the prefill's reads are not a round's
    drafter.commit([0, 1], 7)
    host_reads.clear()
    proposal = drafter.propose(CHAIN)
    assert len(proposal.tokens) == CHAIN and (proposal.probs is None) != do_sample
    assert sum(host_reads.values()) == 1, host_reads


def test_a_saguaro_model_draft_is_read_once(host_reads):
    speculator = PreSpeculator(tiny_model(), lookahead=CHAIN)
    speculator.reset([1, 2, 3, 4], SamplingConfig(do_sample=True), seed=0, draft=False)
    host_reads.clear()
    assert len(speculator.catch_up([1, 2, 3, 4, 5]).tokens) == CHAIN
    assert sum(host_reads.values()) == 1, host_reads


def test_a_tree_is_verified_with_one_read(host_reads):
    tree = static_tree([3, 2, 1])
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(len(tree) + 1, 8, generator=generator)
    tokens = torch.randint(0, 8, (len(tree),), generator=generator)
    draft = torch.softmax(torch.randn(len(tree), 8, generator=generator), -1)
    sampler = TokenSampler(SamplingConfig(do_sample=True), generator)
    verify_tree_greedy(scores, tokens, tree)  # the tree's layout is made once per shape, before
    host_reads.clear()
    verify_tree_greedy(scores, tokens, tree)
    assert sum(host_reads.values()) == 1, host_reads
    host_reads.clear()
    verify_tree_sampled(torch.softmax(scores, -1), draft, tokens, tree, sampler)
    assert sum(host_reads.values()) == 1, host_reads


@pytest.mark.parametrize(
    "shape, do_sample, reads",
    [([2, 2, 1], False, 1), ([2, 2, 1], True, 4), (DynamicTree(top_k=2, depth=3, budget=12), False, 4)],
    ids=["greedy", "sampled", "budgeted"],
)
def test_a_drafted_tree_is_read_once_or_once_per_level(host_reads, shape, do_sample, reads):
    # A fixed greedy tree's shape is known before drafting: its tokens are read once. A sampled
    # node may run out of mass and a budgeted tree keeps its likeliest offers, so their shape is
    # read once per level (3 here), then the tokens once: not once per node (6 or 10 here).
    sampler = TokenSampler(SamplingConfig(do_sample=do_sample), torch.Generator().manual_seed(0))
    drafter = ModelDrafter(tiny_model(), sampler, shape=shape)
    drafter.reset([1, 2, 3, 4])
    drafter.propose(3)
    drafter.commit([0], 7)
    host_reads.clear()
    proposal = drafter.propose(3)
    assert len(proposal.tree) >= 6 and (proposal.probs is None) != do_sample
    assert sum(host_reads.values()) == reads, host_reads
