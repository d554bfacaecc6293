"""The private transformers API saguaro's drop-in generate relies on, one test per method/attribute.

If a transformers upgrade removes or changes one, its test here fails, naming it; see
saguaro/hf/internals.py for the contract each wrapper states.
"""

import pytest
import torch
from conftest import tiny_model, word_tokenizer
from transformers import GenerationConfig
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper
from transformers.generation.stopping_criteria import (
    EosTokenCriteria,
    MaxLengthCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
)

from saguaro.hf import internals as hf

IDS = torch.tensor([[0, 0, 1, 17, 33]])  # left padding with pad id 0


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=0)


def prepared(model, **kwargs):
    config, model_kwargs = hf.prepare_generation_config(model, None, kwargs)
    hf.prepare_special_tokens(model, config, "attention_mask" in model_kwargs, IDS)
    return config, model_kwargs


def test_prepare_generation_config(model):
    before = model.generation_config.to_dict()
    config, model_kwargs = hf.prepare_generation_config(
        model, None, {"max_new_tokens": 7, "repetition_penalty": 1.3, "attention_mask": torch.ones_like(IDS)}
    )
    assert isinstance(config, GenerationConfig), "_prepare_generation_config no longer returns a config"
    assert config.max_new_tokens == 7 and config.repetition_penalty == 1.3
    assert config.eos_token_id == 2, "_prepare_generation_config dropped the model's generation_config"
    assert set(model_kwargs) == {"attention_mask"}, "_prepare_generation_config: model kwargs changed"
    assert model.generation_config.to_dict() == before, "_prepare_generation_config modified the model's"
    explicit, _ = hf.prepare_generation_config(model, GenerationConfig(max_new_tokens=3), {"do_sample": True})
    assert explicit.max_new_tokens == 3 and explicit.do_sample


def test_prepare_special_tokens_and_the_private_token_tensors(model):
    config, _ = prepared(model, max_new_tokens=4)
    assert hf.special_tokens(config) == ([2], 0), (
        "_prepare_special_tokens/_eos_token_tensor/_pad_token_tensor"
    )
    config, _ = prepared(model, max_new_tokens=4, eos_token_id=[2, 7], pad_token_id=None)
    # HF's default when pad is unset: the first EOS (what finished rows are padded with).
    eos, pad = hf.special_tokens(config)
    assert eos == [2, 7] and pad == 2, "_prepare_special_tokens: pad no longer defaults to the first EOS"


def test_prepare_attention_mask_for_generation(model):
    config, model_kwargs = prepared(model, max_new_tokens=4)
    mask = hf.infer_attention_mask(model, IDS, config, model_kwargs)
    assert mask.tolist() == [[0, 0, 1, 1, 1]], "_prepare_attention_mask_for_generation: pad ids not masked"
    unpadded = IDS[:, 2:]
    assert hf.infer_attention_mask(model, unpadded, config, model_kwargs).tolist() == [[1, 1, 1]]


def test_prepare_generated_length(model):
    config, _ = prepared(model, max_new_tokens=7, min_new_tokens=2)
    config = hf.prepare_generated_length(model, config, True, True, IDS)
    assert config.max_length == IDS.shape[1] + 7, (
        "_prepare_generated_length: max_length no longer counts the prompt"
    )
    assert config.min_length == IDS.shape[1] + 2


def test_get_logits_processor(model):
    config, model_kwargs = prepared(
        model, max_new_tokens=4, repetition_penalty=1.3, do_sample=True, temperature=0.7
    )
    config = hf.prepare_generated_length(model, config, True, True, IDS)
    processors = hf.logits_processor(
        model, config, IDS.shape[1], IDS, None, {**model_kwargs, "attention_mask": (IDS != 0).long()}
    )
    kinds = {type(p) for p in processors}
    assert RepetitionPenaltyLogitsProcessor in kinds, "_get_logits_processor: no repetition penalty"
    assert TemperatureLogitsWarper in kinds, "_get_logits_processor: warpers are no longer in the list"
    scores = torch.zeros(1, 96)
    scores[0, 17] = 1.0
    # The penalty applies to the row's tokens (17), not to its padding (0).
    out = processors(IDS, scores.clone())
    assert out[0, 17] == pytest.approx(1.0 / 1.3 / 0.7) and out[0, 0] == 0


def test_get_stopping_criteria(model):
    config, _ = prepared(model, max_new_tokens=4, stop_strings="w1")
    config = hf.prepare_generated_length(model, config, True, True, IDS)
    criteria = hf.stopping_criteria(model, config, StoppingCriteriaList(), word_tokenizer())
    kinds = {type(c) for c in criteria}
    assert {MaxLengthCriteria, EosTokenCriteria, StopStringCriteria} <= kinds, "_get_stopping_criteria"


def test_a_missing_private_method_is_named():
    class NoHF:
        pass

    with pytest.raises(RuntimeError, match="NoHF._prepare_generation_config is gone.*transformers 5.x"):
        hf.prepare_generation_config(NoHF(), None, {})
    with pytest.raises(RuntimeError, match="GenerationConfig._eos_token_tensor is gone"):
        hf.special_tokens(GenerationConfig())


def test_load_tensor_parallel_swaps_the_mesh_builder_it_relies_on(monkeypatch):
    # The contract: transformers builds a TP model's mesh through mixin.initialize_distributed_mesh
    # (whose result from_pretrained shards with); load_tensor_parallel substitutes it for one load
    # and restores it. The sharded load itself runs in tests/test_distributed.py.
    from transformers.distributed import mixin

    original = mixin.initialize_distributed_mesh
    seen = []

    def fake_from_pretrained(path, distributed_config, **kwargs):
        seen.append((mixin.initialize_distributed_mesh(distributed_config), distributed_config.tp_size))
        return "model"

    class Mesh:
        def get_mesh(self, dims):
            return type("TP", (), {"device_type": "cpu"})()

    mesh = Mesh()
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", fake_from_pretrained)
    assert hf.load_tensor_parallel("path", mesh, 2) == "model"
    assert seen == [((torch.device("cpu"), mesh), 2)]
    assert mixin.initialize_distributed_mesh is original
