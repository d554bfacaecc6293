"""Every example runs as shipped (tiny random models when no real ones are given)."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CHECKS = {  # what each example must print
    "quickstart.py": "identical to HF generate: True",
    "batch_generation.py": "identical to HF batched generate: True",
    "streaming_chat.py": "assistant:",
    "cpu_parallel_drafter.py": "worker stopped: True",
    "multi_gpu.py": "cache hit rate",
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_example_runs(name):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=EXAMPLES.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert CHECKS[name] in result.stdout, result.stdout[-3000:]


def test_every_example_is_checked():
    assert {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")} == set(CHECKS)
