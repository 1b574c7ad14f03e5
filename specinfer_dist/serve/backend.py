"""Where a replica gets its engine: the one place that knows which runtime runs generation.

Everything else in ``specinfer_dist.serve`` sees only ``ServingEngine``: AsyncLLMEngine's
surface, which the Ray runtime's ``CoordinatorClient`` offers too.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Protocol

from specinfer_dist.config import ClusterConfig, EngineConfig
from specinfer_dist.engine.async_engine import AsyncLLMEngine, Counters, RequestDelta
from specinfer_dist.engine.engine import Prompt
from specinfer_dist.errors import InvalidConfigError
from specinfer_dist.runtime.sampling_params import SamplingParams

RUNTIMES = ("local", "ray")


class ServingEngine(Protocol):
    counters: Counters
    tokenizer: Any
    max_model_len: int  # prompt + generated tokens one request may hold
    sampling_defaults: dict[str, Any]  # what requests that set no temperature/top_p/top_k get

    def generate(self, prompt: Prompt, params: SamplingParams | None = None, chat: bool = False) -> AsyncIterator[RequestDelta]: ...

    def num_waiting(self) -> int: ...

    def check_capacity(self, num_seqs: int) -> None: ...

    def num_running(self) -> int: ...

    async def reset_prefix_cache(self) -> int: ...  # between two steps; LLM blocks that were published

    def shutdown(self) -> None: ...


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise InvalidConfigError(f"serve.runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")


def build_engine(
    config: EngineConfig, runtime: str = "local", cluster: ClusterConfig | None = None, progress: bool = False
) -> ServingEngine:
    """``local``: the whole engine in this process (serving first, ``tree: auto`` raced in the
    background: ``AsyncLLMEngine.from_config``); ``ray``: a Coordinator and its verifier shards
    and draft workers as Ray actors placed by ``cluster`` (owned by this process, so they go
    when it does), driven from here. ``progress``: start-up lines on stderr."""
    check_runtime(runtime)
    if runtime == "ray":
        from specinfer_dist.distributed import (
            CoordinatorClient,  # only this runtime needs it
        )

        return CoordinatorClient.from_config(config, cluster)
    return AsyncLLMEngine.from_config(config, progress)
