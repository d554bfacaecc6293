"""saguaro: lossless speculative (and speculative speculative) decoding for Hugging Face causal LMs."""

from saguaro.api import GenerateOutput, SpeculativeGenerator, generate
from saguaro.config import METHODS, Method, Placement, Schedule
from saguaro.decode.stats import GenerationStats
from saguaro.engine.engine import AsyncEngine, Engine
from saguaro.engine.errors import EngineClosed, QueueFull
from saguaro.faults import SaguaroWarning
from saguaro.hf.drop_in import UnsupportedGenerateCall, disable, enable
from saguaro.kernels import TREE_ATTENTION, TREE_BACKENDS
from saguaro.kernels.hf_attention import register_hf_attention
from saguaro.model.tree import DynamicTree
from saguaro.model.weights import weights_changed

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
    "Method",
    "Placement",
    "Schedule",
    "weights_changed",
    "Engine",
    "AsyncEngine",
    "QueueFull",
    "EngineClosed",
]
__version__ = "0.1.0"
