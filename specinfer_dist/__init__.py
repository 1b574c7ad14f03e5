"""specinfer_dist: tree-based speculative inference that keeps the LLM's output exactly."""

from specinfer_dist.engine import LLMEngine, RequestOutput, SamplingParams
from specinfer_dist.errors import (
    InvalidConfigError,
    InvalidRequestError,
    ModelLoadError,
    SpecInferError,
)
from specinfer_dist.tree import TreeSpec

__all__ = [
    "InvalidConfigError",
    "InvalidRequestError",
    "LLMEngine",
    "ModelLoadError",
    "RequestOutput",
    "SamplingParams",
    "SpecInferError",
    "TreeSpec",
]
__version__ = "0.1.0"
