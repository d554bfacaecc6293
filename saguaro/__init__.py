"""saguaro: lossless speculative (and speculative speculative) decoding for Hugging Face causal LMs."""

from .api import METHODS, GenerateOutput, SpeculativeGenerator, generate
from .faults import SaguaroWarning
from .hf_generate import UnsupportedGenerateCall, disable, enable
from .kernels import TREE_BACKENDS
from .kernels.hf_attention import TREE_ATTENTION, register_hf_attention
from .stats import GenerationStats
from .tree import DynamicTree
from .weights import weights_changed

# Makes attn_implementation="saguaro_tree" (and "saguaro_tree_triton" / "_cuda" / "_sdpa", one
# backend each) available to from_pretrained once saguaro is imported.
for _backend in TREE_BACKENDS:
    register_hf_attention(_backend)

__all__ = [
    "generate",
    "enable",
    "disable",
    "UnsupportedGenerateCall",
    "SaguaroWarning",
    "SpeculativeGenerator",
    "DynamicTree",
    "TREE_ATTENTION",
    "GenerateOutput",
    "GenerationStats",
    "METHODS",
    "weights_changed",
]
__version__ = "0.1.0"
