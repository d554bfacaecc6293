"""Weight changes by every route reach everything saguaro built from the weights (model/weights.py):
the packed target, the compressed draft, the prefix caches and the Saguaro worker's copy; and
one-shot `saguaro.generate` calls share one prepared state per model pair."""

import gc
import weakref

import pytest
import torch
from conftest import perturbed_copy, tiny_model
from torch import nn

import saguaro
from saguaro.draft.compression import _PREPARED
from saguaro.model import packed_linear, weights
from saguaro.model.packed_linear import PackedLinear

SYSTEM = [1, 17, 33, 5, 80, 42, 9, 64, 23, 18, 66, 63, 23, 10, 15, 54, 87, 67, 15, 40]
NEW = 16
QUIET = dict(worker_timeout=30)


@pytest.fixture
def packing_pays(monkeypatch):
    """Tiny layers are not faster packed: let the view be built, so the test covers it."""
    monkeypatch.setattr(packed_linear, "_seconds_per_product", lambda layer, x: 0.0)


def rejected(out, sources=("model", "cache", "lookup")) -> int:
    """Rounds whose draft (from one of `sources`) was cut short by the target."""
    return sum(
        r["accepted"] < r["depth"] for r in out.stats.round_log if r["drafted"] and r["source"] in sources
    )


def drop_in(model, ids, max_new_tokens=NEW):
    """The enabled model's generate, as a user calls it (HF's greedy once disabled)."""
    return model.generate(**greedy_options(ids, max_new_tokens), return_dict_in_generate=True)


def hf_greedy(model, ids, max_new_tokens=NEW):
    return model.generate(**greedy_options(ids, max_new_tokens)).tolist()


def greedy_options(ids, max_new_tokens) -> dict:
    # An explicit mask: an answer may contain the pad id, 0, which HF would otherwise mask out.
    return dict(
        inputs=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=[],
        pad_token_id=0,
    )


def write_through_data(model):
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.data.mul_(-1.5)  # .data: no version counter moves


def load_with_assign(model):
    fresh = tiny_model("qwen2", seed=7, dtype=next(model.parameters()).dtype)
    model.load_state_dict(fresh.state_dict(), assign=True)


def replace_a_module(model):
    old = model.lm_head
    head = nn.Linear(old.in_features, old.out_features, bias=False, dtype=old.weight.dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn_like(old.weight) * 0.5)
    model.lm_head = head


ROUTES = {"data": write_through_data, "assign": load_with_assign, "module": replace_a_module}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "dtype, method",
    [(torch.float32, "speculative"), (torch.bfloat16, "autoregressive"), (torch.bfloat16, "speculative")],
)
def test_a_kept_drop_in_answers_with_the_new_weights(route, dtype, method, packing_pays):
    target = tiny_model("qwen2", seed=0, dtype=dtype)
    draft = perturbed_copy(target, 0.005)
    ids = torch.tensor([SYSTEM])
    options = dict(method=method, speculation_schedule="constant", **QUIET)
    with saguaro.enable(target, draft_model=draft, **options):
        first = drop_in(target, ids)
        again = drop_in(target, ids)  # the prefix cache now holds the prompt's KV
        assert again.stats.reused_prompt_tokens == len(SYSTEM) - 1
        if dtype == torch.bfloat16:  # the packed view ran, so its staleness is what is tested
            generator = target._saguaro.generator
            assert any(isinstance(m, PackedLinear) for m in generator.pool.target().modules())
        ROUTES[route](target)
        after = drop_in(target, ids)
    expected = hf_greedy(target, ids)
    assert first.sequences.tolist() != expected  # the change matters to the answer
    assert after.sequences.tolist() == expected
    assert after.stats.reused_prompt_tokens == 0  # stale KV was not reused
    if method == "speculative":  # speculation ran, before and after the change
        assert first.stats.accepted > 0 and rejected(first) > 0 and after.stats.drafted > 0


@pytest.mark.parametrize("method", ["speculative", "saguaro"])
def test_a_draft_written_through_data_is_drafted_from_at_once(method):
    """The draft's weights set to the target's through `.data`: from the next call on every draft
    is accepted, in process and in the Saguaro worker (restarted on the new weights)."""
    target = tiny_model("llama", seed=0)
    draft = perturbed_copy(target, 0.05)
    ids = torch.tensor([SYSTEM])
    options = dict(method=method, speculation_schedule="constant", draft_quantization=None, **QUIET)
    with saguaro.SpeculativeGenerator(target, draft, **options) as generator:
        before = generator.generate(ids, max_new_tokens=NEW, eos_token_id=[], return_dict_in_generate=True)
        with torch.no_grad():
            for mine, theirs in zip(draft.parameters(), target.parameters()):
                mine.data.copy_(theirs.data)
        after = generator.generate(ids, max_new_tokens=NEW, eos_token_id=[], return_dict_in_generate=True)
    assert rejected(before) > 0 and after.stats.accepted > 0
    assert rejected(after, sources=("model", "cache")) == 0  # a prompt-lookup backup may miss
    assert after.sequences.tolist() == before.sequences.tolist() == hf_greedy(target, ids)


def test_weights_changed_marks_a_write_the_samples_miss():
    target = tiny_model("llama", seed=0)
    ids = torch.tensor([SYSTEM])
    with saguaro.SpeculativeGenerator(target, method="autoregressive") as generator:
        generator.generate(ids, max_new_tokens=4, eos_token_id=[])
        epoch = weights.epoch(target)
        with torch.no_grad():
            target.lm_head.weight.data[3, 5] += 1.0  # one element: between the samples
        generator.generate(ids, max_new_tokens=4, eos_token_id=[])
        assert weights.epoch(target) == epoch
        saguaro.weights_changed(target)
        assert weights.epoch(target) == epoch + 1
        out = generator.generate(ids, max_new_tokens=4, eos_token_id=[], return_dict_in_generate=True)
    assert out.stats.reused_prompt_tokens == 0


def test_one_shot_calls_share_the_prepared_target_and_draft(packing_pays):
    target = tiny_model("qwen2", seed=0, dtype=torch.bfloat16)
    draft = perturbed_copy(target, 0.005)
    ids = torch.tensor([SYSTEM])
    outs = [
        saguaro.generate(
            target, ids, draft, method="speculative", return_dict_in_generate=True, max_new_tokens=8
        )
        for _ in range(2)
    ]
    assert not outs[0].stats.draft_configuration["reused"] and outs[1].stats.draft_configuration["reused"]
    views = {id(packed_linear.runnable_target(target, True)) for _ in range(2)}
    assert len(views) == 1 and views != {id(target)}
    # Shared for as long as the models live, and no longer.
    view = weakref.ref(packed_linear.runnable_target(target, True))
    del target, outs
    gc.collect()
    assert view() is None and len(_PREPARED.get(draft, {})) == 0


def test_the_samples_see_broad_writes_and_ignore_nothing_changing():
    model = tiny_model("llama", seed=0)
    start = weights.observe(model)
    assert weights.observe(model) == start  # no change, no new epoch
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.data.mul_(2.0)
    assert weights.observe(model) == start + 1
    model.model.layers[1].mlp.gate_proj.weight = nn.Parameter(
        model.model.layers[1].mlp.gate_proj.weight.clone()
    )
    assert weights.observe(model) == start + 2  # a new parameter, equal values: identity moved
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    assert weights.observe(model) == start + 3 and weights.observe(model) == start + 3  # NaN is stable


def test_an_enabled_models_packed_view_goes_with_the_model(packing_pays):
    target = tiny_model("qwen2", seed=0, dtype=torch.bfloat16)
    ids = torch.tensor([SYSTEM])
    saguaro.enable(target, method="autoregressive")
    drop_in(target, ids)
    view = weakref.ref(packed_linear.runnable_target(target, True))
    assert view() is not target
    saguaro.disable(target)
    del target
    gc.collect()
    assert view() is None
