"""Every example runs as shipped (tiny random models when no real ones are given)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def hf_replies(count: int) -> list[str]:
    """What HF greedy generate answers to the first `count` example prompts on the tiny pair."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        from _models import tiny_pair
    finally:
        sys.path.remove(str(EXAMPLES))
    tokenizer, target, _, prompts = tiny_pair()
    replies = []
    for prompt in prompts[:count]:
        inputs = tokenizer(prompt, return_tensors="pt")
        out = target.generate(**inputs, max_new_tokens=64)
        replies.append(tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True))
    return replies


CHECKS = {  # what each example must print: a result, never a label printed before the work
    "quickstart.py": "identical to HF generate: True",
    "batch_generation.py": "identical to HF batched generate: True",
    "streaming_chat.py": lambda: [f"assistant: {reply}" for reply in hf_replies(2)],
    "cpu_parallel_drafter.py": "worker stopped: True",
    "multi_gpu.py": "identical to HF generate: True",
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
        # This checkout's saguaro, not whichever one is installed (an editable install elsewhere).
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(EXAMPLES.parent), os.environ.get("PYTHONPATH", "")]),
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checks = CHECKS[name]() if callable(CHECKS[name]) else [CHECKS[name]]
    # The streamed text is split at token boundaries; compare it word by word.
    for check in checks:
        assert " ".join(check.split()) in " ".join(result.stdout.split()), result.stdout[-3000:]


def test_every_example_is_checked():
    assert {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")} == set(CHECKS)
