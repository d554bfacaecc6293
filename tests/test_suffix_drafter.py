"""Suffix decoding (draft/suffix.py): the index finds the longest suffix of a context among the
sequences it holds and proposes what followed its newest occurrence, within its token budget; the
drafter over it keeps greedy decoding exactly the target's, alone and in a batch."""

import functools
import random
import sys
import threading

import torch
from conftest import tiny_model

import saguaro
from saguaro.decode.batched import batched_speculative
from saguaro.decode.batched_drafters import PerRowDrafters
from saguaro.decode.engines import StopRule, speculative
from saguaro.decode.sampling import SamplingConfig, TokenSampler
from saguaro.decode.stats import GenerationStats
from saguaro.draft.drafters import InlineDrafts
from saguaro.draft.suffix import NO_MATCH, SuffixDrafter, SuffixIndex
from saguaro.model.batched_runner import BatchedRunner
from saguaro.model.runner import ModelRunner

PROMPT = [1, 17, 33, 5, 80, 42, 9, 64, 23]  # no token twice: only an index can match it
NEW_TOKENS = 40


def test_the_longest_match_wins_then_the_newest():
    index = SuffixIndex()
    index.add([5, 7, 8, 9, 1, 1])
    index.add([3, 7, 8, 9, 2, 2])  # newer, but shares one token less with the first context
    assert index.lookup([0, 5, 7, 8, 9], 2) == (4, [1, 1])
    assert index.lookup([0, 4, 7, 8, 9], 2) == (3, [2, 2])  # a tie at 3: the newer one
    assert index.lookup([0, 4, 7, 8, 9], 9) == (3, [2, 2])  # cut where its sequence ends
    assert index.lookup([6, 6], 2) == NO_MATCH


def test_a_running_sequence_is_found_as_it_grows():
    index = SuffixIndex()
    handle = index.add([1, 2, 3, 4, 1, 2])
    assert index.lookup([9, 1, 2], 3) == (2, [3, 4, 1])
    index.extend(handle, [3, 6])  # "1 2 3" now last seen before 6
    assert index.lookup([1, 2, 3], 3) == (3, [6])
    index.extend(handle, [7])
    assert index.lookup([1, 2, 3], 3) == (3, [6, 7])
    assert len(index) == 9


def test_match_lengths_are_bounded_both_ways():
    index = SuffixIndex(max_match=3, min_match=2)
    index.add([4, 1, 2, 3, 9])
    index.add([5, 1, 2, 3, 8])
    # Beyond max_match tokens contexts are not told apart: the newer one wins the tie at 3.
    assert index.lookup([4, 1, 2, 3], 1) == (3, [8])
    assert index.lookup([0, 3], 1) == NO_MATCH  # a match of one token is under min_match
    assert index.lookup([2, 3], 0) == NO_MATCH


def test_the_budget_evicts_the_oldest_tokens():
    index = SuffixIndex(budget=10)
    index.add([1, 2, 3, 4, 5, 6])
    index.add([7, 8, 9, 1, 2])  # 11 tokens: the first one goes
    assert len(index) == 10
    assert index.lookup([1, 2], 2) == (2, [3, 4])  # the older sequence, still indexed after its first
    index.add([10, 11, 12, 13, 14, 15])  # the rest of the first sequence and 7 go
    assert len(index) == 10 and index.node_count <= 2 * len(index) + 1
    assert index.lookup([1, 2], 2) == NO_MATCH
    assert index.lookup([7, 8, 9], 1) == (3, [1])  # 7 went, but 1 still follows it
    assert index.lookup([11, 12], 2) == (2, [13, 14])


def test_nodes_stay_within_twice_the_budget_on_repetitive_text():
    # Runs and cycles lengthen the same contexts token after token, the case where a trie would
    # keep a chain of nodes per token: nodes with one child must go as their occurrences do.
    for tokens in ([5] * 100, [1, 2] * 50, [1, 2, 3, 1, 2, 4] * 20):
        index = SuffixIndex(budget=4, max_match=16)
        handle = index.add([])
        for token in tokens:
            index.extend(handle, [token])
            assert index.node_count <= 2 * len(index) + 1, tokens


def test_nodes_of_evicted_contexts_go_with_them():
    # Texts ending like `text`, each a token shorter, then `text` again: its newest tokens walk
    # through the nodes where the shorter ones ended. Once those are evicted, `text` alone (each
    # token's context ends differently) needs one node per token, as if indexed into an empty index.
    text = list(range(100, 117))
    index = SuffixIndex(budget=len(text), max_match=16)
    index.add(text)
    for length in range(2, len(text)):
        index.add(text[-length:])
    index.add(text)
    assert len(index) == index.node_count == len(text)  # the root, and a leaf for all but the first


def brute_force_lookup(occurrences, budget, context, max_tokens, max_match, min_match):
    """The definition: over the indexed tokens (the newest `budget`), the one after the longest
    suffix of `context` (up to max_match), the newest on a tie; what followed it."""
    best = None
    for tick, tokens, index in occurrences[-budget:] if budget else occurrences:
        limit, matched = min(len(context), max_match, index), 0
        while matched < limit and tokens[index - matched - 1] == context[-matched - 1]:
            matched += 1
        if best is None or (matched, tick) > best[:2]:
            best = (matched, tick, tokens, index)
    if max_tokens < 1 or best is None or best[0] < min_match:
        return NO_MATCH
    return (best[0], best[2][best[3] : best[3] + max_tokens])


def test_lookups_match_their_definition_through_growth_and_eviction():
    # Small alphabets repeat contexts everywhere: edges split, leaves deepen, subtrees go.
    for seed in range(60):
        rng = random.Random(seed)
        alphabet, budget = rng.choice([2, 3, 5]), rng.choice([None, 5, 17, 60])
        max_match = rng.choice([1, 2, 4, 8])
        min_match = rng.randint(1, max_match)
        index = SuffixIndex(budget, max_match, min_match)
        occurrences, handles = [], []
        for step in range(100):
            if not handles or rng.random() < 0.15:
                handles.append(index.add([]))
            handle = rng.choice(handles)
            tokens = [rng.randrange(alphabet) for _ in range(rng.randint(1, 4))]
            start = len(handle.tokens)
            index.extend(handle, tokens)
            occurrences += [(len(occurrences) + i, handle.tokens, start + i) for i in range(len(tokens))]
            assert len(index) == min(len(occurrences), budget or len(occurrences))
            assert index.node_count <= 2 * len(index) + 1  # memory follows the budget
            for _ in range(3):
                context = [rng.randrange(alphabet) for _ in range(rng.randint(0, 10))]
                k = rng.randint(0, 4)
                expected = brute_force_lookup(occurrences, budget, context, k, max_match, min_match)
                assert index.lookup(context, k) == expected, (seed, step, context, k)


def test_threads_share_one_index():
    index = SuffixIndex(budget=200, max_match=4)
    errors = []

    def request(first: int):
        rng = random.Random(first)
        handle = index.add([])
        try:
            for _ in range(1500):  # each token evicts one, in the trie the other threads walk
                index.extend(handle, [first + rng.randrange(4)])
                index.lookup(handle.tokens[-5:], 4)
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=request, args=(10 * n,)) for n in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch inside any unguarded step of another's call
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors and len(index) == 200 and index.node_count <= 2 * len(index) + 1
    index.add([7001, 7002, 7003])
    assert index.lookup([7001, 7002], 3) == (2, [7003])


def decode_with(target, drafter, prompt=PROMPT, depth=4):
    """The single-row speculative loop (engines.speculative) drafting with `drafter`."""
    stats = GenerationStats(method="suffix", prompt_tokens=len(prompt))
    runner = ModelRunner(target, len(prompt) + NEW_TOKENS + depth + 1)
    sampler = TokenSampler(SamplingConfig())
    new = speculative(runner, InlineDrafts(drafter), prompt, sampler, StopRule(NEW_TOKENS), stats, depth)
    drafter.remember(prompt + new)
    return prompt + new, stats


def hf_greedy(model, prompt):
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=[]
    )
    return out[0].tolist()


def seeded_index(expected, changed=(15, 28)):
    """An index holding an earlier sequence like `expected`, but for a few tokens: drafts copied
    from it are accepted up to each changed token, rejected there."""
    earlier = list(expected)
    for position in changed:
        earlier[len(PROMPT) + position] = (earlier[len(PROMPT) + position] + 1) % 96
    index = SuffixIndex()
    index.add(earlier)
    return index


def test_suffix_drafting_equals_greedy_generate():
    target = tiny_model("llama", seed=0)
    expected = hf_greedy(target, PROMPT)
    index = seeded_index(expected)
    sequence, stats = decode_with(target, SuffixDrafter(index, publish=False))
    assert sequence == expected
    # The first draft comes from the earlier sequence (the prompt holds no repeat) and is all right;
    # drafts through a changed token are rejected.
    assert stats.round_log[0]["drafted"] == stats.round_log[0]["accepted"] == 4
    assert stats.accepted > NEW_TOKENS // 2 and stats.drafted > stats.accepted
    assert len(index) == len(expected)  # publish=False: nothing added


def test_a_request_seen_before_drafts_from_its_answer():
    target = tiny_model("qwen2", seed=3)
    expected = hf_greedy(target, PROMPT)
    index = SuffixIndex()
    first, first_stats = decode_with(target, SuffixDrafter(index))
    assert len(index) == len(expected)  # published: the prompt, then every final token
    again, again_stats = decode_with(target, SuffixDrafter(index))
    assert first == again == expected
    assert again_stats.round_log[0]["accepted"] == 4
    assert again_stats.accepted > first_stats.accepted


def test_batched_rows_with_suffix_drafters_equal_each_prompt_alone():
    target = tiny_model("qwen2", seed=3)
    prompts = [PROMPT, [1, 5, 6], [1, 44, 45, 46, 47, 48]]
    expected = [hf_greedy(target, prompt) for prompt in prompts]
    index = seeded_index(expected[0])
    stats = [GenerationStats(method="suffix", prompt_tokens=len(prompt)) for prompt in prompts]
    new = batched_speculative(
        BatchedRunner(target),
        PerRowDrafters(functools.partial(SuffixDrafter, index)),
        prompts,
        [TokenSampler(SamplingConfig()) for _ in prompts],
        [StopRule(NEW_TOKENS) for _ in prompts],
        stats,
        4,
    )
    assert [prompt + row for prompt, row in zip(prompts, new)] == expected
    assert stats[0].round_log[0]["accepted"] == 4  # drafted from the earlier sequence
    assert stats[0].drafted > stats[0].accepted > NEW_TOKENS // 2
    # Every row published its sequence as it went, to the last token (a batch commits every round).
    assert len(index) == len(expected[0]) + sum(len(row) for row in expected)


def test_method_suffix_drafts_from_earlier_calls_of_the_generator():
    """saguaro.generate's method="suffix": exact, and a kept generator drafts from its earlier
    calls (one shared index per generator), single rows and batches alike."""
    target = tiny_model("llama", seed=0)
    prompts = [[1, 5, 9, 3, 7, 5, 9, 3, 7, 5, 9], [1, 5, 9, 3, 8, 5, 9, 3, 7, 5, 9, 2, 4]]
    expected = [hf_greedy(target, prompt) for prompt in prompts]
    with saguaro.SpeculativeGenerator(target, method="suffix", speculation_schedule="constant") as generator:

        def run(*rows):
            ids = torch.tensor(rows)
            out = generator.generate(ids, NEW_TOKENS, eos_token_id=[], return_dict_in_generate=True)
            return out.sequences.tolist(), out.stats

        runs = [run(prompt) for prompt in prompts]
        again, batch = run(prompts[0]), run(prompts[0], prompts[0])
    assert [sequences for sequences, _ in runs] == [[row] for row in expected]
    assert again[0] == [expected[0]] and batch[0] == [expected[0]] * 2
    # The second prompt drafts from the first call's answer, through its changed token too.
    assert runs[1][1].drafted > runs[1][1].accepted > 0
    # Seen before: every draft of the repeat is right, and it takes far fewer rounds.
    assert again[1].accepted == again[1].drafted > runs[0][1].accepted
    assert again[1].rounds < runs[0][1].rounds // 2
