"""The optional CUDA extension with csrc/'s tree attention: built ahead of time by setup.py
(`cuda_extension`, as `saguaro._C`) or just in time on first use (`load_cuda_extension`).

setup.py loads this file by path, before saguaro is importable, so it imports nothing
from saguaro and does nothing at import time.
"""

import functools
import logging
from pathlib import Path

CSRC_SOURCES = ["csrc/tree_attention.cpp", "csrc/tree_attention.cu"]
REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
COMPILE_FLAGS = ["-O3", "-std=c++17"]
JIT_NAME = "saguaro_tree_attention"  # the module torch's extension cache builds and keeps


class CudaExtensionUnavailable(RuntimeError):
    """This machine cannot build or load the CUDA extension (no CUDA torch, no nvcc, no sources)."""


def cuda_extension():
    """The CUDAExtension for `saguaro._C`, or None where it cannot be built.

    It needs a CUDA build of torch and nvcc (found through CUDA_HOME). Source paths are
    relative to the repository root, where setup.py runs.
    """
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension

    if torch.version.cuda is None or CUDA_HOME is None:
        return None
    return CUDAExtension(
        name="saguaro._C",
        sources=CSRC_SOURCES,
        extra_compile_args={"cxx": COMPILE_FLAGS, "nvcc": COMPILE_FLAGS},
    )


def load_cuda_extension(verbose: bool = False):
    """The module whose `tree_attention_cuda` is csrc/'s kernel: `saguaro._C` where setup.py built
    it, else built now with torch.utils.cpp_extension.load (a minute or two, once: torch caches the
    build under TORCH_EXTENSIONS_DIR and later processes load it in a second).

    Raises CudaExtensionUnavailable, saying what is missing and what to do, where it cannot be had,
    and the build's own error where nvcc fails; either is remembered, so a caller per forward (an
    attention layer) does not rebuild.
    """
    module, error = _load_once(verbose)
    if error is not None:
        raise error
    return module


@functools.cache
def _load_once(verbose: bool):
    try:
        return _load(verbose), None
    except Exception as error:  # noqa: BLE001 - handed to every caller by load_cuda_extension
        return None, error


def _load(verbose: bool):
    import torch

    logger = logging.getLogger("saguaro")
    try:
        from saguaro import _C  # built by setup.py

        return _C
    except ImportError:
        pass
    if torch.version.cuda is None:
        raise CudaExtensionUnavailable(
            f"the CUDA tree-attention kernel needs a CUDA build of torch (this one is {torch.__version__}, "
            "CPU only); install torch for your CUDA version, or use the 'triton' or 'sdpa' backend"
        )
    from torch.utils.cpp_extension import CUDA_HOME, load

    if CUDA_HOME is None:
        raise CudaExtensionUnavailable(
            "the CUDA tree-attention kernel is built on first use with nvcc, which was not found; install "
            "the CUDA toolkit (nvcc on PATH, or CUDA_HOME set), or use the 'triton' or 'sdpa' backend"
        )
    sources = [REPOSITORY_ROOT / source for source in CSRC_SOURCES]
    missing = [str(source) for source in sources if not source.is_file()]
    if missing:
        raise CudaExtensionUnavailable(
            f"the CUDA tree-attention sources are missing ({', '.join(missing)}): this install has no "
            "csrc/; install saguaro from a checkout (pip install -e .), or use the 'triton' or 'sdpa' backend"
        )
    logger.info("building the CUDA tree-attention extension from %s (torch caches it)", sources[0].parent)
    module = load(
        name=JIT_NAME,
        sources=[str(source) for source in sources],
        extra_cflags=COMPILE_FLAGS,
        extra_cuda_cflags=COMPILE_FLAGS,
        verbose=verbose,
    )
    logger.info("CUDA tree-attention extension loaded from %s", module.__file__)
    return module
