"""The LLM as a group of tensor-parallel Ray actors, and the engine's Verifier over them.

Each ``VerifierShard`` loads the LLM, keeps its tensor-parallel shard (tp.py), joins a
``torch.distributed`` group with the other ranks (NCCL on GPU, gloo on CPU) and holds its
share of every request's KV cache in a ``LocalVerifier``, the same class the single-process
engine uses. ``ShardGroupVerifier`` sends each forward to all ranks at once (the same
request-sized inputs; the ranks exchange activations among themselves) and returns rank 0's
logits. Commits and releases queue up and ride along with the next forward: one round trip
per step. Weights never pass through the coordinator: every shard loads from its own disk.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta

import ray
import torch
import torch.distributed as dist
from ray.exceptions import RayError
from ray.util.placement_group import PlacementGroup

from specinfer_dist.config import ClusterConfig, EngineConfig
from specinfer_dist.distributed.placement import actor_options
from specinfer_dist.distributed.tp import shard_model
from specinfer_dist.models.loader import load_model
from specinfer_dist.runtime.block_pool import KVCapacity
from specinfer_dist.runtime.verifier import LocalVerifier, VerifyItem


class ShardGroupError(RuntimeError):
    """A verifier shard died, failed or hung: the step's requests end; a new group serves later ones."""


@dataclass
class ShardSpec:
    """What every rank needs to build itself (small and picklable)."""

    llm: str
    dtype: str
    world_size: int
    kv_blocks: int | None  # None: each shard sizes its pool from its memory; the group uses the smallest
    kv_block_size: int
    max_num_seqs: int
    gpu_memory_utilization: float
    threads: int
    timeout_s: float


@ray.remote
class VerifierShard:
    def __init__(self, spec: ShardSpec, rank: int) -> None:
        torch.set_num_threads(spec.threads)
        self.spec, self.rank = spec, rank
        self.verifier: LocalVerifier | None = None

    def rendezvous(self) -> str:
        """Rank 0: where the process group meets (this node's IP and a free port)."""
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def join(self, init_method: str | None) -> KVCapacity:
        """Load the LLM, join the group (every rank must be called at once), keep this rank's
        shard; returns the KV pool it could allocate."""
        model, _, _ = load_model(self.spec.llm, dtype=self.spec.dtype, progress=False)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.spec.world_size > 1:
            dist.init_process_group(
                "nccl" if device.type == "cuda" else "gloo", init_method=init_method, rank=self.rank,
                world_size=self.spec.world_size, timeout=timedelta(seconds=self.spec.timeout_s),
            )
            shard_model(model, self.rank, self.spec.world_size)
        spec = self.spec
        self.verifier = LocalVerifier(
            model.to(device), spec.kv_blocks, spec.kv_block_size, spec.max_num_seqs, spec.gpu_memory_utilization
        )
        return self.verifier.kv_capacity

    def step(
        self, commits: list[tuple[int, list[int]]], releases: list[int], items: list[VerifyItem]
    ) -> list[torch.Tensor] | None:
        """Apply the queued commits and releases, then one forward; rank 0 returns the logits."""
        for request_id, keep in commits:
            self.verifier.commit(request_id, keep)
        for request_id in releases:
            self.verifier.release(request_id)
        logits = self.verifier.forward(items)
        # Copies: each request's logits are a view of one batch tensor, and pickling a view ships all of it.
        return [x.to("cpu", copy=True) for x in logits] if self.rank == 0 else None


class ShardGroupVerifier:
    """The Verifier protocol over ``cluster.tp`` VerifierShards in placement group ``pg``.

    If a shard dies, fails or hangs, ``forward`` kills the whole group (a survivor may be stuck
    in a collective) and raises ShardGroupError, so the requests in that step end with an error
    (AsyncLLMEngine reports it) instead of hanging; the next forward builds a fresh group.
    """

    def __init__(self, engine: EngineConfig, cluster: ClusterConfig, pg: PlacementGroup) -> None:
        self.spec = ShardSpec(
            engine.llm, engine.dtype, cluster.tp, engine.kv_blocks, engine.kv_block_size, engine.max_num_seqs,
            engine.gpu_memory_utilization, max(1, int(cluster.cpus_per_shard)), cluster.step_timeout_s,
        )
        self.cluster, self.pg = cluster, pg
        self.kv_capacity: KVCapacity | None = None  # known once the shards have allocated their pools
        self.shards: list[ray.actor.ActorHandle] = []
        self._commits: list[tuple[int, list[int]]] = []
        self._releases: list[int] = []
        self.build()

    def build(self) -> None:
        """Start the ranks (they load in parallel) and form their process group. On failure the
        caller kills ``self.shards``, freeing the placement group's bundles for the next try."""
        cluster = self.cluster
        self.shards = [
            VerifierShard.options(**actor_options(cluster, self.pg, rank, cluster.cpus_per_shard, cluster.gpus_per_shard))
            .remote(self.spec, rank)
            for rank in range(self.spec.world_size)
        ]
        timeout = self.spec.timeout_s
        init_method = ray.get(self.shards[0].rendezvous.remote(), timeout=timeout) if len(self.shards) > 1 else None
        capacities = ray.get([shard.join.remote(init_method) for shard in self.shards], timeout=timeout)
        # Every shard holds at least this many blocks, so admitting by it holds for all of them.
        smallest = min(capacities, key=lambda cap: cap.num_blocks)
        if self.kv_capacity is None:
            self.kv_capacity = smallest
        elif smallest.num_blocks < self.kv_capacity.num_blocks:  # the scheduler admits by the first group's
            raise ShardGroupError(
                f"rebuilt shards hold {smallest.num_blocks} KV blocks, fewer than the {self.kv_capacity.num_blocks} "
                "the scheduler admits by"
            )

    def forward(self, items: list[VerifyItem]) -> list[torch.Tensor]:
        try:
            if not self.shards:  # the last group failed (or its rebuild did)
                self.build()
            refs = [shard.step.remote(self._commits, self._releases, items) for shard in self.shards]
            self._commits, self._releases = [], []
            # Raises as soon as any rank fails, not after the slowest (a survivor may be stuck in a collective).
            return ray.get(refs, timeout=self.spec.timeout_s)[0]
        except RayError as err:  # includes GetTimeoutError
            self.shutdown()
            self._commits, self._releases = [], []  # their caches are gone with the group
            reason = (str(err).strip().splitlines() or [""])[0]
            raise ShardGroupError(f"verifier shard group failed ({type(err).__name__}: {reason}); rebuilding it") from err

    def logits(self, items: list[VerifyItem]) -> torch.Tensor:
        """All items' logit rows, one after the other (on this host: rank 0 sends them)."""
        return torch.cat(self.forward(items))

    def commit(self, request_id: int, keep: list[int]) -> None:
        self._commits.append((request_id, keep))

    def release(self, request_id: int) -> None:
        self._releases.append(request_id)

    def shutdown(self) -> None:
        for shard in self.shards:
            ray.kill(shard)
        self.shards = []

