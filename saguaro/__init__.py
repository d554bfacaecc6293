"""saguaro: lossless speculative (and speculative speculative) decoding for Hugging Face causal LMs."""
from .api import METHODS, GenerateOutput, generate
from .stats import GenerationStats

__all__ = ["generate", "GenerateOutput", "GenerationStats", "METHODS"]
__version__ = "0.1.0"
