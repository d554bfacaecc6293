"""The CUDA tree-attention kernel in csrc/: it compiles, it builds (ahead of time by setup.py, or just in
time by saguaro.kernels.build.load_cuda_extension), and it matches the reference."""

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from saguaro.kernels.reference import pack_tree_mask, tree_attention_reference

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_ABS_ERROR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def nvcc_arch(nvcc: str) -> str:
    """sm_80 (bf16 tensor cores, the oldest GPU we target) when this nvcc has it, else its oldest arch."""
    listing = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    archs = sorted(int(number) for number in re.findall(r"compute_(\d+)", listing))
    return "sm_80" if not archs or 80 in archs else f"sm_{archs[0]}"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_kernel_compiles_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc")
    result = subprocess.run(
        [
            nvcc,
            "-c",
            str(REPO_ROOT / "csrc" / "tree_attention.cu"),
            "-std=c++17",
            f"-arch={nvcc_arch(nvcc)}",
            "-o",
            str(tmp_path / "tree_attention.o"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "tree_attention.o").stat().st_size > 0


def test_cuda_extension_description():
    # Loaded by path, as setup.py does, before saguaro is importable.
    spec = importlib.util.spec_from_file_location(
        "saguaro_build", REPO_ROOT / "saguaro" / "kernels" / "build.py"
    )
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    extension = build.cuda_extension()
    if torch.version.cuda is None:
        assert extension is None
    elif extension is not None:
        assert extension.name == "saguaro._C"
        assert all((REPO_ROOT / source).is_file() for source in extension.sources)


def causal_and_random_trees(batch: int, tree_len: int, generator: torch.Generator) -> torch.Tensor:
    """Row 0 a chain, the others random forests (parent of node i drawn from nodes < i, or none)."""
    masks = []
    for row in range(batch):
        mask = torch.zeros(tree_len, tree_len, dtype=torch.bool)
        for node in range(tree_len):
            parent = node - 1 if row == 0 else int(torch.randint(-1, node, (1,), generator=generator))
            if parent >= 0:
                mask[node] = mask[parent]
            mask[node, node] = True
        masks.append(mask)
    return torch.stack(masks)


def cuda_extension_or_skip():
    """saguaro._C, or the same kernel built just in time; a skip only where this machine lacks the
    toolchain (a failing build fails the test)."""
    from saguaro.kernels.build import CudaExtensionUnavailable, load_cuda_extension

    try:
        return load_cuda_extension()
    except CudaExtensionUnavailable as error:
        pytest.skip(str(error))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "q_heads, kv_heads, tree_len, prefix_len, head_dim",
    [(4, 2, 1, 0, 16), (8, 2, 33, 300, 128), (4, 1, 64, 7, 80), (2, 2, 300, 2048, 256)],
)
def test_cuda_extension_matches_reference(dtype, q_heads, kv_heads, tree_len, prefix_len, head_dim):
    extension = cuda_extension_or_skip()
    generator = torch.Generator().manual_seed(0)
    batch, kv_len = 2, prefix_len + tree_len
    q = 2 * torch.randn(batch, q_heads, tree_len, head_dim, generator=generator)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, generator=generator)
    v = torch.rand(batch, kv_heads, kv_len, head_dim, generator=generator) * 2 - 1
    q, k, v = (t.to("cuda", dtype) for t in (q, k, v))
    packed = pack_tree_mask(causal_and_random_trees(batch, tree_len, generator)).cuda()
    kv_start = torch.tensor([0, prefix_len // 2], dtype=torch.int32, device="cuda")
    scale = head_dim**-0.5
    actual = extension.tree_attention_cuda(q, k, v, packed, scale, kv_start)
    expected = tree_attention_reference(q, k, v, packed, scale, kv_start)
    error = (actual.float() - expected.float()).abs().max().item()
    assert error <= MAX_ABS_ERROR[dtype], f"max abs error {error}"
