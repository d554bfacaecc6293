"""Prepacked bf16 linears (model/packed_linear.py): the same bits as the model's own forward, new weights
followed, and the plain model kept wherever packing does not serve."""

import logging

import pytest
import torch
from conftest import perturbed_copy, tiny_model
from test_batched import PROMPTS, alone, left_padded

import saguaro
from saguaro.api import SpeculativeGenerator
from saguaro.model import packed_linear
from saguaro.model.packed_linear import PackedLinear, packed_view

pytestmark = pytest.mark.skipif(not packed_linear.packing_available(), reason="torch without oneDNN packing")


@pytest.fixture
def packing_pays(monkeypatch):
    """Tiny layers are not faster packed (a call's fixed cost dominates): let the view be built,
    so that its products are what the tests check."""
    monkeypatch.setattr(packed_linear, "_seconds_per_product", lambda layer, x: 0.0)


def bf16_model(arch="qwen2", seed=0):
    return tiny_model(arch, seed=seed, hidden=64, dtype=torch.bfloat16)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "phi3"])
def test_a_packed_view_computes_the_models_logits_bit_for_bit(arch, packing_pays):
    model = bf16_model(arch)
    view = packed_view(model)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert view is not model and linears
    assert all(type(m) is not torch.nn.Linear for m in view.modules())  # every one packed
    assert all(type(m) is torch.nn.Linear for m in linears)  # the model itself untouched
    assert {p.data_ptr() for p in view.parameters()} == {p.data_ptr() for p in model.parameters()}
    with torch.no_grad():
        for width in (1, 3, 40):
            ids = torch.randint(4, 96, (3, width), generator=torch.Generator().manual_seed(width))
            assert torch.equal(view(ids).logits, model(ids).logits)


def test_a_packed_layer_packs_again_after_its_weight_changes(packing_pays):
    model = bf16_model()
    view = packed_view(model)
    ids = torch.tensor([[1, 17, 33, 5, 80]])
    with torch.no_grad():
        before = view(ids).logits
        for module in model.modules():
            if type(module) is torch.nn.Linear:
                module.weight.mul_(1.5)
        assert not torch.equal(view(ids).logits, before)
        assert torch.equal(view(ids).logits, model(ids).logits)


def test_packing_stays_off_where_it_does_not_serve(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="saguaro")
    fp32 = tiny_model("qwen2")
    assert packed_view(fp32) is fp32
    assert "float32" in caplog.text
    # As measured here: the plain model, saying why, or a view whose every linear is packed and
    # whose logits are the model's.
    caplog.clear()
    model = bf16_model()
    view = packed_view(model)
    if view is model:
        assert "linears stay unpacked" in caplog.text
    else:
        assert all(type(m) is not torch.nn.Linear for m in view.modules())
        assert any(type(m) is PackedLinear for m in view.modules())
        ids = torch.tensor([[1, 17, 33, 5]])
        with torch.no_grad():
            assert torch.equal(view(ids).logits, model(ids).logits)
    monkeypatch.setattr(
        packed_linear, "_seconds_per_product", lambda layer, x: float(type(layer) is PackedLinear)
    )
    model = bf16_model()
    assert packed_view(model) is model and "not faster" in caplog.text
    monkeypatch.setattr(packed_linear, "_seconds_per_product", lambda layer, x: 0.0)
    # Too little free memory for the copy.
    monkeypatch.setattr(packed_linear, "_available_memory_bytes", lambda: 1024)
    assert packed_view(model) is model and "free memory" in caplog.text
    monkeypatch.setattr(packed_linear, "_available_memory_bytes", lambda: None)
    # Products that differ (a kernel that rounds otherwise): never used.
    real_forward = PackedLinear.forward
    monkeypatch.setattr(PackedLinear, "forward", lambda self, x: real_forward(self, x) * 1.01)
    assert packed_view(model) is model and "differ" in caplog.text
    monkeypatch.setattr(PackedLinear, "forward", real_forward)
    assert packed_view(model) is not model


def test_a_generator_runs_the_packed_target_with_the_same_output(packing_pays):
    target = bf16_model(seed=0)
    draft = perturbed_copy(target, noise=0.05)
    ids, mask = left_padded(PROMPTS)
    outputs = {}
    for pack in (True, False):
        generator = SpeculativeGenerator(
            target,
            draft,
            method="speculative",
            draft_quantization=None,
            draft_vocab_size=None,
            speculation_schedule="constant",  # every round drafts: the test is about verification
            num_speculative_tokens=3,
            pack_target_weights=pack,
        )
        outputs[pack] = [
            generator.generate(
                ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[], return_dict_in_generate=True
            ),
            generator.generate(ids[:1], max_new_tokens=20, eos_token_id=[], return_dict_in_generate=True),
        ]
        ran = generator.pool.target()
        assert (ran is not target) == pack
        assert any(type(m) is PackedLinear for m in ran.modules()) == pack
    for packed, plain in zip(outputs[True], outputs[False]):
        assert torch.equal(packed.sequences, plain.sequences)
        assert packed.stats.drafted > packed.stats.accepted > 0  # speculation, some of it rejected
    with pytest.raises(ValueError, match="pack_target_weights"):
        saguaro.generate(target, ids[:1], draft_model=draft, pack_target_weights="yes")


def generator_after_a_call():
    """(target, draft, generator, prompt): a bf16 pair whose generator has built its packed view."""
    target = bf16_model(seed=0)
    draft = perturbed_copy(target, noise=0.05)
    generator = SpeculativeGenerator(
        target, draft, method="speculative", draft_quantization=None, draft_vocab_size=None
    )
    prompt = torch.tensor([PROMPTS[0]])
    generator.generate(prompt, max_new_tokens=5, eos_token_id=[])
    assert generator.pool.target() is not target
    return target, draft, generator, prompt


def test_a_target_turned_to_float32_runs_as_itself(packing_pays):
    target, draft, generator, prompt = generator_after_a_call()
    target.float()
    draft.float()
    out = generator.generate(prompt, max_new_tokens=12, eos_token_id=[])
    assert generator.pool.target() is target  # no packed bf16 copy computes the float32 model
    assert out[0, prompt.shape[1] :].tolist() == alone(target, PROMPTS[0], 12, eos_token_id=[])


def test_hooks_registered_on_the_model_after_the_view_was_built_still_run(packing_pays):
    target, _, generator, prompt = generator_after_a_call()
    forwards, products = [], []
    target.register_forward_pre_hook(lambda module, args: forwards.append(module))
    target.model.layers[0].mlp.down_proj.register_forward_hook(lambda module, args, out: products.append(out))
    out = generator.generate(prompt, max_new_tokens=8, eos_token_id=[], return_dict_in_generate=True)
    assert len(forwards) == out.stats.rounds + 1  # the prefill, then one forward a round
    assert len(products) == len(forwards)
