"""Builds the optional CUDA extension `saguaro._C` (csrc/) when CUDA torch and nvcc are present.

Everything else is declared in pyproject.toml. On CPU-only machines no extension is built and the
install is pure Python: the Triton kernel and the PyTorch reference cover those.
"""

import importlib.util
from pathlib import Path

from setuptools import setup


def _cuda_extensions():
    try:
        import torch  # noqa: F401
    except ImportError:  # pip's isolated build environment has no torch: a pure-Python install
        return {}
    spec = importlib.util.spec_from_file_location(
        "_saguaro_build", Path(__file__).parent / "saguaro/kernels/build.py"
    )
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    extension = build.cuda_extension()
    if extension is None:
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(**_cuda_extensions())
