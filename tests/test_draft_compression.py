"""Cheap drafts (saguaro.draft.compression): quantized and reduced-vocabulary drafts stay exact."""

import dataclasses

import pytest
import torch
from conftest import perturbed_copy, tiny_model
from stats_helpers import chi_square_pvalue
from test_sampling_exact import FAIL_P, PASS_P, VOCAB, exact_joint, sample_counts

import saguaro
from saguaro.decode import verify
from saguaro.draft import choice as draft_choice
from saguaro.draft import quantize
from saguaro.draft.choice import choose_draft_configuration, variant_score
from saguaro.draft.drafters import ModelDrafter
from saguaro.draft.quantize import DraftCompressionUnavailable, compress_draft, quantize_draft
from saguaro.draft.quantized_linear import Int4WeightOnlyLinear, Int8WeightOnlyLinear, dequantized_weight
from saguaro.draft.vocabulary import RestrictedLMHead, default_draft_vocabulary, restrict_draft_vocabulary

PROMPT = torch.tensor([[1, 17, 33, 5, 80, 42, 9, 64, 23]])
LINEARS = {"int8": Int8WeightOnlyLinear, "int4": Int4WeightOnlyLinear}


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize(
    "weight_dtype, input_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
    ids=["fp32", "bf16", "bf16-weights-fp32-input"],
)
def test_quantized_linear_matches_dequantized_reference(mode, weight_dtype, input_dtype):
    torch.manual_seed(0)
    # 40 outputs: not a multiple of 16, so int4 pads rows for the CPU packing and slices them off.
    linear = torch.nn.Linear(256, 40).to(weight_dtype)
    x = torch.randn(2, 3, 256).to(input_dtype)
    weight = dequantized_weight(linear.weight, mode)
    exact = x.double() @ weight.double().T + linear.bias.double()
    # PyTorch's own error on the same weight in the kernel's dtype is the yardstick for rounding.
    torch_error = torch.nn.functional.linear(x.to(weight_dtype), weight.to(weight_dtype), linear.bias) - exact
    out = LINEARS[mode](linear)(x)
    assert out.dtype == input_dtype and out.shape == (2, 3, 40)
    assert (out.double() - exact).abs().max() <= 4 * torch_error.abs().max().double() + 1e-6
    # And the dequantized weight is the original one within a quantization step (half a step of
    # rounding, plus the rounding of scales and zeros to bf16).
    step = weight.new_tensor(float(linear.weight.detach().float().abs().max())) * (
        2 / 127 if mode == "int8" else 2 / 15
    )
    assert (weight - linear.weight.float()).abs().max() <= step


def test_int4_keeps_int8_where_the_group_size_does_not_divide():
    model = tiny_model("llama", hidden=32)  # in_features 32 and 64: below the group of 128
    quantized = quantize_draft(model, "int4")
    kinds = {type(m) for m in quantized.modules() if isinstance(m, (torch.nn.Linear, *LINEARS.values()))}
    assert kinds == {Int8WeightOnlyLinear}


@pytest.mark.parametrize("arch", ["gemma", "qwen2"])  # tiny gemma ties its head to the embedding
def test_callers_draft_is_unchanged(arch):
    model = tiny_model(arch, hidden=128)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    with torch.no_grad():
        logits = model(PROMPT).logits
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    compressed = compress_draft(model, "int4", 48)
    compressed(PROMPT)
    assert isinstance(compressed.get_output_embeddings(), RestrictedLMHead)
    assert isinstance(compressed.get_output_embeddings().linear, Int4WeightOnlyLinear)
    # The caller's model: same modules, same weights, same tie, same outputs.
    assert not any(isinstance(m, (RestrictedLMHead, *LINEARS.values())) for m in model.modules())
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, logits)
    # Unquantized tensors are shared, not copied.
    assert compressed.get_input_embeddings().weight is model.get_input_embeddings().weight


def test_vocabulary_variants_share_one_quantized_body():
    model = tiny_model("llama", hidden=128)
    memo = {}
    full, reduced = (compress_draft(model, "int8", size, memo) for size in (None, 48))
    assert full.model.layers[0].mlp.up_proj is reduced.model.layers[0].mlp.up_proj
    assert (
        isinstance(reduced.lm_head.linear, Int8WeightOnlyLinear) and reduced.lm_head.linear.out_features == 48
    )


def test_restricted_head_gives_zero_probability_outside_the_kept_ids():
    model = tiny_model("llama")
    keep = default_draft_vocabulary(model, 40)
    assert keep.tolist() == list(range(40))  # the specials 0, 1, 2 are among the lowest ids here
    assert default_draft_vocabulary(model, 2).tolist() == [0, 1, 2]  # eos 2 kept even beyond the size
    restricted = restrict_draft_vocabulary(model, keep)
    with torch.no_grad():
        full, reduced = model(PROMPT).logits, restricted(PROMPT).logits
    assert reduced.shape == full.shape
    assert torch.equal(reduced[..., :40], full[..., :40])
    assert torch.softmax(reduced, -1)[..., 40:].eq(0).all()


def test_bad_compression_options_raise_specific_errors():
    target = tiny_model("llama")
    draft = perturbed_copy(target, 0.01)
    for options, match in [
        ({"draft_quantization": "fp8"}, "draft_quantization must be"),
        ({"draft_vocab_size": 0}, "draft_vocab_size must be"),
        ({"draft_vocab_size": True}, "draft_vocab_size must be"),
        ({"draft_vocab_size": 96}, "keeps the draft's whole 96-id vocabulary"),
    ]:
        with pytest.raises(ValueError, match=match):
            saguaro.SpeculativeGenerator(target, draft, **options)
    with pytest.raises(ValueError, match=r"keep_ids must be non-empty token ids in \[0, 96\)"):
        restrict_draft_vocabulary(draft, [3, 96])
    with pytest.raises(ValueError, match="not an nn.Linear"):
        restrict_draft_vocabulary(quantize_draft(draft, "int8"), [3])


def hf_greedy(model, ids, max_new_tokens):
    return model.generate(
        ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, eos_token_id=[]
    )


COMPRESSIONS = [("int8", None), ("int4", None), (None, 48), ("int4", 48)]


@pytest.mark.parametrize(
    "quantization, vocab_size", COMPRESSIONS, ids=["int8", "int4", "vocab48", "int4+vocab48"]
)
@pytest.mark.parametrize("method", ["speculative", "tree"])
def test_compressed_draft_greedy_matches_target(method, quantization, vocab_size):
    target = tiny_model("llama", seed=0, hidden=128)
    draft = perturbed_copy(target, 0.003)
    expected = hf_greedy(target, PROMPT, 40)
    out = saguaro.generate(
        target,
        PROMPT,
        draft_model=draft,
        method=method,
        tree_branching=[2, 2, 1],
        max_new_tokens=40,
        speculation_schedule="constant",
        eos_token_id=[],
        return_dict_in_generate=True,
        draft_quantization=quantization,
        draft_vocab_size=vocab_size,
    )
    assert out.sequences.tolist() == expected.tolist()
    stats = out.stats
    assert 0 < stats.accepted < stats.drafted  # speculation ran, and the compressed draft was wrong sometimes
    assert stats.draft_configuration["quantization"] == quantization
    assert stats.draft_configuration["vocab_size"] == vocab_size
    if vocab_size:  # the target emitted ids the draft could not propose
        assert any(t >= vocab_size for t in expected[0, PROMPT.shape[1] :].tolist())


@pytest.mark.timeout(180)
def test_compressed_draft_serves_the_saguaro_worker_process():
    # The forked drafter process runs the compressed copy: same exact output, no worker failure.
    target = tiny_model("llama", seed=0, hidden=128)
    with saguaro.SpeculativeGenerator(
        target,
        perturbed_copy(target, 0.003),
        method="saguaro",
        placement="process",
        speculation_schedule="constant",
        draft_quantization="int4",
        draft_vocab_size=48,
    ) as generator:
        out = generator.generate(PROMPT, max_new_tokens=30, eos_token_id=[], return_dict_in_generate=True)
    assert out.sequences.tolist() == hf_greedy(target, PROMPT, 30).tolist()
    assert out.stats.worker_failures == 0 and 0 < out.stats.accepted < out.stats.drafted
    assert out.stats.draft_configuration["quantization"] == "int4"


def plant_uncompressed_q(monkeypatch, plain_draft):
    """The planted bug: drafts drawn from the compressed draft, verified with the plain draft's q."""
    real_propose = ModelDrafter.propose

    def propose(self, depth):
        proposal = real_propose(self, depth)
        if proposal.probs is None or not len(proposal.tokens):
            return proposal
        sequence = torch.tensor([self.committed + proposal.tokens])
        with torch.no_grad():
            logits = plain_draft(sequence).logits[0, len(self.committed) - 1 : -1, : proposal.probs.shape[-1]]
        return dataclasses.replace(proposal, probs=self.sampler.probs(logits))

    monkeypatch.setattr(ModelDrafter, "propose", propose)


@pytest.fixture(scope="module")
def sampling_pair():
    # The target of test_sampling_exact; a draft wide enough (128) for int4's groups, scaled so its
    # int4 copy's distributions differ from its own (total variation up to 0.25): verifying with
    # the wrong one of the two is then plainly visible.
    target = tiny_model("llama", seed=0, vocab=VOCAB, layers=1, hidden=16, init=0.6)
    draft = tiny_model("llama", seed=5, vocab=VOCAB, layers=1, hidden=128, init=0.3)
    return target, draft


QUANTIZED = {"draft_quantization": "int4", "draft_vocab_size": None}
# Ids 0-2 (all specials) only: the target gives the excluded ids 3-5 real mass.
REDUCED = {"draft_quantization": None, "draft_vocab_size": 3}


@pytest.mark.parametrize(
    "method, options",
    [("speculative", QUANTIZED), ("speculative", REDUCED), ("tree", REDUCED)],
    ids=["int4", "vocab3", "tree-vocab3"],
)
def test_compressed_draft_sampling_matches_target_distribution(sampling_pair, method, options):
    # In the tree, three siblings drawn without replacement use up the three kept ids: once all are
    # rejected, only the excluded ids are left in the residual.
    target, draft = sampling_pair
    counts = sample_counts(target, draft, samples=1500, seed=21, method=method, options=options)
    expected = exact_joint(target, 3)
    assert expected[:, 3:].sum() > 0.05 and expected[:, :, 3:].sum() > 0.05
    assert chi_square_pvalue(counts, expected) > PASS_P


@pytest.mark.parametrize("options", [QUANTIZED, REDUCED], ids=["int4", "vocab3"])
def test_compressed_sampling_test_catches_verifying_with_the_plain_q(sampling_pair, options, monkeypatch):
    target, draft = sampling_pair
    plant_uncompressed_q(monkeypatch, draft)
    counts = sample_counts(target, draft, samples=1500, seed=21, options=options)
    assert chi_square_pvalue(counts, exact_joint(target, 3)) < FAIL_P


def test_reduced_vocabulary_test_catches_a_residual_without_the_excluded_ids(sampling_pair, monkeypatch):
    # A verifier that forgets the ids the draft cannot propose never emits them after a rejection.
    real_residual = verify.residual
    monkeypatch.setattr(verify, "residual", lambda p, q: real_residual(p * (q > 0), q))
    target, draft = sampling_pair
    counts = sample_counts(target, draft, samples=1500, seed=21, options=REDUCED)
    assert chi_square_pvalue(counts, exact_joint(target, 3)) < FAIL_P


def test_choose_draft_configuration_estimates_every_variant_and_builds_only_the_best(monkeypatch):
    target = tiny_model("llama", seed=0, hidden=128)
    draft = perturbed_copy(target, 0.003)
    built = []
    real_compress = draft_choice.compress_draft

    def compress(model, *variant, **kwargs):
        built.append(variant)
        return real_compress(model, *variant, **kwargs)

    monkeypatch.setattr(draft_choice, "compress_draft", compress)
    model, record = choose_draft_configuration(
        draft, target, PROMPT[0].tolist(), threads=1, lookahead=3, vocab_sizes=(None, 48), steps=4
    )
    labels = [f"{q}/{v}" for q in ("none", "int8", "int4") for v in ("full", 48)]
    assert sorted(record.step_seconds) == sorted(labels) and sorted(record.agreement) == sorted(labels)
    assert all(s > 0 for s in record.step_seconds.values()) and record.verify_seconds > 0
    assert all(0 <= a <= 1 for a in record.agreement.values()) and record.agreement["none/full"] == 1.0
    # Estimated, not built: at most MAX_BUILDS variants besides the returned one were quantized.
    assert len(built) <= draft_choice.MAX_BUILDS + 1
    # A near copy of the target: agreement with it (Laplace-smoothed over 9 positions) is high.
    assert record.target_agreement >= 8 / 11
    # The decision rule, on the recorded (measured where built) figures: the chosen variant's
    # expected tokens/s of a round beats the plain draft's by over 10%, or the plain draft is kept.
    score = {
        label: sum((record.target_agreement * record.agreement[label]) ** i for i in range(4))
        / (record.verify_seconds + 3 * record.step_seconds[label])
        for label in labels
    }
    if record.label != "none/full":
        assert score[record.label] > 1.1 * score["none/full"]
    assert record.estimated_gain == pytest.approx(score[record.label] / score["none/full"])
    # The returned model is the recorded variant.
    with torch.no_grad():
        expected = real_compress(draft, record.quantization, record.vocab_size)(PROMPT).logits
        assert torch.equal(model(PROMPT).logits, expected)


def test_a_variant_whose_measured_agreement_falls_short_is_not_chosen(monkeypatch):
    """The estimate promises a quantized draft; built and measured it agrees too little: the
    plain draft is kept (at most MAX_BUILDS tries)."""
    target = tiny_model("llama", seed=0, hidden=128)
    draft = perturbed_copy(target, 0.003)
    monkeypatch.setattr(draft_choice, "PRIOR_AGREEMENT", {None: 1.0, "int8": 1.0, "int4": 1.0})
    monkeypatch.setattr(
        draft_choice,
        "_timed_linears",
        lambda body, head, variants, rows, epoch, held: (
            {v: (1.0 if v[0] is None else 0.01) for v in variants} | {(None, None): 1.0}
        ),
    )
    real_measure = draft_choice._measure

    def measure(model, sample, steps, continuation=None):
        predictions, fed, _ = real_measure(model, sample, steps, continuation)
        if continuation is not None:  # a built variant: as fast as the plain draft, never agreeing
            predictions = [p + 1 for p in predictions]
        return predictions, fed, 1.0

    monkeypatch.setattr(draft_choice, "_measure", measure)
    model, record = choose_draft_configuration(draft, target, PROMPT[0].tolist(), threads=1, lookahead=3)
    assert model is draft and record.label == "none/full"
    assert sum(a == 0.0 for a in record.agreement.values()) == draft_choice.MAX_BUILDS


def test_auto_records_its_choice_and_stays_exact():
    target = tiny_model("llama", seed=0)
    draft = perturbed_copy(target, 0.003)
    expected = hf_greedy(target, PROMPT, 20)
    with saguaro.SpeculativeGenerator(target, draft, method="speculative") as generator:
        assert generator.draft_configuration is None  # auto measures on the first prompt
        out = generator.generate(PROMPT, max_new_tokens=20, eos_token_id=[], return_dict_in_generate=True)
    assert out.sequences.tolist() == expected.tolist()
    record = generator.draft_configuration
    assert record.chosen_by == "auto" and out.stats.draft_configuration["chosen_by"] == "auto"
    # A 96-id vocabulary has nothing to cut, and 40 KB of weights nothing to stream: plain draft.
    assert (record.quantization, record.vocab_size) == (None, None) and "too small" in record.note


def test_a_draft_is_prepared_once_for_its_target_and_options():
    target = tiny_model("llama", seed=0, hidden=128)
    draft = perturbed_copy(target, 0.003)
    first, second, other = (
        saguaro.SpeculativeGenerator(target, draft, draft_quantization=q, draft_vocab_size=None)
        for q in ("int8", "int8", "int4")
    )
    assert not first.draft_configuration.reused and second.draft_configuration.reused
    assert second.drafts.draft is first.drafts.draft  # one quantized copy, however many generate() calls
    assert not other.draft_configuration.reused and other.drafts.draft is not first.drafts.draft


def test_quantization_failure_falls_back_under_auto_and_raises_when_explicit(monkeypatch, caplog):
    def missing_kernel(*args):
        raise RuntimeError("no int8 kernel here")

    monkeypatch.setattr(torch, "_weight_int8pack_mm", missing_kernel)
    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", missing_kernel)
    monkeypatch.setattr(draft_choice, "AUTO_MIN_WEIGHT_BYTES", 0)  # let auto try the tiny draft
    target = tiny_model("llama", seed=0, hidden=128)
    draft = perturbed_copy(target, 0.003)
    with pytest.warns(RuntimeWarning) as caught:
        out = saguaro.generate(
            target,
            PROMPT,
            draft_model=draft,
            method="speculative",
            max_new_tokens=12,
            eos_token_id=[],
            return_dict_in_generate=True,
        )
    messages = [str(w.message) for w in caught]
    assert [m.split(":")[0] for m in messages] == [
        "draft variant int8/full skipped",
        "draft variant int4/full skipped",
    ]
    assert all("no int8 kernel here" in m for m in messages)
    assert [r.getMessage() for r in caplog.records if r.name == "saguaro"] == messages  # logged too
    assert out.sequences.tolist() == hf_greedy(target, PROMPT, 12).tolist()
    assert out.stats.draft_configuration["quantization"] is None
    assert set(out.stats.draft_configuration["step_seconds"]) == {"none/full"}
    with pytest.raises(DraftCompressionUnavailable, match="cannot run int8 weight-only matmuls"):
        saguaro.SpeculativeGenerator(target, draft, draft_quantization="int8", draft_vocab_size=None)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_many_rows_take_the_shared_float_weight(mode):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 48)
    quantized = LINEARS[mode](linear)
    assert quantized.dense_weight.data_ptr() == linear.weight.data_ptr()  # shared, not copied
    assert all(p is not quantized.dense_weight for p in quantized.parameters())  # not the draft's own
    quantized.dense_from_rows = 4
    many, few = torch.randn(2, 3, 256), torch.randn(1, 3, 256)
    assert torch.equal(quantized(many), torch.nn.functional.linear(many, linear.weight, linear.bias))
    kernel = quantized._matmul(few.reshape(3, 256)).reshape(1, 3, 48) + linear.bias
    assert torch.equal(quantized(few), kernel)
    assert not torch.equal(quantized(few), torch.nn.functional.linear(few, linear.weight, linear.bias))


def test_dense_crossover_needs_the_float_weight_to_win_from_there_on(monkeypatch):
    linear = Int8WeightOnlyLinear(torch.nn.Linear(64, 32))

    # Planted timings: the kernel costs rows, the dense multiply 16, except one noisy dip at 4 rows.
    def timed(call, repeats):
        return next(costs)

    monkeypatch.setattr(quantize, "fastest_of", timed)
    rows = (2, 4, 8, 16, 32)
    # Measured from the largest size down, (kernel, dense) per size.
    costs = iter([(32, 16), (16, 16), (8, 16), (4, 3)][i // 2][i % 2] for i in range(8))
    assert quantize.measure_dense_crossover([linear], rows) == 16
    costs = iter([(32, 40)][i // 2][i % 2] for i in range(2))  # the kernel wins even at 32 rows
    assert quantize.measure_dense_crossover([linear], rows) == float("inf")


def test_quantize_draft_times_its_crossover_and_a_prefill_stays_exact():
    target = tiny_model("llama", seed=0)
    quantized = quantize_draft(perturbed_copy(target, 0.005), "int8")
    crossovers = {m.dense_from_rows for m in quantized.modules() if isinstance(m, Int8WeightOnlyLinear)}
    assert len(crossovers) == 1  # one measurement for every layer
    expected = target.generate(PROMPT, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    for crossover in (1, 10**9):  # a prefill through the float weights, and through the kernels
        for m in quantized.modules():
            if isinstance(m, Int8WeightOnlyLinear):
                m.dense_from_rows = crossover
        out = saguaro.generate(
            target,
            PROMPT,
            draft_model=quantized,
            method="speculative",
            max_new_tokens=16,
            draft_quantization=None,
            draft_vocab_size=None,
            eos_token_id=[],
            return_dict_in_generate=True,
        )
        assert out.sequences.tolist() == expected.tolist() and out.stats.accepted > 0


def test_a_concurrent_drafter_is_scored_on_agreement_more_than_step_cost():
    # Two variants of the demo draft beside a 200 ms verification: the full vocabulary (agreement
    # 1.0, 25.5 ms a step) and a smaller one (agreement 0.933, 12 ms). Drafting inline, every step
    # is waited for and the cheaper one wins; the Saguaro worker drafts while the target verifies,
    # so there agreement decides and the full vocabulary wins.
    a, verify = 0.8, 0.2
    full, smaller = (a, 0.0255), (a * 0.933, 0.012)
    inline, beside = (verify, 4, False), (verify, 4, True)
    assert variant_score(*smaller, *inline) > variant_score(*full, *inline)
    assert variant_score(*full, *beside) > variant_score(*smaller, *beside)
