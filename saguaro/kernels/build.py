"""Build description of the optional CUDA extension `saguaro._C` (csrc/).

setup.py loads this file by path, before saguaro is importable, so it imports nothing
from saguaro and does nothing at import time.
"""

CSRC_SOURCES = ["csrc/tree_attention.cpp", "csrc/tree_attention.cu"]


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
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17"]},
    )
