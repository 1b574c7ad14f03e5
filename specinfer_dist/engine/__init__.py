from specinfer_dist.engine.engine import LLMEngine
from specinfer_dist.engine.outputs import RequestOutput
from specinfer_dist.runtime.sampling_params import SamplingParams

__all__ = ["LLMEngine", "RequestOutput", "SamplingParams"]
