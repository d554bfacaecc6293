"""Measurements kept on disk, so a second process on the same machine pays nothing to decide.

What `method="auto"`, `draft_quantization="auto"` and the packed target decide rests on timings
(a forward's cost, where int4 kernels stop paying, whether packed products are faster and equal)
and on the draft's agreement with the target. Those depend on the models, their dtype, the CPU, the
thread count and torch, and on nothing a call passes, so they are measured once and stored under a
key of exactly those, as inductor and autotuners keep theirs: one JSON file per kind of
measurement in `$SAGUARO_CACHE_DIR` (default `~/.cache/saguaro`). Delete the folder to measure
again; `SAGUARO_CACHE_DIR=off` keeps nothing on disk. A file that cannot be read or written is
ignored (logged): the cache only ever saves time.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path

import torch

from saguaro.faults import logger
from saguaro.model import weights

FORMAT = 1
# ISA features a timing depends on (native bf16 above all: without it speculation does not pay).
_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "avx512_fp16")


def directory() -> Path | None:
    """Where measurements live, or None when turned off."""
    value = os.environ.get("SAGUARO_CACHE_DIR")
    if value is not None and value.strip().lower() in ("", "0", "off", "none", "false"):
        return None
    return Path(value) if value else Path.home() / ".cache" / "saguaro"


@functools.cache
def machine() -> str:
    """The CPU model, its relevant ISA flags, and torch's version."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine()):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    features = ",".join(f for f in _CPU_FLAGS if f in flags)
    return f"{name}|{features}|torch {torch.__version__}"


def model_key(model) -> str:
    """The model's architecture, dtype, device type and sampled weights (two fine-tunes of one
    config agree differently with a draft)."""
    model = weights.source_of(model)
    config = model.config.to_json_string(use_diff=False) if hasattr(model, "config") else type(model).__name__
    parameter = next(model.parameters())
    described = f"{config}|{parameter.dtype}|{parameter.device.type}|{weights.fingerprint(model)}"
    return hashlib.sha256(described.encode()).hexdigest()[:20]


def variant(model) -> tuple:
    """What tells variants of one model apart (packed, quantized, a reduced vocabulary): its
    module types and the sizes of its tensors."""
    kinds = tuple(sorted({type(m).__name__ for m in model.modules()}))
    sizes = sum(t.numel() for t in model.buffers()) + sum(p.numel() for p in model.parameters())
    return kinds, sizes


def key(*parts) -> str:
    """A cache key from parts that identify a measurement (models' keys, thread counts, options)."""
    return hashlib.sha256(repr((FORMAT, machine(), parts)).encode()).hexdigest()[:24]


def _path(kind: str) -> Path | None:
    folder = directory()
    return None if folder is None else folder / f"{kind}.json"


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        logger.info("saguaro: ignoring the measurement cache %s (%s)", path, error)
        return {}


def load(kind: str, entry: str):
    """The stored measurement, or None."""
    path = _path(kind)
    return None if path is None else _read(path).get(entry)


def store(kind: str, entry: str, value) -> None:
    """Keep `value` (JSON-serialisable) under `entry`; written atomically (a temporary file
    renamed), so concurrent processes never read a half-written file."""
    path = _path(kind)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read(path)
        data[entry] = value
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as file:
            json.dump(data, file)
        os.replace(file.name, path)
    except OSError as error:
        logger.info("saguaro: could not write the measurement cache %s (%s)", path, error)
