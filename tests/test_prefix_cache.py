"""Prefix KV reuse across calls: the radix tree, and generations that reuse a stored prefix giving
exactly the output of a cold generation and of HF greedy (fp32)."""

import copy
import pickle

import pytest
import torch
from conftest import ARCHITECTURES, perturbed_copy, tiny_model

import saguaro
from saguaro.decode.sampling import SamplingConfig
from saguaro.model.prefix_cache import PrefixCache
from saguaro.model.runner import ModelRunner
from saguaro.ssd.prespeculation import PreSpeculator

pytestmark = pytest.mark.timeout(300)

SYSTEM = [1, 17, 33, 5, 80, 42, 9, 64, 23, 11, 7, 50]  # a "system prompt" several requests share
NEW = 16
QUIET = dict(speculation_schedule="constant", draft_quantization=None, draft_vocab_size=None)


def fake_kv(tokens, layers=2):
    """KV whose entries are their own tokens (layer l: token + l), so slices can be checked."""
    t = torch.tensor(tokens, dtype=torch.float32).reshape(1, 1, -1, 1)
    return [(t + layer, -(t + layer)) for layer in range(layers)]


BYTES_PER_FAKE_TOKEN = 2 * 2 * 4  # 2 layers x (K, V) x one float32


def stored(cache, tokens):
    """(matched length, the matched tokens as read back from layer 0's keys)."""
    n, kv = cache.lookup(tokens)
    return n, kv[0][0].flatten().int().tolist() if kv else []


# -- the radix tree ---------------------------------------------------------------------------


def test_longest_match_and_split_on_partial_match():
    cache = PrefixCache()
    cache.insert([1, 2, 3, 4], fake_kv([1, 2, 3, 4]))
    cache.insert([1, 2, 5, 6], fake_kv([1, 2, 5, 6]))  # diverges inside the first node: split at 2
    assert sorted(cache._root.children[1].children) == [3, 5]
    assert cache._root.children[1].tokens == (1, 2)
    assert stored(cache, [1, 2, 3, 4, 9]) == (4, [1, 2, 3, 4])
    assert stored(cache, [1, 2, 5]) == (3, [1, 2, 5])  # a match that ends inside a node
    assert stored(cache, [1, 2, 7]) == (2, [1, 2])
    assert stored(cache, [7, 1]) == (0, [])
    _, kv = cache.lookup([1, 2, 5, 6])
    assert kv[1][1].flatten().tolist() == [-2.0, -3.0, -6.0, -7.0]  # every layer, keys and values
    assert len(cache) == 6 and cache.nbytes == 6 * BYTES_PER_FAKE_TOKEN  # the shared [1, 2] once


def test_inserting_a_stored_prefix_adds_nothing():
    cache = PrefixCache()
    cache.insert([1, 2, 3, 4], fake_kv([1, 2, 3, 4]))
    cache.insert([1, 2], fake_kv([1, 2]))
    assert cache._root.children[1].tokens == (1, 2, 3, 4)  # no split for a sequence already held
    assert len(cache) == 4 and cache.nbytes == 4 * BYTES_PER_FAKE_TOKEN
    cache.insert([1, 2, 3, 4, 8], fake_kv([1, 2, 3, 4, 8]))  # extends a leaf: only [8] is new
    assert stored(cache, [1, 2, 3, 4, 8]) == (5, [1, 2, 3, 4, 8]) and len(cache) == 5


def test_least_recently_used_leaf_is_evicted_first():
    cache = PrefixCache(max_bytes=8 * BYTES_PER_FAKE_TOKEN)
    cache.insert([1, 2, 3], fake_kv([1, 2, 3]))
    cache.insert([4, 5, 6], fake_kv([4, 5, 6]))
    cache.lookup([1, 2, 3, 9])  # [1, 2, 3] is now more recent than [4, 5, 6]
    cache.insert([7, 8, 9], fake_kv([7, 8, 9]))  # 9 tokens > 8: one must go
    assert stored(cache, [4, 5, 6])[0] == 0
    assert stored(cache, [1, 2, 3]) == (3, [1, 2, 3]) and stored(cache, [7, 8, 9]) == (3, [7, 8, 9])
    assert cache.nbytes == 6 * BYTES_PER_FAKE_TOKEN


def test_eviction_takes_leaves_so_a_shared_prefix_outlives_its_branches():
    cache = PrefixCache(max_bytes=7 * BYTES_PER_FAKE_TOKEN)
    cache.insert([1, 2, 3, 4], fake_kv([1, 2, 3, 4]))
    cache.insert([1, 2, 5, 6], fake_kv([1, 2, 5, 6]))
    cache.insert([9, 9], fake_kv([9, 9]))  # 8 tokens: the oldest leaf, [3, 4], goes
    assert stored(cache, [1, 2, 3, 4]) == (2, [1, 2])
    assert stored(cache, [1, 2, 5, 6])[0] == 4 and stored(cache, [9, 9])[0] == 2


def test_a_sequence_larger_than_the_budget_keeps_the_prefix_that_fits():
    cache = PrefixCache(max_bytes=4 * BYTES_PER_FAKE_TOKEN)
    cache.insert([1, 2, 3, 4, 5, 6], fake_kv([1, 2, 3, 4, 5, 6]))
    assert stored(cache, [1, 2, 3, 4, 5, 6]) == (4, [1, 2, 3, 4])


def test_bad_budgets_and_short_kv_raise():
    for bad in (-1, 0, 1.5, True, "1GiB"):
        with pytest.raises(ValueError, match="positive int"):
            PrefixCache(bad)
    with pytest.raises(ValueError, match="3 positions but 4 tokens"):
        PrefixCache().insert([1, 2, 3, 4], fake_kv([1, 2, 3]))
    target = tiny_model()
    with pytest.raises(ValueError, match="prefix_cache=False"):
        saguaro.SpeculativeGenerator(target, method="autoregressive", prefix_cache_bytes=-5)
    with pytest.raises(ValueError, match="True or False"):
        saguaro.SpeculativeGenerator(target, method="autoregressive", prefix_cache="yes")


# -- the runner -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_feed_loads_the_stored_prefix_and_continues_as_a_full_prefill(arch):
    model = tiny_model(arch)
    prefixes = PrefixCache()
    first = ModelRunner(model, prefix_cache=prefixes)
    assert first.feed(SYSTEM)[1] == 0
    first.remember(SYSTEM + [3, 4])  # the cache holds only SYSTEM: only that is stored
    assert len(prefixes) == len(SYSTEM)
    sequence = SYSTEM + [40, 41, 42]
    second = ModelRunner(model, capacity=4, prefix_cache=prefixes)  # the buffers grow to the prefix
    logits, reused = second.feed(sequence)
    assert reused == len(SYSTEM) and second.length == len(sequence)
    with torch.no_grad():
        expected = model(torch.tensor([sequence])).logits[0, -1]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # The last token is always computed, even when the whole sequence is stored.
    assert ModelRunner(model, prefix_cache=prefixes).feed(SYSTEM)[1] == len(SYSTEM) - 1


# -- generations ------------------------------------------------------------------------------


def hf_greedy(model, ids, max_new_tokens=NEW):
    # An explicit mask: an answer may contain the pad id, 0, which HF would otherwise mask out.
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=[],
        pad_token_id=0,
    ).tolist()


def generator_for(method, target, draft, **options):
    extra = {"placement": "process"} if method == "saguaro" else {}
    return saguaro.SpeculativeGenerator(target, draft, method=method, **QUIET, **extra, **options)


def run(generator, ids):
    return generator.generate(ids, max_new_tokens=NEW, eos_token_id=[], return_dict_in_generate=True)


def held(generator, sequence: torch.Tensor) -> set[int]:
    """How much of a finished sequence the target's cache held: all but its last token, which was
    never fed; compiled autoregressive decoding (`pytest --compile`) feeds 8 tokens a call, so its
    last block may have fed that token too (with its true KV)."""
    length = sequence.shape[1]
    blocks = generator.options.compile and generator.method == "autoregressive"
    return {length - 1, length} if blocks else {length - 1}


def accepted_per_round(out):
    return [(r["drafted"], r["accepted"]) for r in out.stats.round_log]


@pytest.fixture
def feeds(monkeypatch):
    """[(model, reused)] for every ModelRunner.feed in this process."""
    calls, real_feed = [], ModelRunner.feed

    def recorded(self, tokens):
        logits, reused = real_feed(self, tokens)
        calls.append((self.model, reused))
        return logits, reused

    monkeypatch.setattr(ModelRunner, "feed", recorded)
    return calls


@pytest.mark.parametrize("method", ["autoregressive", "speculative", "tree", "saguaro"])
def test_second_chat_turn_reuses_the_first_and_is_exact(method, feeds):
    target = tiny_model("llama", seed=0)
    draft = perturbed_copy(target, 0.005)
    turn1_prompt = torch.tensor([SYSTEM])
    with generator_for(method, target, draft) as generator:
        turn1 = run(generator, turn1_prompt)
        assert turn1.stats.reused_prompt_tokens == 0
        turn2_prompt = torch.cat([turn1.sequences, torch.tensor([[60, 61, 62]])], dim=1)
        del feeds[:]
        turn2 = run(generator, turn2_prompt)
    with generator_for(method, target, draft, prefix_cache=False) as cold_generator:
        cold = run(cold_generator, turn2_prompt)
    assert turn1.sequences.tolist() == hf_greedy(target, turn1_prompt)
    assert turn2.sequences.tolist() == cold.sequences.tolist() == hf_greedy(target, turn2_prompt)
    # The target's cache held turn 1's sequence but its last token, which was never fed.
    assert turn2.stats.reused_prompt_tokens in held(generator, turn1.sequences)
    assert cold.stats.reused_prompt_tokens == 0
    if method in ("speculative", "tree"):
        # The in-process drafter reused its own stored prefix, and drafted exactly as a cold one:
        # same drafts, same acceptance, round by round.
        assert any(model is generator.drafts.draft and reused > len(SYSTEM) for model, reused in feeds)
        assert accepted_per_round(turn2) == accepted_per_round(cold)


@pytest.mark.parametrize("method", ["autoregressive", "speculative", "tree", "saguaro"])
def test_requests_sharing_a_system_prompt_share_its_kv(method):
    target = tiny_model("qwen2", seed=2)
    draft = perturbed_copy(target, 0.005)
    requests = [torch.tensor([SYSTEM + tail]) for tail in ([70, 71, 72], [80, 81], [90])]
    with generator_for(method, target, draft) as generator:
        outs = [run(generator, ids) for ids in requests]
    assert [out.stats.reused_prompt_tokens for out in outs] == [0, len(SYSTEM), len(SYSTEM)]
    for ids, out in zip(requests, outs):
        assert out.sequences.tolist() == hf_greedy(target, ids)


def test_the_saguaro_drafter_prefills_from_its_own_prefix_cache():
    draft = tiny_model("llama", seed=0)
    greedy = SamplingConfig()
    first = SYSTEM + [3, 4, 5]
    second = first + [6, 7, 8, 9]

    def drafter():
        return PreSpeculator(draft, lookahead=3, prefix_cache_bytes=1 << 20)

    warm = drafter()
    warm.reset(first, greedy, 0)
    reused = []
    real_feed = warm.runner.feed
    warm.runner.feed = lambda tokens: (out := real_feed(tokens), reused.append(out[1]))[0]
    warm_draft = warm.reset(second, greedy, 0)  # stores `first` (its committed tokens), then reuses it
    assert reused == [len(first)]
    assert warm_draft.tokens == drafter().reset(second, greedy, 0).tokens
    off = PreSpeculator(draft, lookahead=3)  # no budget: no prefix cache
    off.reset(first, greedy, 0)
    assert off.runner.prefix_cache is None


def test_lru_eviction_under_a_tiny_budget_keeps_the_output_exact():
    target = tiny_model("llama", seed=0)
    config = target.config
    head_dim = config.hidden_size // config.num_attention_heads
    per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 4  # fp32 K and V
    stored_per_call = len(SYSTEM) + 3 + NEW - 1
    # Room for one call's sequence, not two: each call evicts the one before it.
    budget = per_token * (stored_per_call + stored_per_call // 2)
    a, b = torch.tensor([SYSTEM + [70, 71, 72]]), torch.tensor([[3] + SYSTEM[1:] + [80, 81, 82]])
    with saguaro.SpeculativeGenerator(
        target, method="autoregressive", prefix_cache_bytes=budget
    ) as generator:
        first_a = run(generator, a)
        first_b = run(generator, b)  # [1, ...] shares nothing with [3, ...]: a, older, is evicted
        again_b = run(generator, torch.cat([first_b.sequences, torch.tensor([[5]])], dim=1))
        again_a = run(generator, torch.cat([first_a.sequences, torch.tensor([[5]])], dim=1))
        assert generator.pool.target_prefixes.nbytes <= budget
    assert [out.stats.reused_prompt_tokens for out in (first_a, first_b)] == [0, 0]
    assert again_b.stats.reused_prompt_tokens in held(generator, first_b.sequences)
    assert again_a.stats.reused_prompt_tokens == 0
    for out in (first_a, first_b, again_b, again_a):
        prompt = out.sequences[:, :-NEW]
        assert out.sequences.tolist() == hf_greedy(target, prompt)


def test_prefix_cache_false_reuses_nothing():
    target = tiny_model("llama", seed=0)
    ids = torch.tensor([SYSTEM])
    with saguaro.SpeculativeGenerator(target, method="autoregressive", prefix_cache=False) as generator:
        outs = [run(generator, ids) for _ in range(2)]
        assert generator.pool.target_prefixes is None and generator.pool.draft_prefixes is None
    assert [out.stats.reused_prompt_tokens for out in outs] == [0, 0]
    assert outs[0].sequences.tolist() == outs[1].sequences.tolist() == hf_greedy(target, ids)
    # saguaro.generate takes the option too (moot there: each call builds a fresh generator).
    out = saguaro.generate(
        target, ids, method="autoregressive", max_new_tokens=NEW, eos_token_id=[], prefix_cache=False
    )
    assert out.tolist() == hf_greedy(target, ids)


def test_enabled_models_reuse_and_copies_start_empty():
    target = tiny_model("llama", seed=0)
    ids = torch.tensor([SYSTEM])
    with saguaro.enable(target, method="autoregressive") as handle:
        generator = handle.generator
        pickled_empty = len(pickle.dumps(generator))
        out = target.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        assert len(generator.pool.target_prefixes) in held(generator, out)  # all it fed: prompt + answer
        # A copy carries none of the stored KV.
        assert len(pickle.dumps(generator)) - pickled_empty < generator.pool.target_prefixes.nbytes / 2
        clone = copy.deepcopy(generator)
        assert len(clone.pool.target_prefixes) == 0 and len(generator.pool.target_prefixes) > 0
        out = clone.generate(ids, max_new_tokens=NEW, eos_token_id=[], return_dict_in_generate=True)
        assert out.stats.reused_prompt_tokens == 0
        clone.close()


def test_changed_weights_empty_the_cache():
    target = tiny_model("llama", seed=0)
    ids = torch.tensor([SYSTEM])
    with saguaro.SpeculativeGenerator(target, method="autoregressive") as generator:
        run(generator, ids)
        with torch.no_grad():  # an optimizer step would change the weights in place like this
            target.model.layers[0].self_attn.k_proj.weight.mul_(1.5)
        out = run(generator, ids)
    assert out.stats.reused_prompt_tokens == 0
    assert out.sequences.tolist() == hf_greedy(target, ids)


def test_a_seeded_sample_is_the_same_warm_or_cold():
    # Sampling consumes the seeded RNG draft by draft: the same sample means the same drafts,
    # distributions and acceptances, so the reused KV changed nothing the sampler sees.
    target = tiny_model("llama", seed=0)
    draft = perturbed_copy(target, 0.05)

    def sample(generator, ids):
        seeded = torch.Generator().manual_seed(5)
        return generator.generate(
            ids, NEW, do_sample=True, eos_token_id=[], generator=seeded, return_dict_in_generate=True
        )

    with generator_for("speculative", target, draft) as warm:
        turn1 = sample(warm, torch.tensor([SYSTEM]))
        turn2_prompt = torch.cat([turn1.sequences, torch.tensor([[60]])], dim=1)
        turn2 = sample(warm, turn2_prompt)
    with generator_for("speculative", target, draft, prefix_cache=False) as cold_generator:
        cold = sample(cold_generator, turn2_prompt)
    assert turn2.stats.reused_prompt_tokens == turn1.sequences.shape[1] - 1
    assert turn2.sequences.tolist() == cold.sequences.tolist()
