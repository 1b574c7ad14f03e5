"""The LLM as a group of tensor-parallel Ray actors, and the engine's Verifier over them.

Each ``VerifierShard`` loads the LLM, keeps its tensor-parallel shard (tp.py), joins a
``torch.distributed`` group with the other ranks (NCCL on GPU, gloo on CPU) and holds its
share of every request's KV cache in a ``LocalVerifier``, the same class the single-process
engine uses. ``ShardGroupVerifier`` sends each forward to all ranks at once (the same
request-sized inputs; the ranks exchange activations among themselves) and returns rank 0's
logits. The coordinator decides every block operation on its own ``KVBlocks`` (a pool with no
storage): admission, prefix reuse, commits, releases. The operations queue up in order and ride
along with the next forward (one round trip per step); every shard replays them in that order on
its own pool, so all hold the coordinator's block tables, each with its slice of every block.
Rank 0 returns a fingerprint of the step's tables and a mismatch fails the group. Weights never pass through the coordinator: every shard reads only its own slices
(tp.py) from its own disk, straight onto its device.

``--tree auto`` is measured here, on the verifier's own device (``tune``): every rank runs
the same calibration in lockstep (the LLM's forwards are collectives), rank 0's choice is
used, and it is cached per device name and tensor-parallel size. Draft workers never run the LLM.

``submit`` returns the ranks' object refs at once and ``collect`` waits for them, so the
coordinator can keep a forward in flight while it works (pipeline.py).

Feature drafters (EAGLE-3 heads) run in the coordinator (coordinator.py) and read the hidden
states of the very forward that verifies: asked for ``aux_layers``, rank 0 returns every row's
residual stream entering those layers with the logits (one CPU tensor in the LLM's dtype). On a
tensor-parallel shard that stream is whole, not sliced: the embedding is replicated and every
row-parallel projection all-reduces before it is added (tp.py). No extra LLM pass, no extra hop.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import ray
import torch
import torch.distributed as dist
from ray.exceptions import RayError
from ray.util.placement_group import PlacementGroup

from specinfer_dist.config import ClusterConfig, EngineConfig
from specinfer_dist.distributed.placement import actor_options
from specinfer_dist.distributed.tp import TensorParallel
from specinfer_dist.engine.builder import load_ssms, load_target
from specinfer_dist.models.loader import load_model
from specinfer_dist.runtime.device import default_dtype, resolve_device
from specinfer_dist.runtime.block_pool import BlockPool, KVCapacity
from specinfer_dist.runtime.verifier import KVBlocks, LocalVerifier, VerifyItem, pool_capacity
from specinfer_dist.tuning.budget import budget_seconds
from specinfer_dist.tuning.tune import auto_tree


class ShardGroupError(RuntimeError):
    """A verifier shard died, failed or hung: the step's requests end; a new group serves later ones."""


@dataclass
class ShardSpec:
    """What every rank needs to build itself (small and picklable)."""

    engine: EngineConfig  # llm, dtype, device (cpu | cuda, from the placement), KV pool options
    world_size: int
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
        """Join the group (every rank must be called at once), load this rank's shard, and say
        how big a KV pool fits here (runtime/verifier.py: pool_capacity); ``allocate`` then makes
        the pool."""
        engine = self.spec.engine
        device = resolve_device(engine.device)  # Ray made this rank's GPU the only one visible
        if self.spec.world_size > 1:
            dist.init_process_group(
                "nccl" if device.type == "cuda" else "gloo", init_method=init_method, rank=self.rank,
                world_size=self.spec.world_size, timeout=timedelta(seconds=self.spec.timeout_s),
            )
        # Only this rank's slices are read, in the target dtype, straight onto its device.
        sharding = TensorParallel(self.rank, self.spec.world_size)
        dtype = engine.dtype or default_dtype(device)
        self.model = load_model(engine.llm, dtype=dtype, device=device, progress=False, sharding=sharding)[0]
        return pool_capacity(
            self.model, engine.kv_blocks, engine.kv_block_size, engine.max_num_seqs, engine.gpu_memory_utilization,
            engine.enforce_eager,
        )

    def allocate(self, capacity: KVCapacity) -> None:
        engine = self.spec.engine
        self.verifier = LocalVerifier(self.model, capacity.num_blocks, capacity.block_size,
                                      enforce_eager=engine.enforce_eager, prefix_caching=engine.enable_prefix_caching)

    def tune(self, key: list[str]) -> tuple[list[int] | None, list[int]]:
        """``tree: auto`` measured on this rank's device (every rank at once): the tree widths
        (None: don't speculate) and the chosen SSMs' indices. The SSMs are loaded for the
        measurement only, sharing tensors with an unsharded LLM that reads just those."""
        engine = self.spec.engine
        lender = load_target(engine, weights=False)
        ssms = load_ssms(engine, lender)
        seconds = budget_seconds(engine.tuning_budget_s, self.verifier.runner.device)  # the shards race nothing
        spec, chosen = auto_tree(self.model, lender.tokenizer, ssms, [*key, f"tp={self.spec.world_size}"],
                                 engine.tree_budget, seconds=seconds)
        del ssms, lender
        if self.verifier.runner.device.type == "cuda":
            torch.cuda.empty_cache()
        return (list(spec.widths) if spec else None), chosen

    def step(
        self, ops: list[tuple[Any, ...]], items: list[VerifyItem], aux_layers: Sequence[int] = (),
    ) -> tuple[torch.Tensor, torch.Tensor | None, int] | None:
        """Replay the coordinator's block operations (``(method, *args)`` of ``LocalVerifier``:
        attach, commit, release, reset_prefix_cache), in order, then one forward; rank 0 returns
        all items' logit rows (one tensor, as ``LocalVerifier.logits``), with ``aux_layers`` every
        item row's hidden states entering them (one tensor, items one after another; else None),
        and the fingerprint of the items' block tables."""
        for method, *args in ops:
            getattr(self.verifier, method)(*args)
        if self.rank:  # only rank 0's outputs are used: the others skip gathering hidden states
            self.verifier.logits(items)
            return None
        hidden = None
        if aux_layers:
            logits, per_item = self.verifier.logits_hidden(items, list(aux_layers))
            hidden = torch.cat(per_item).to("cpu")  # one tensor of its own: pickled views would each ship the base
        else:
            logits = self.verifier.logits(items)
        # A copy: pickling a view ships its base.
        return logits.to("cpu", copy=True), hidden, self.verifier.blocks.tables(items)


@dataclass
class Submitted:
    """A forward in flight: the ranks' object refs and, when hidden states were asked for,
    each item's row count (to split rank 0's one tensor by)."""

    refs: list[ray.ObjectRef]
    rows: list[int] | None
    tables: int  # fingerprint of the items' block tables on the coordinator


class ShardGroupVerifier:
    """The Verifier protocol over ``cluster.tp`` VerifierShards in placement group ``pg``, with
    ``logits_hidden`` for feature drafters (as ``LocalVerifier``'s, on this host).

    If a shard dies, fails or hangs, ``forward`` kills the whole group (a survivor may be stuck
    in a collective) and raises ShardGroupError, so the requests in that step end with an error
    (AsyncLLMEngine reports it) instead of hanging; the next forward builds a fresh group.
    """

    def __init__(self, engine: EngineConfig, cluster: ClusterConfig, pg: PlacementGroup) -> None:
        self.spec = ShardSpec(engine, cluster.tp, max(1, int(cluster.cpus_per_shard)), cluster.step_timeout_s)
        self.cluster, self.pg = cluster, pg
        self.kv_capacity: KVCapacity | None = None  # known once the shards have allocated their pools
        self.shards: list[ray.actor.ActorHandle] = []
        self._ops: list[tuple[Any, ...]] = []  # block operations the shards have not replayed yet
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
        fits = ray.get([shard.join.remote(init_method) for shard in self.shards], timeout=timeout)
        # Every shard holds at least this many blocks, so admitting by it holds for all of them.
        smallest = min(fits, key=lambda cap: cap.num_blocks)
        if self.kv_capacity is None:
            self.kv_capacity = smallest
        elif smallest.num_blocks < self.kv_capacity.num_blocks:  # the scheduler admits by the first group's
            raise ShardGroupError(
                f"rebuilt shards hold {smallest.num_blocks} KV blocks, fewer than the {self.kv_capacity.num_blocks} "
                "the scheduler admits by"
            )
        # Every rank, and every rebuilt group, allocates the first group's pool size.
        ray.get([shard.allocate.remote(self.kv_capacity) for shard in self.shards], timeout=timeout)
        self._ops = []
        self.blocks = KVBlocks(BlockPool(self.kv_capacity, 1, 1, 1, torch.float32, "meta",
                                         prefix_caching=self.spec.engine.enable_prefix_caching))

    def logits(self, items: list[VerifyItem]) -> torch.Tensor:
        """All items' logit rows, one after the other (on this host: rank 0 sends them)."""
        return self.collect(self.submit(items))[0]

    def logits_hidden(
        self, items: list[VerifyItem], aux_layers: Sequence[int]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``logits`` plus every item row's hidden states entering ``aux_layers``, per item (as
        ``LocalVerifier.logits_hidden``, but on this host): the same forward, no extra LLM pass."""
        return self.collect(self.submit(items, aux_layers))

    def submit(self, items: list[VerifyItem], aux_layers: Sequence[int] = ()) -> Submitted:
        """Send one forward (with the queued commits and releases) to every rank; returns at once.
        With ``aux_layers``, ``collect`` also returns the rows' hidden states entering them."""
        with self._failing():
            if not self.shards:  # the last group failed (or its rebuild did)
                self.build()
            aux = list(aux_layers)
            for item in self.blocks.run_items(items):  # as the shards' runners will reserve them
                item.cache.reserve(item.tokens)
            refs = [shard.step.remote(self._ops, items, aux) for shard in self.shards]
            self._ops = []
            return Submitted(refs, [len(item.tokens) for item in items] if aux else None, self.blocks.tables(items))

    def collect(self, submitted: Submitted) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Rank 0's results of a submitted forward: all its items' logit rows, one after the other,
        and (if asked for) each item's hidden states [len(item.tokens), k * hidden], else None."""
        with self._failing():
            # Raises as soon as any rank fails, not after the slowest (a survivor may be stuck in a collective).
            logits, hidden, tables = ray.get(submitted.refs, timeout=self.spec.timeout_s)[0]
        if tables != submitted.tables:
            self.shutdown()
            raise ShardGroupError("verifier shards hold other block tables than the coordinator's; rebuilding them")
        return logits, None if hidden is None else list(hidden.split(submitted.rows))

    def kv_usage(self) -> float:
        """Fraction of the KV pool's blocks in use (the coordinator's tables, which the shards follow)."""
        return self.blocks.usage()

    def tune(self, key: list[str]) -> tuple[list[int] | None, list[int]]:
        """VerifierShard.tune on every rank at once; rank 0's answer."""
        with self._failing():
            refs = [shard.tune.remote(key) for shard in self.shards]
            return ray.get(refs)[0]  # no step timeout: the first measurement may take minutes

    @contextlib.contextmanager
    def _failing(self) -> Iterator[None]:
        try:
            yield
        except RayError as err:  # includes GetTimeoutError
            self.shutdown()  # the caches go with the group; the next build starts empty tables
            reason = (str(err).strip().splitlines() or [""])[0]
            raise ShardGroupError(f"verifier shard group failed ({type(err).__name__}: {reason}); rebuilding it") from err

    def attach(self, request_id: int, tokens: list[int]) -> int:
        cache = self.blocks.caches.get(request_id)
        before = cache.length if cache is not None else 0
        length = self.blocks.attach(request_id, tokens)
        if length != before:  # else a no-op the shards need not replay (a cache appears at its first forward)
            self._ops.append(("attach", request_id, tokens[:length]))
        return length

    def commit(self, request_id: int, keep: list[int]) -> None:
        self._ops.append(("commit", request_id, keep))
        self.blocks.commit(request_id, keep)

    def release(self, request_id: int) -> None:
        self._ops.append(("release", request_id))
        self.blocks.release(request_id)

    def reset_prefix_cache(self) -> int:
        self._ops.append(("reset_prefix_cache",))
        return self.blocks.reset_prefix_cache()

    def shutdown(self) -> None:
        for shard in self.shards:
            ray.kill(shard)
        self.shards = []

