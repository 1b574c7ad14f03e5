"""The Ray runtime's brain: a Coordinator actor that owns the request queue and the
continuous-batching engine, and a client with AsyncLLMEngine's surface.

The Coordinator runs the same LLMEngine + AsyncLLMEngine as the single-process path, built
from parts with remote stages: a ShardGroupVerifier (tensor-parallel LLM) and one
RemoteDrafter per drafter the draft workers host. With ``cluster.pipeline`` it is a
PipelinedEngine: a verification is always in flight while the other half of the batch is
drafted (pipeline.py). With ``cluster.colocate_drafters`` the drafters run inside this actor
(on its GPU share, beside verifier rank 0 on one GPU): no Ray round trip per draft, at the
price of drafting and the engine loop sharing one process. Start-up order: the shards load
(and measure ``tree: auto`` on their own device), then the drafters get the resolved tree.

A feature drafter (EAGLE-3 head) needs ``colocate_drafters``: it reads the accepted rows' hidden
states every step, and verifier rank 0 returns them with the logits of the same forward, so here
they arrive with no extra LLM pass and no extra Ray hop on the critical path (a draft worker
would need them shipped on, one more round trip per step). Without co-location ``start`` refuses.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace
from typing import Any, AsyncIterator

import ray
from ray.exceptions import RayTaskError
from ray.util.placement_group import remove_placement_group

from specinfer_dist.config import ClusterConfig, EngineConfig
from specinfer_dist.distributed.draft_worker import Drafting, DraftPool, DraftWorker
from specinfer_dist.distributed.pipeline import PipelinedEngine
from specinfer_dist.distributed.placement import (
    COORDINATOR_CPUS,
    actor_options,
    connect,
    coordinator_options,
    reserve,
    resolve_gpus,
    stage_device,
)
from specinfer_dist.distributed.verifier_shard import ShardGroupVerifier
from specinfer_dist.engine.async_engine import AsyncLLMEngine, Counters, RequestDelta
from specinfer_dist.engine.builder import scheduling_options
from specinfer_dist.engine.engine import LLMEngine, Prompt
from specinfer_dist.engine.outputs import RequestOutput
from specinfer_dist.errors import InvalidConfigError
from specinfer_dist.models.default import ssm_sources
from specinfer_dist.runtime.sampling_params import SamplingParams


# Its blocking ray.get calls run in start() and on the engine's loop thread, never while the
# actor's event loop serves requests; Ray's warning cannot tell them apart.
@ray.remote(num_cpus=COORDINATOR_CPUS, runtime_env={"env_vars": {"RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0"}})
class Coordinator:
    def __init__(self, engine: EngineConfig, cluster: ClusterConfig) -> None:
        self.config = (engine, cluster)

    def start(self) -> Any:
        """Place and load every stage; returns the tokenizer. A method rather than the
        constructor, so that a bad model path reaches the caller as the engine's own error."""
        engine, cluster = self.config
        if engine.feature_drafter is not None and engine.mode != "incremental" and not cluster.colocate_drafters:
            # Before anything is placed: the coordinator's GPU share was set by this flag when it started.
            raise InvalidConfigError(
                "a feature drafter runs inside the coordinator, where verifier rank 0 sends the hidden states: "
                "set cluster.colocate_drafters: true (--colocate-drafters)"
            )
        cluster = resolve_gpus(cluster)
        self.groups = reserve(cluster)
        shard_engine = replace(engine, device=stage_device(cluster, cluster.gpus_per_shard))
        self.verifier = ShardGroupVerifier(shard_engine, cluster, self.groups[0])
        drafting = replace(self._resolve_tree(engine), device=stage_device(cluster, cluster.gpus_per_draft_worker))
        self.workers, self.colocated = [], None
        if cluster.colocate_drafters:  # in this process: drafting is a call, not a Ray round trip
            self.colocated = Drafting.build(drafting)
            parts, drafters = dict(self.colocated.parts), self.colocated.drafters
        else:
            threads = max(1, int(cluster.cpus_per_draft_worker))
            self.workers = [
                DraftWorker.options(
                    **actor_options(cluster, self.groups[1], i, cluster.cpus_per_draft_worker, cluster.gpus_per_draft_worker)
                ).remote(drafting, threads)
                for i in range(cluster.draft_workers)
            ]
            parts = ray.get(self.workers[0].describe.remote())
            ray.get([worker.ready.remote() for worker in self.workers])
            specs = parts.pop("drafters")
            drafters = DraftPool(self.workers, len(specs)).drafters(specs)
        engine_class = PipelinedEngine if cluster.pipeline else LLMEngine
        llm = engine_class(
            **parts,
            verifier=self.verifier,
            drafters=drafters,
            **scheduling_options(shard_engine),  # the budget for the shards' device
        )
        self.served = AsyncLLMEngine(llm)
        return self.served.tokenizer

    def _resolve_tree(self, engine: EngineConfig) -> EngineConfig:
        """``tree: auto`` measured by the verifier shards on their device; the drafters get the
        chosen tree and SSMs (or plain decoding when speculation would not pay)."""
        sources = ssm_sources(engine.llm, engine.ssms)
        if engine.tree != "auto" or not sources or engine.mode == "incremental":
            return engine
        key = [engine.llm, *sources, f"draft_vocab={engine.draft_vocab}"]
        widths, chosen = self.verifier.tune(key)
        if widths is None:
            return replace(engine, mode="incremental")
        return replace(engine, tree=",".join(map(str, widths)), ssms=[sources[i] for i in chosen])

    async def generate(self, prompt: Prompt, params: SamplingParams | None, chat: bool) -> AsyncIterator[RequestDelta]:
        # aclosing: a cancelled call (the client went away) aborts the request at once.
        async with contextlib.aclosing(self.served.generate(prompt, params, chat)) as deltas:
            async for delta in deltas:
                yield delta

    def encode(self, prompt: Prompt, chat: bool) -> list[int]:
        return self.served.engine.encode(prompt, chat)

    def counters(self) -> Counters:
        return self.served.counters

    def max_model_len(self) -> int:
        return self.served.max_model_len

    def num_waiting(self) -> int:
        return self.served.num_waiting()

    def check_capacity(self, num_seqs: int) -> None:
        self.served.check_capacity(num_seqs)

    def num_running(self) -> int:
        return self.served.num_running()

    def info(self) -> dict[str, Any]:
        engine = self.served.engine
        return {"mode": engine.mode, "spec": engine.spec, "verify": engine.verify,
                "pipeline": isinstance(engine, PipelinedEngine), "colocated_drafters": self.colocated is not None,
                "sampling_defaults": engine.sampling_defaults}

    def llm_tensors(self) -> dict[str, str]:
        """The LLM parameters the co-located drafters made this process hold (name -> device)."""
        return self.colocated.llm_tensors() if self.colocated else {}

    def kv_usage(self) -> float | None:
        return self.served.kv_usage()

    async def reset_prefix_cache(self) -> int:
        # Async: the wait for the engine's loop (a step may be running) leaves this actor's event
        # loop free to stream deltas meanwhile. The shards replay it with their next forward.
        return await self.served.reset_prefix_cache()

    def actors(self) -> dict[str, list[ray.actor.ActorHandle]]:
        """The current verifier shards (rank order) and draft workers (for operators and tests)."""
        return {"shards": list(self.verifier.shards), "draft_workers": list(self.workers)}

    def shutdown(self) -> None:
        self.served.shutdown()
        self.verifier.shutdown()
        for worker in self.workers:
            ray.kill(worker)
        for group in self.groups:
            remove_placement_group(group)


class CoordinatorClient:
    """A Coordinator actor behind AsyncLLMEngine's surface (``generate``, ``counters``,
    ``num_waiting``, ``num_running``, ``tokenizer``, ``max_model_len``, ``sampling_defaults``,
    ``reset_prefix_cache``, ``shutdown``), so the serving layer can use either. Errors arrive as
    the engine raised them (InvalidRequestError, EngineStepError)."""

    def __init__(self, coordinator: ray.actor.ActorHandle) -> None:
        self.coordinator = coordinator
        try:
            self.tokenizer = _call(coordinator.start)
            self.max_model_len: int = _call(coordinator.max_model_len)
            self.sampling_defaults: dict[str, Any] = _call(coordinator.info)["sampling_defaults"]
        except BaseException:
            ray.kill(coordinator)  # and with it the actors and placement groups it made
            raise

    @classmethod
    def from_config(cls, engine: EngineConfig, cluster: ClusterConfig | None = None) -> "CoordinatorClient":
        """Start a Coordinator and its actors (joining or starting Ray first, see placement.connect)."""
        cluster = cluster or ClusterConfig()
        connect(cluster)
        return cls(Coordinator.options(**coordinator_options(cluster)).remote(engine, cluster))

    async def generate(
        self, prompt: Prompt, params: SamplingParams | None = None, chat: bool = False
    ) -> AsyncIterator[RequestDelta]:
        stream = self.coordinator.generate.remote(prompt, params, chat)
        finished = False
        try:
            async for ref in stream:
                delta = await ref
                finished = delta.finished
                yield delta
        except RayTaskError as err:
            raise _cause(err) from None
        finally:
            if not finished:  # the caller went away: abort the request on the coordinator
                ray.cancel(stream)

    def complete(self, prompt: Prompt, params: SamplingParams | None = None, chat: bool = False) -> RequestOutput:
        """Run one request to the end, like ``LLMEngine.generate`` for a single prompt."""
        ids = _call(self.coordinator.encode, prompt, chat)

        async def collect() -> list[RequestDelta]:
            return [delta async for delta in self.generate(ids, params)]

        deltas = asyncio.run(collect())
        last = deltas[-1]
        tokens = [t for delta in deltas for t in delta.token_ids]
        return RequestOutput(last.request_id, ids, "".join(d.text for d in deltas), tokens, last.finish_reason, last.stats)

    @property
    def counters(self) -> Counters:
        return _call(self.coordinator.counters)

    def num_waiting(self) -> int:
        return _call(self.coordinator.num_waiting)

    def check_capacity(self, num_seqs: int) -> None:
        """Raises the engine's own error (EngineOverloadedError, InvalidRequestError) if not."""
        _call(self.coordinator.check_capacity, num_seqs)

    def num_running(self) -> int:
        return _call(self.coordinator.num_running)

    def kv_usage(self) -> float | None:
        """Fraction of the verifier's KV pool in use (None without a pool)."""
        return _call(self.coordinator.kv_usage)

    async def reset_prefix_cache(self) -> int:
        """Forget every cached prefix, between two of the engine's steps; how many LLM blocks were published."""
        try:
            return await self.coordinator.reset_prefix_cache.remote()
        except RayTaskError as err:
            raise _cause(err) from None

    def info(self) -> dict[str, Any]:
        """The engine's mode, tree spec, sampled-request verifier, pipelining and co-location flags, and
        sampling defaults."""
        return _call(self.coordinator.info)

    def actors(self) -> dict[str, list[ray.actor.ActorHandle]]:
        return _call(self.coordinator.actors)

    def shutdown(self) -> None:
        _call(self.coordinator.shutdown)
        ray.kill(self.coordinator)


def _call(method: Any, *args: Any) -> Any:
    try:
        return ray.get(method.remote(*args))
    except RayTaskError as err:
        raise _cause(err) from None


def _cause(err: RayTaskError) -> BaseException:
    """The exception the engine raised, through however many actors it crossed."""
    while isinstance(err, RayTaskError) and err.cause is not None:
        err = err.cause
    return err
