"""The drop-in path: `saguaro.enable(model, ...)` then `model.generate(...)` exactly as with HF."""

import copy
import warnings

import pytest
import torch
from conftest import WORDS, perturbed_copy, tiny_model, word_tokenizer
from stats_helpers import chi_square_pvalue

import saguaro
from saguaro.decode import batched, engines

pytestmark = pytest.mark.timeout(300)

METHODS = {
    "autoregressive": {},
    "speculative": {},
    "tree": {"tree_branching": [2, 1, 1]},
    "prompt_lookup": {},
    "saguaro": {"placement": "thread"},
}


def left_padded_batch(size: int, seed: int = 0, pad: int = 0):
    """`size` prompts of unequal lengths (3..12 tokens), left-padded, with their attention mask."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [3 + (5 * i + seed) % 10 for i in range(size)]
    width = max(lengths)
    ids = torch.full((size, width), pad, dtype=torch.long)
    mask = torch.zeros((size, width), dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(4, 96, (length,), generator=gen)
        ids[row, width - length] = 1  # BOS
        mask[row, width - length :] = 1
    return ids, mask


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("llama", seed=0)
    return target, perturbed_copy(target, 0.003)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_enabled_generate_equals_hf_generate(pair, method, batch):
    target, draft = pair
    ids, mask = left_padded_batch(batch, seed=batch)
    expected = target.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    with saguaro.enable(
        target,
        draft_model=draft,
        method=method,
        speculation_schedule="constant",
        strict=True,
        **METHODS[method],
    ):
        out = target.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    assert out.tolist() == expected.tolist()


def test_hf_processors_and_stopping_rules_are_served_exactly(pair):
    target, draft = pair
    ids, mask = left_padded_batch(3, seed=5)
    free = target.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=30, do_sample=False)
    eos = free[0, -20].item()  # a token the target emits mid-way
    cases = [
        dict(max_new_tokens=30, repetition_penalty=1.3),
        dict(max_new_tokens=30, no_repeat_ngram_size=2),
        dict(max_new_tokens=30, eos_token_id=[99, eos]),
        dict(max_new_tokens=30, eos_token_id=eos, min_new_tokens=15),
        dict(max_length=ids.shape[1] + 9),
        dict(max_new_tokens=20, bad_words_ids=[[eos]]),
        dict(max_new_tokens=20, suppress_tokens=[eos, 5]),
        dict(max_new_tokens=20, renormalize_logits=True),
    ]
    for kwargs in cases:
        expected = target.generate(ids, attention_mask=mask, do_sample=False, **kwargs)
        with saguaro.enable(target, draft_model=draft, speculation_schedule="constant", strict=True):
            out = target.generate(ids, attention_mask=mask, do_sample=False, **kwargs)
        assert out.tolist() == expected.tolist(), kwargs


def test_stop_strings_and_streamer(pair):
    target, draft = pair
    tokenizer = word_tokenizer()
    ids = torch.tensor([[1, *range(10, 20)]])
    free = target.generate(ids, max_new_tokens=30, do_sample=False)
    stop = tokenizer.decode(free[0, ids.shape[1] + 8 : ids.shape[1] + 10])  # two words the target will emit
    expected = target.generate(
        ids, max_new_tokens=30, do_sample=False, stop_strings=stop, tokenizer=tokenizer
    )

    class Recorder:
        def __init__(self):
            self.calls = []
            self.ended = False

        def put(self, value):
            self.calls.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    recorder = Recorder()
    with saguaro.enable(target, draft_model=draft, speculation_schedule="constant", strict=True):
        out = target.generate(
            ids, max_new_tokens=30, do_sample=False, stop_strings=stop, tokenizer=tokenizer, streamer=recorder
        )
    assert out.tolist() == expected.tolist() and out.shape[1] < ids.shape[1] + 30
    # HF's streamer protocol: the prompt first, then the new tokens in order, then end().
    assert recorder.calls[0] == ids[0].tolist() and recorder.ended
    assert sum(recorder.calls[1:], []) == out[0, ids.shape[1] :].tolist()
    assert len(recorder.calls) > 2  # pushed round by round, not all at the end


def test_text_iterator_streamer_yields_the_generated_text(pair):
    from transformers import TextIteratorStreamer

    target, draft = pair
    tokenizer = word_tokenizer()
    ids = tokenizer(" ".join(WORDS[:8]), return_tensors="pt").input_ids
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=60)
    with saguaro.enable(target, draft_model=draft, method="speculative"):
        out = target.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, streamer=streamer)
    text = "".join(streamer)
    assert text.split() == tokenizer.decode(out[0, ids.shape[1] :]).split()


VOCAB = 6


def reference_row_probs(model, tokens: list[int], penalty: float, temperature: float):
    """The target's next-token distribution after `tokens`, with HF's repetition penalty over those
    tokens (HF skips a row's left padding), written out plainly."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0, -1].double()
    for t in set(tokens):
        logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
    return torch.softmax(logits / temperature, -1)


def exact_row_joint(model, prompt: list[int], penalty: float, temperature: float, length: int = 3):
    """Exact probability of every continuation of `length` tokens, [V] * length."""
    if length == 0:
        return torch.ones((), dtype=torch.double)
    first = reference_row_probs(model, prompt, penalty, temperature)
    return torch.stack(
        [
            first[a] * exact_row_joint(model, prompt + [a], penalty, temperature, length - 1)
            for a in range(VOCAB)
        ]
    )


ROW_PROMPTS = [[1, 4, 3, 5], [1, 3]]
# The second row is left-padded to the first's length.
PENALTY = 3.0  # strong, so that scoring a position with the wrong history shows


def sampled_batch_counts(target, draft, samples: int):
    """Counts of each row's first three tokens over `samples` batched generate calls: the first
    comes from the prefill, the next from a round of two drafts (where histories matter)."""
    ids = torch.tensor([[1, 4, 3, 5], [0, 0, 1, 3]])
    mask = (torch.arange(4) >= torch.tensor([[0], [2]])).long()
    counts = torch.zeros(2, VOCAB, VOCAB, VOCAB)
    torch.manual_seed(3)
    with saguaro.enable(
        target,
        draft_model=draft,
        method="speculative",
        num_speculative_tokens=2,
        speculation_schedule="constant",
        strict=True,
    ):
        for _ in range(samples):
            out = target.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=4,
                do_sample=True,
                temperature=0.9,
                top_k=0,
                repetition_penalty=PENALTY,
            )
            for row in range(2):
                counts[(row, *out[row, 4:7].tolist())] += 1
    return counts


@pytest.fixture(scope="module")
def small_vocab_pair():
    target = tiny_model("llama", seed=0, vocab=VOCAB, layers=1, hidden=16, init=0.6)
    target.generation_config.eos_token_id = None  # every token may follow: no early stops
    return target, tiny_model("llama", seed=5, vocab=VOCAB, layers=1, hidden=16, init=0.6)


@pytest.mark.timeout(600)
def test_batch_sampling_is_exact_per_row(small_vocab_pair):
    target, draft = small_vocab_pair
    counts = sampled_batch_counts(target, draft, samples=1200)
    for row, prompt in enumerate(ROW_PROMPTS):
        expected = exact_row_joint(target, prompt, penalty=PENALTY, temperature=0.9)
        assert chi_square_pvalue(counts[row], expected) > 1e-3, row


@pytest.mark.timeout(600)
def test_batch_sampling_test_catches_draft_tokens_missing_from_the_history(small_vocab_pair, monkeypatch):
    """Planted bug: score every verified position with the root's history only, forgetting the
    draft tokens above it. The repetition penalty then uses the wrong tokens and rows drift."""
    target, draft = small_vocab_pair
    real = engines.verify_proposal

    def forgetful(logits, proposal, sampler, history):
        original_scores = sampler.scores
        sampler.scores = lambda logits, histories=None: original_scores(logits, [history] * logits.shape[0])
        try:
            return real(logits, proposal, sampler, history)
        finally:
            sampler.scores = original_scores

    monkeypatch.setattr(engines, "verify_proposal", forgetful)
    monkeypatch.setattr(batched, "verify_proposal", forgetful)  # a batch runs the batched loop
    counts = sampled_batch_counts(target, draft, samples=1200)
    pvalues = [
        chi_square_pvalue(counts[row], exact_row_joint(target, prompt, PENALTY, 0.9))
        for row, prompt in enumerate(ROW_PROMPTS)
    ]
    assert min(pvalues) < 1e-6


def test_disable_restores_the_original_method(pair):
    target, draft = pair
    original = target.generate
    assert saguaro.disable(target) is False
    saguaro.enable(target, draft_model=draft)
    assert target.generate != original
    assert saguaro.disable(target) is True
    assert target.generate == original and target.generate.__func__ is type(target).generate
    assert "generate" not in vars(target)
    with saguaro.enable(target, draft_model=draft) as handle:
        assert target.generate == handle.generate
    assert target.generate == original


def test_unservable_calls_fall_back_with_one_warning_or_raise_when_strict(pair):
    target, draft = pair
    ids = torch.tensor([[1, 5, 9, 14]])
    expected = target.generate(ids, max_new_tokens=8, num_beams=2, do_sample=False)
    with saguaro.enable(target, draft_model=draft):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = target.generate(ids, max_new_tokens=8, num_beams=2, do_sample=False)
            second = target.generate(ids, max_new_tokens=8, num_beams=2, do_sample=False)
        assert first.tolist() == expected.tolist() == second.tolist()
        assert sum("beam search" in str(w.message) for w in caught) == 1
    with saguaro.enable(target, draft_model=draft, strict=True):
        for kwargs in (
            dict(num_beams=2),
            dict(num_return_sequences=2, do_sample=True),
            dict(output_scores=True, return_dict_in_generate=True),
            dict(penalty_alpha=0.6, top_k=4),
        ):
            with pytest.raises(saguaro.UnsupportedGenerateCall):
                target.generate(ids, max_new_tokens=8, **kwargs)


def test_bad_input_raises_specific_errors(pair):
    target, draft = pair
    ids = torch.tensor([[1, 5, 9, 14]])
    with saguaro.enable(target, draft_model=draft):
        with pytest.raises(ValueError, match="left padding"):
            target.generate(
                torch.tensor([[1, 5, 0]]), attention_mask=torch.tensor([[1, 1, 0]]), max_new_tokens=4
            )
        with pytest.raises(ValueError, match="empty"):
            target.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=4)
        with pytest.raises(ValueError, match="temperature"):
            target.generate(ids, max_new_tokens=4, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="unknown method"):
        saguaro.enable(target, draft_model=draft, method="medusa")
    with pytest.raises(ValueError, match="vocabularies differ"):
        saguaro.enable(target, draft_model=tiny_model("llama", vocab=50))
    other_eos = copy.deepcopy(draft)
    other_eos.generation_config.eos_token_id = 7
    with pytest.raises(ValueError, match="eos_token_id"):
        saguaro.enable(target, draft_model=other_eos)
    with pytest.raises(ValueError, match="meta device"):
        saguaro.enable(target, draft_model=copy.deepcopy(draft).to("meta"))
    from transformers import BertConfig, BertModel

    encoder = BertModel(
        BertConfig(
            vocab_size=96, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    )
    with pytest.raises(TypeError, match="decoder-only"):
        saguaro.enable(target, draft_model=encoder)
    assert "_saguaro" not in vars(target)  # a failed enable leaves the model untouched


def test_a_float_attention_mask_is_accepted_as_by_hf(pair):
    target, draft = pair
    ids, mask = left_padded_batch(3, seed=2)
    expected = target.generate(ids, attention_mask=mask.float(), max_new_tokens=10, do_sample=False)
    with saguaro.enable(target, draft_model=draft, strict=True):
        out = target.generate(ids, attention_mask=mask.float(), max_new_tokens=10, do_sample=False)
    assert out.tolist() == expected.tolist()


def test_float_input_ids_are_rejected_as_by_hf(pair):
    target, draft = pair
    ids = torch.tensor([[1.0, 5.0, 9.0, 14.0]])
    with pytest.raises(RuntimeError):  # HF fails in the embedding lookup
        target.generate(ids, max_new_tokens=4, do_sample=False)
    with saguaro.enable(target, draft_model=draft):
        with pytest.raises(TypeError, match="input_ids.long()"):
            target.generate(ids, max_new_tokens=4, do_sample=False)


def test_past_max_position_embeddings_warns_and_generates_as_hf():
    target = tiny_model("llama", seed=0)
    target.config.max_position_embeddings = 16
    ids = torch.tensor([[1, 5, 9, 14, 22, 31]])
    expected = target.generate(ids, max_new_tokens=20, do_sample=False)
    with saguaro.enable(target, draft_model=perturbed_copy(target, 0.003), strict=True):
        with pytest.warns(saguaro.SaguaroWarning, match="max_position_embeddings"):
            out = target.generate(ids, max_new_tokens=20, do_sample=False)
    assert out.tolist() == expected.tolist()


def test_top_p_above_one_is_ignored_as_by_hf(pair):
    # HF builds no top-p warper for top_p >= 1 (and does not raise): samples as with top_p=1.
    target, draft = pair
    ids = torch.tensor([[1, 5, 9, 14]])
    runs = []
    # A fixed method: auto's choice follows measured timings, and so would the random draws.
    with saguaro.enable(
        target, draft_model=draft, method="speculative", speculation_schedule="constant", strict=True
    ):
        for top_p in (1.0, 1.5):
            torch.manual_seed(5)
            runs.append(target.generate(ids, max_new_tokens=12, do_sample=True, top_p=top_p).tolist())
    assert runs[0] == runs[1]


def test_a_pad_token_inside_an_unmasked_prompt_runs_as_in_hf(pair):
    # HF masks a pad id found anywhere in a prompt given without attention_mask, leaving a hole
    # that saguaro's rows (left padding only) cannot serve: HF generates it, with a warning, and
    # never a "left padding" error the caller did nothing to cause.
    target, draft = pair
    ids = torch.tensor([[1, 17, 0, 5, 80, 42]])
    expected = target.generate(ids, max_new_tokens=10, do_sample=False)
    with saguaro.enable(target, draft_model=draft):
        with pytest.warns(saguaro.SaguaroWarning, match="pad_token_id inside"):
            out = target.generate(ids, max_new_tokens=10, do_sample=False)
    assert out.tolist() == expected.tolist()
    with saguaro.enable(target, draft_model=draft, strict=True):
        with pytest.raises(saguaro.UnsupportedGenerateCall, match="pad_token_id inside"):
            target.generate(ids, max_new_tokens=10, do_sample=False)
        # Left padding alone (no mask given) is still served.
        left = torch.tensor([[0, 0, 1, 17, 5, 80]])
        served = target.generate(left, max_new_tokens=10, do_sample=False)
    assert served.tolist() == target.generate(left, max_new_tokens=10, do_sample=False).tolist()


def test_strict_enable_also_raises_worker_failures(pair):
    target, draft = pair
    with saguaro.enable(
        target, draft_model=draft, method="saguaro", placement="inline", strict=True
    ) as handle:
        assert handle.generator.options.strict
    with saguaro.enable(target, draft_model=draft, method="saguaro", placement="inline") as handle:
        assert not handle.generator.options.strict
