"""compile=True: compiled steps on static caches, exact, captured once.

Compiling costs seconds per graph on a CPU, so every test here uses one model shape: graphs
compiled by one test serve the next (parameters are graph inputs, so another model of the same
shape reuses them). `pytest --compile` runs the whole suite with compile=True.
"""

import logging

import pytest
import torch
from conftest import perturbed_copy, tiny_model

import saguaro
from saguaro.decode import engines
from saguaro.model import compiled_runner
from saguaro.model.compiled_runner import CompiledRunner, decode_step, tree_layout
from saguaro.model.runner import ModelRunner
from saguaro.model.static_cache import StaticKVCache
from saguaro.model.tree import TokenTree
from saguaro.tune.cost_model import LookaheadController

PROMPTS = [[1, 17, 33, 5, 80, 42, 9, 64, 23], [1, 7, 7, 8, 9, 7, 7, 8, 9, 7, 7, 8, 40, 41]]


def hf_greedy(model, prompt, max_new_tokens):
    ids = torch.tensor([prompt])
    return model.generate(
        ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, eos_token_id=[]
    )


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("llama", seed=0)
    return target, perturbed_copy(target, 0.02)


# saguaro: a compiled target beside a worker process, whose hand-back hooks sit on its layers.
@pytest.mark.parametrize("method", ["autoregressive", "speculative", "prompt_lookup", "tree", "saguaro"])
def test_compiled_methods_match_hf_greedy(pair, method, monkeypatch):
    target, draft = pair
    chains = []  # greedy chains decoded in one call: autoregressive blocks, whole draft chains
    real_chain = CompiledRunner.greedy_chain

    def greedy_chain(self, *args, **kwargs):
        chains.append(real_chain(self, *args, **kwargs))
        return chains[-1]

    monkeypatch.setattr(CompiledRunner, "greedy_chain", greedy_chain)
    with saguaro.SpeculativeGenerator(
        target, draft, method=method, speculation_schedule="constant", compile=True
    ) as generator:
        for prompt, new in zip(PROMPTS, (40, 27)):
            out = generator.generate(
                torch.tensor([prompt]), max_new_tokens=new, eos_token_id=[], return_dict_in_generate=True
            )
            assert out.sequences.tolist() == hf_greedy(target, prompt, new).tolist()
            if method != "autoregressive":  # speculation really ran: drafts kept and drafts refused
                drafted = [r for r in out.stats.round_log if r["drafted"]]
                assert any(r["accepted"] for r in drafted)
                assert any(r["accepted"] < r["drafted"] for r in drafted)
        assert type(generator.pool.static_runners["target"]).__name__ == "CompiledRunner"
    # The compiled steps attend through products on CPU; the user's model keeps its attention.
    assert target.config._attn_implementation == "sdpa"
    if method in ("autoregressive", "speculative"):
        assert sum(chain is not None for chain in chains) > 5


def test_no_recompiles_after_warm_up(pair):
    target, draft = pair
    torch._dynamo.utils.counters.clear()
    with saguaro.SpeculativeGenerator(target, draft, method="speculative", compile=True) as generator:
        generator.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=30, eos_token_id=[])  # warm-up
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        # Other prompt lengths, other output lengths, the adaptive draft length, a new generator:
        # all served by the graphs compiled above.
        with torch._dynamo.config.patch(error_on_recompile=True):
            generator.generate(torch.tensor([PROMPTS[1]]), max_new_tokens=45, eos_token_id=[])
            with saguaro.SpeculativeGenerator(target, draft, method="speculative", compile=True) as other:
                other.generate(torch.tensor([PROMPTS[0][:5]]), max_new_tokens=12, eos_token_id=[])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert not torch._dynamo.utils.counters["graph_break"]


@pytest.mark.parametrize("tree", [(-1,), (-1, 0, 1, 2, 3), (-1, 0, 0, 1, 2)], ids=["one", "chain", "tree"])
def test_decode_step_is_one_graph_without_breaks(pair, tree):
    target, _ = pair
    cache = StaticKVCache(target.config.num_hidden_layers, 64, target.device)
    depths, ancestors = tree_layout(tree, 0, len(tree), target.device)
    ids = torch.tensor([[5] * len(tree)])
    start = torch.tensor(3)
    explanation = torch._dynamo.explain(decode_step)(target, cache, ids, depths, ancestors, start, 0)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0


def test_padded_bucket_gives_the_unpadded_logits(pair):
    # A chain of 2 padded to a bucket of 5 sees exactly what it would alone.
    target, _ = pair
    runners = []
    for buckets in ((1,), (1, 5)):
        with saguaro.SpeculativeGenerator(target, method="autoregressive", compile=True) as generator:
            runner = generator.pool.runner("target", target, 64, None, buckets)
            runner.feed(PROMPTS[0])
            runners.append(runner.forward([4, 9]))
    torch.testing.assert_close(runners[0], runners[1])


def test_compile_option_checks(pair):
    target, draft = pair
    with pytest.raises(ValueError, match="compile must be True or False"):
        saguaro.SpeculativeGenerator(target, draft, method="speculative", compile="yes")
    for capacity in (0, -256, True, 256.0, "256"):
        with pytest.raises(ValueError, match="static_capacity .* must be a positive int"):
            saguaro.SpeculativeGenerator(
                target, method="autoregressive", compile=True, static_capacity=capacity
            )
    windowed = tiny_model("mistral", seed=0)
    with pytest.raises(ValueError, match="sliding-window"):
        saguaro.SpeculativeGenerator(windowed, method="autoregressive", compile=True)


def test_enable_with_compile(pair):
    target, draft = pair
    expected = hf_greedy(target, PROMPTS[0], 20)
    with saguaro.enable(target, draft, method="speculative", compile=True):
        out = target.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=20, do_sample=False, eos_token_id=[])
    assert out.tolist() == expected.tolist()


def test_greedy_block_stops_mid_block_like_hf(pair):
    # Blocks decode 8 tokens per call: an end-of-sequence token inside one must still end the output
    # right after it, and the next call must start clean.
    target, _ = pair
    free_run = hf_greedy(target, PROMPTS[0], 20)[0, len(PROMPTS[0]) :].tolist()
    eos = free_run[5]
    expected = target.generate(
        torch.tensor([PROMPTS[0]]), max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=eos
    )
    with saguaro.SpeculativeGenerator(target, method="autoregressive", compile=True) as generator:
        for max_new_tokens in (20, 3):  # a stop inside the first block, then max_new_tokens inside it
            out = generator.generate(
                torch.tensor([PROMPTS[0]]),
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                return_dict_in_generate=True,
            )
            assert out.sequences.tolist() == expected[:, : len(PROMPTS[0]) + max_new_tokens].tolist()
            # A round per output token after the prefill's, as without blocks.
            assert out.stats.rounds + 1 == out.stats.new_tokens
        assert free_run.index(eos) < 8  # the stop really fell inside the first block


def test_auto_times_the_compiled_steps_and_stays_exact(pair):
    # method="auto" with compile=True times the target and the chain drafter through the compiled
    # graphs they will run (greedy decoding per token of a block), not as eager forwards.
    target, draft = pair
    with saguaro.SpeculativeGenerator(target, draft, method="auto", compile=True) as generator:
        out = generator.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=30, eos_token_id=[])
        assert out.tolist() == hf_greedy(target, PROMPTS[0], 30).tolist()
        predicted = generator.auto_choice.predicted_tokens_per_second
    calibration = next(c for key, c in saguaro.tune.auto._calibrations[target].items() if key[-1])
    assert calibration.greedy_token is not None and calibration.draft_chain is not None
    assert predicted["autoregressive"] == pytest.approx(1 / calibration.greedy_token)


def test_outgrowing_the_static_cache_recompiles_once_per_size_and_says_so(pair, caplog, monkeypatch):
    # After a warm-up call, a call whose sequence outgrows the static cache (sized up front for 16
    # new tokens here, so it grows mid-call) doubles it: the output stays HF's, the growth is logged
    # with the option that avoids it, it compiles each bucket and chain once at the new size, and a
    # later call as long compiles nothing.
    target, _ = pair
    monkeypatch.setattr(compiled_runner, "PRESIZED_NEW_TOKENS", 16, raising=False)
    prompt = PROMPTS[0]
    counters = torch._dynamo.utils.counters
    with saguaro.SpeculativeGenerator(
        target, method="autoregressive", compile=True, static_capacity=128
    ) as generator:
        generator.generate(torch.tensor([prompt]), max_new_tokens=20, eos_token_id=[])  # warm-up
        runner = generator.pool.static_runners["target"]
        assert runner.cache.capacity == 128
        graphs = counters["stats"]["unique_graphs"]
        with caplog.at_level(logging.WARNING, logger="saguaro"):
            out = generator.generate(torch.tensor([prompt]), max_new_tokens=200, eos_token_id=[])
        assert out.tolist() == hf_greedy(target, prompt, 200).tolist()
        assert runner.cache.capacity == 256
        # At most one graph per bucket and chain for the one growth (fewer where the size was
        # compiled before in this process).
        assert counters["stats"]["unique_graphs"] - graphs <= len(runner.buckets) + len(runner.chains)
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = generator.generate(torch.tensor([prompt]), max_new_tokens=200, eos_token_id=[])
        assert again.tolist() == out.tolist()
    grown = [r.getMessage() for r in caplog.records if "static KV cache grows" in r.getMessage()]
    assert len(grown) == 1
    assert "from 128 to 256 slots" in grown[0] and "recompile" in grown[0]
    assert "static_capacity=256" in grown[0]


def test_huge_max_new_tokens_allocates_what_the_sequence_needs(pair, monkeypatch):
    # max_new_tokens=10**9 ended by an EOS after 6 tokens: HF's answer, from a static cache sized for
    # the prompt and a chunk of new tokens (16 here, to reuse the suite's 256-slot graphs), never for
    # 10**9. Sizes are checked before anything is allocated for them: a cache of 2**30 slots (and a
    # step's mask over them) would not fit in memory.
    target, _ = pair
    monkeypatch.setattr(compiled_runner, "PRESIZED_NEW_TOKENS", 16, raising=False)
    sizes = []
    real_init, real_begin_write = StaticKVCache.__init__, StaticKVCache.begin_write

    def checked(capacity):
        sizes.append(capacity)
        assert capacity <= 256, f"a static cache of {capacity} slots"

    def init(self, num_layers, capacity, device):
        checked(capacity)
        real_init(self, num_layers, capacity, device)

    def begin_write(self, start, count):  # before every forward, and so before its mask
        checked(self.capacity)
        real_begin_write(self, start, count)

    monkeypatch.setattr(StaticKVCache, "__init__", init)
    monkeypatch.setattr(StaticKVCache, "begin_write", begin_write)
    free_run = hf_greedy(target, PROMPTS[0], 20)[0, len(PROMPTS[0]) :].tolist()
    eos = free_run[5]
    expected = target.generate(
        torch.tensor([PROMPTS[0]]), max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=eos
    )
    with saguaro.SpeculativeGenerator(target, method="autoregressive", compile=True) as generator:
        with pytest.warns(saguaro.SaguaroWarning, match="max_position_embeddings"):  # as eagerly
            out = generator.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=10**9, eos_token_id=eos)
        assert generator.pool.static_runners["target"].cache.capacity == 256
    assert out.tolist() == expected.tolist()
    assert sizes and max(sizes) == 256


def test_prefill_presizes_for_a_chunk_of_new_tokens_not_all_of_them(pair):
    # The default sizing, without compiling anything (no buckets: every forward runs eagerly): a
    # prefill with max_new_tokens=10**9 ahead sizes for the prompt + PRESIZED_NEW_TOKENS, doubled
    # from the first capacity; one that fits keeps the size.
    target, _ = pair
    runner = CompiledRunner(target, 256, buckets=())
    runner.most = len(PROMPTS[0]) + 10**9
    runner.feed(PROMPTS[0])
    assert runner.cache.capacity == 2048 and runner.cache.layers[0].keys.shape[2] == 2048
    runner.reset()
    runner.most = len(PROMPTS[0]) + 100
    runner.feed(PROMPTS[0])
    assert runner.cache.capacity == 2048


def test_growing_mid_tree_keeps_every_entry(pair):
    # A static cache that grows under a tree level fed on top of cached nodes (a drafter's levels)
    # keeps the committed entries and the cached nodes in their slots: the logits are a large
    # cache's. Eager steps only (no buckets), so nothing compiles.
    target, _ = pair
    tree = TokenTree((-1, 0, 0, 1, 2, 3, 3))
    logits, capacities = [], []
    for capacity in (14, 64):
        runner = CompiledRunner(target, capacity, buckets=())
        runner.feed(PROMPTS[0])
        runner.forward([5])
        runner.forward([7, 8, 9], TokenTree((-1, 0, 0)))
        logits.append(runner.forward([10, 11, 12, 13], tree, cached_nodes=3))  # 17 entries
        assert runner.length == len(PROMPTS[0]) + 8
        capacities.append(runner.cache.capacity)
    assert capacities == [28, 64]
    torch.testing.assert_close(logits[0], logits[1])


def test_a_round_that_grew_a_static_cache_is_not_measured(pair, monkeypatch):
    # A round during which a static cache grew timed mostly compiling: the draft-length controller
    # must not learn its cost (a moving average would hold speculation off long after). Eager runners
    # here, with a growth faked during the third round's verification.
    target, draft = pair
    growths, target_forwards, observed = [0], [0], []
    monkeypatch.setattr(engines, "growth_count", lambda: growths[0], raising=False)
    real_forward, real_observe = ModelRunner.forward, LookaheadController.observe

    def forward(self, *args, **kwargs):
        if self.model is target:
            target_forwards[0] += 1
            if target_forwards[0] == 4:  # the prefill, then rounds 1, 2, 3
                growths[0] += 1
        return real_forward(self, *args, **kwargs)

    def observe(self, *args, **kwargs):
        observed.append(target_forwards[0])
        return real_observe(self, *args, **kwargs)

    monkeypatch.setattr(ModelRunner, "forward", forward)
    monkeypatch.setattr(LookaheadController, "observe", observe)
    with saguaro.SpeculativeGenerator(
        target, draft, method="speculative", draft_quantization=None, draft_vocab_size=None
    ) as generator:
        out = generator.generate(
            torch.tensor([PROMPTS[0]]), max_new_tokens=30, eos_token_id=[], return_dict_in_generate=True
        )
    assert out.sequences.tolist() == hf_greedy(target, PROMPTS[0], 30).tolist()
    assert out.stats.rounds > 4
    assert 4 not in observed and len(observed) == out.stats.rounds - 1
