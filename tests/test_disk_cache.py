"""Measurements kept on disk (model/disk_cache.py): a later process (here: emptied in-process caches)
reads auto's step costs, the draft choice and the packing verdict instead of measuring again."""

import pytest
import torch
from conftest import perturbed_copy, tiny_model

from saguaro.draft import choice as draft_choice
from saguaro.draft import compression as draft_compression
from saguaro.draft.compression import _PREPARED, prepare_draft
from saguaro.model import disk_cache, packed_linear
from saguaro.model.placement import ThreadSplit
from saguaro.tune import auto

PROMPT = [1, 17, 33, 5, 80, 42, 9, 64, 23]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SAGUARO_CACHE_DIR", str(tmp_path))
    return tmp_path


def never(*args, **kwargs):
    raise AssertionError("measured again although the disk cache holds it")


def test_step_costs_are_read_back_instead_of_timed(cache_dir, monkeypatch):
    target = tiny_model("llama", seed=0)
    draft = perturbed_copy(target, 0.01)
    split = ThreadSplit(2, 1)
    measured = auto.calibrate(target, draft, 3, split)
    assert (cache_dir / "calibration.json").exists()
    auto._calibrations.clear()  # as in a new process
    monkeypatch.setattr(auto, "_timed", never)
    read = auto.calibrate(target, draft, 3, split)
    assert read.target_alone.points == measured.target_alone.points
    assert read.draft_beside.points == measured.draft_beside.points
    # Other weights of the same shapes are another key (agreement, and so choices, differ).
    other = tiny_model("llama", seed=5)
    with pytest.raises(AssertionError, match="measured again"):
        auto.calibrate(other, draft, 3, split)


def test_the_draft_choice_is_read_back_and_only_the_chosen_variant_is_built(cache_dir, monkeypatch):
    monkeypatch.setattr(draft_choice, "AUTO_MIN_WEIGHT_BYTES", 0)  # tiny drafts are measured too
    target = tiny_model("llama", seed=0, hidden=128)
    draft = perturbed_copy(target, 0.003)
    model, record = prepare_draft(draft, target, "auto", None, PROMPT, threads=1, lookahead=3)
    assert record.chosen_by == "auto" and not record.from_disk
    _PREPARED.clear()  # as in a new process
    monkeypatch.setattr(draft_compression, "choose_draft_configuration", never)
    again, stored = prepare_draft(draft, target, "auto", None, PROMPT, threads=1, lookahead=3)
    assert stored.from_disk and stored.label == record.label
    with torch.no_grad():
        ids = torch.tensor([PROMPT])
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_the_packing_verdict_is_read_back(cache_dir, monkeypatch):
    monkeypatch.setattr(packed_linear, "_seconds_per_product", lambda layer, x: 0.0)
    model = tiny_model("qwen2", seed=0, hidden=64, dtype=torch.bfloat16)
    first = packed_linear.packed_view(model)
    if first is model:
        pytest.skip("packed products differ from plain ones on this CPU")
    monkeypatch.setattr(packed_linear, "_matches_and_pays", never)
    assert packed_linear.packed_view(model) is not model


def test_off_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SAGUARO_CACHE_DIR", "off")
    assert disk_cache.directory() is None
    disk_cache.store("calibration", "key", {"x": 1})
    assert disk_cache.load("calibration", "key") is None


def test_an_unreadable_file_is_ignored(cache_dir):
    (cache_dir / "calibration.json").write_text("{not json")
    assert disk_cache.load("calibration", "key") is None
    disk_cache.store("calibration", "key", {"x": 1})
    assert disk_cache.load("calibration", "key") == {"x": 1}
