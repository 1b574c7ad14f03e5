"""A replica's serving core, shared by the HTTP and gRPC front ends: the engine (loaded in the
background, so health checks answer from the start), the served model's name, the API key,
metrics, chat prompts and usage accounting."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, TypeVar

from jinja2 import TemplateError

from specinfer_dist.config import ClusterConfig, EngineConfig, ServeConfig
from specinfer_dist.engine.async_engine import RequestDelta
from specinfer_dist.engine.engine import Prompt
from specinfer_dist.errors import InvalidRequestError, SpecInferError
from specinfer_dist.progress import say, stage
from specinfer_dist.runtime.sampling_params import SamplingParams
from specinfer_dist.serve.api_errors import ApiError
from specinfer_dist.serve.auth import resolve_api_key
from specinfer_dist.serve.backend import ServingEngine, build_engine
from specinfer_dist.serve.metrics import Metrics

T = TypeVar("T")
logger = logging.getLogger(__name__)
_DONE = object()


class Service:
    """Answers from the moment it exists: the engine loads on a thread of its own, and until it
    is ready every route that needs it raises a 503 ``ApiError`` (``engine``), while ``status``
    says what the replica is doing, for ``/health`` and gRPC health checks."""

    def __init__(
        self, engine_config: EngineConfig, config: ServeConfig, cluster: ClusterConfig | None = None,
        progress: bool = True,
    ) -> None:
        self.config = config
        self.api_key = resolve_api_key(config)  # before loading models: a bad key file fails fast
        self.model_name = config.model_name or _model_name(engine_config.llm)
        self.metrics = Metrics(lambda: self._engine)
        self.created = int(time.time())
        self._engine: ServingEngine | None = None
        self._failure: str | None = None
        self._lock = threading.Lock()  # a shutdown while loading and the load's end see each other
        self._stopped = False
        self._loader = threading.Thread(
            target=self._load, args=(engine_config, cluster, progress), name="specinfer-load", daemon=True
        )
        self._loader.start()

    def _load(self, engine_config: EngineConfig, cluster: ClusterConfig | None, progress: bool) -> None:
        start = time.perf_counter()
        try:
            engine = build_engine(engine_config, self.config.runtime, cluster, progress)
        except Exception as err:  # noqa: BLE001 - reported by status() and /health, and logged
            self._failure = str(err) if isinstance(err, SpecInferError) else f"{type(err).__name__}: {err}"
            logger.error("loading the engine failed: %s", self._failure, exc_info=not isinstance(err, SpecInferError))
            say(f"loading failed: {self._failure}", "failed", progress)
            return
        with self._lock:
            if self._stopped:  # shut down while loading: nobody will serve from it
                engine.shutdown()
                return
            self._engine = engine
        defaults = engine.sampling_defaults
        say(f"requests that set no temperature/top_p/top_k get "
            + (f"the model's generation_config.json values {defaults} (else OpenAI's)" if defaults
               else "OpenAI's defaults (temperature 1, top_p 1, no top_k)"), show=progress)
        say(f"{self.model_name} is ready ({time.perf_counter() - start:.1f} s to load)", "ready", progress)

    @property
    def engine(self) -> ServingEngine:
        """The engine; a 503 ``ApiError`` saying why (``status``) while there is none to serve from."""
        engine = self._engine
        if engine is not None and not self._stopped:  # every request: no status(), remote on Ray
            return engine
        status = self.status()
        message, code = {
            "stopped": ("the service is shutting down", "shutting_down"),
            "failed": (f"the model failed to load: {status.get('error')}", "model_load_failed"),
            "loading": (f"the model is loading ({status.get('stage')}); retry shortly", "model_loading"),
        }[status["status"]]
        raise ApiError(503, message, type="server_error", code=code)

    def status(self) -> dict[str, Any]:
        """{"status": "loading", "stage": ...} | {"status": "failed", "error": ...} | {"status": "ready", ...}
        | {"status": "stopped"}."""
        engine = self._engine
        if self._stopped:
            return {"status": "stopped", "model": self.model_name}
        if engine is not None:
            return {"status": "ready", "model": self.model_name, "running": engine.num_running(),
                    "waiting": engine.num_waiting()}
        if self._failure is not None:
            return {"status": "failed", "model": self.model_name, "error": self._failure}
        return {"status": "loading", "model": self.model_name, "stage": stage()}

    def wait_ready(self, timeout: float | None = None) -> ServingEngine:
        """Block until loading ends (tests, embedding callers); the engine, or the 503 error."""
        self._loader.join(timeout)
        return self.engine

    def generate(self, jobs: list[tuple[Prompt, SamplingParams]], chat: bool = False) -> AsyncIterator[tuple[int, RequestDelta]]:
        """Run every job at once (they batch in the engine); deltas tagged with their job's index.
        Bad input raises from the iteration, normally before any delta (so HTTP can still 400); a
        request for more sequences than the engine may queue raises here (429 when the queue is full)."""
        self.engine.check_capacity(len(jobs))
        return merge([self.metrics.timed(self.engine.generate(p, sp, chat)) for p, sp in jobs])

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of a conversation rendered by the tokenizer's chat template, ready for the reply."""
        tokenizer = self.engine.tokenizer
        if not tokenizer.chat_template:
            raise InvalidRequestError("this model's tokenizer has no chat template")
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as err:  # templates raise on conversations they refuse (e.g. role order)
            raise InvalidRequestError(f"messages do not fit the chat template: {err}") from None
        return tokenizer(text, add_special_tokens=False).input_ids

    def default_chat_max_tokens(self, prompt_tokens: int) -> int:
        """A chat request's max_tokens when it sets none: what the context leaves after the prompt
        (as vLLM), capped by ``default_max_tokens`` where that is set."""
        left = self.engine.max_model_len - prompt_tokens
        if left < 1:
            raise InvalidRequestError(
                f"the prompt ({prompt_tokens} tokens) leaves no room in the model's context of "
                f"{self.engine.max_model_len} tokens"
            )
        cap = self.config.default_max_tokens
        return left if cap is None else min(left, cap)

    def shutdown(self) -> None:
        with self._lock:
            self._stopped = True
            engine = self._engine
        if engine is not None:
            engine.shutdown()


@dataclass
class Usage:
    """Token counts over a request's choices, with OpenAI's prompt (cached) and prediction-token details."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0
    _cached: dict[int, int] = field(default_factory=dict, repr=False)  # per counted request: its cached tokens

    def add(self, delta: RequestDelta, count_prompt: bool = True) -> None:
        if count_prompt:
            # The prompt counts from a request's first delta, so streamed usage has it from the start.
            if delta.request_id not in self._cached:
                self.prompt_tokens += delta.prompt_tokens
            # Cached tokens: the latest delta's, as a prompt prefilled over several steps (chunked
            # prefill) may find more of itself cached later, published by a request beside it.
            self._cached[delta.request_id] = delta.cached_tokens
        self.completion_tokens += len(delta.token_ids)
        if delta.finished:
            self.accepted_prediction_tokens += delta.stats.accepted_tokens
            self.rejected_prediction_tokens += delta.stats.drafted_tokens - delta.stats.accepted_tokens

    @property
    def cached_tokens(self) -> int:
        """Of ``prompt_tokens``, those taken from the prefix cache (counted over the same requests)."""
        return sum(self._cached.values())

    def to_openai(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "completion_tokens_details": {
                "accepted_prediction_tokens": self.accepted_prediction_tokens,
                "rejected_prediction_tokens": self.rejected_prediction_tokens,
            },
        }


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of all streams as they arrive, tagged with their stream's index. The first error
    ends the merge; closing the merge (e.g. a client disconnecting) closes every stream."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async with aclosing(stream):
                async for item in stream:
                    queue.put_nowait((index, item))
            queue.put_nowait((index, _DONE))
        except Exception as err:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((index, err))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is _DONE:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _model_name(llm: str) -> str:
    """The id clients call the model by: the checkpoint's directory or file name, or the hub id."""
    if llm == "default":
        return "SmolLM2-135M-Instruct"
    path = Path(llm)
    return path.name if path.exists() else llm
