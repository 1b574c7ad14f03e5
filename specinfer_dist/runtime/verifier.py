"""The LLM side of a step: one forward over every request's new tokens, then commits.

``LocalVerifier`` keeps the LLM and the per-request KV caches (``KVBlocks``: blocks of one
pool) in this process. A group of tensor-parallel shards offers the same calls, so the engine
does not care where the LLM runs; it only tracks how many of each request's tokens are cached
(``Sequence.num_cached``) and asks ``blocks`` what is free and what a prefix would reuse.

Block operations are deterministic: the same attaches, commits, releases and reserves in the
same order give the same block tables. The Ray runtime relies on it: the coordinator keeps a
``KVBlocks`` over a pool with no storage, decides prefix reuse and admission on it, and every
shard replays the same operations on its own pool (distributed/verifier_shard.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from specinfer_dist.config import DEFAULT_BLOCK_SIZE
from specinfer_dist.models.transformer import Transformer
from specinfer_dist.runtime.block_pool import DEFAULT_GPU_MEMORY_UTILIZATION, BlockPool, KVCapacity, auto_capacity
from specinfer_dist.runtime.kv_cache import PagedKVCache
from specinfer_dist.runtime.model_runner import ModelRunner, RunItem
from specinfer_dist.runtime.step_graphs import graph_memory


@dataclass
class VerifyItem:
    """New tokens of one request: what is committed but uncached, then its token tree."""

    request_id: int
    tokens: list[int]
    parents: list[int]  # over these tokens; -1 = child of the cached prefix
    logit_rows: list[int]


class KVBlocks:
    """Every request's LLM cache, in blocks of one pool: what a step reserves in, what the
    scheduler admits by (``free_blocks``, ``held_blocks``, ``reusable``) and where prefixes are
    reused (``attach``)."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.caches: dict[int, PagedKVCache] = {}

    def run_items(self, items: list[VerifyItem]) -> list[RunItem]:
        """The items over their requests' caches (new requests get an empty one)."""
        run = []
        for item in items:
            if item.request_id not in self.caches:
                self.caches[item.request_id] = PagedKVCache(self.pool)
            run.append(RunItem(self.caches[item.request_id], item.tokens, item.parents, item.logit_rows))
        return run

    def attach(self, request_id: int, tokens: list[int]) -> int:
        """Start a request's cache, or let one whose rows are all in whole published blocks take
        more, on the published blocks of the longest prefix of ``tokens`` (pass only the tokens
        it may skip: not the one whose logits it needs); returns its cached length in tokens."""
        if request_id not in self.caches:
            self.caches[request_id] = PagedKVCache(self.pool)
        cache = self.caches[request_id]
        return cache.attach(tokens) if self.pool.prefix_caching else cache.length

    def reusable(self, tokens: list[int]) -> tuple[int, int]:
        """What ``attach(tokens)`` would take: (blocks, of which nobody holds now)."""
        return PagedKVCache(self.pool).reusable(tokens) if self.pool.prefix_caching else (0, 0)

    def commit(self, request_id: int, keep: list[int]) -> None:
        """Keep these pending rows (the uncached prefix and the accepted path); drop the rest."""
        self.caches[request_id].commit(keep)

    def release(self, request_id: int) -> None:
        cache = self.caches.pop(request_id, None)
        if cache is not None:
            cache.free()

    def free_blocks(self) -> int:
        return self.pool.num_free

    def held_blocks(self, request_id: int) -> int:
        cache = self.caches.get(request_id)
        return len(cache.blocks) if cache is not None else 0

    def reset_prefix_cache(self) -> int:
        return self.pool.reset_prefix_cache()

    def usage(self) -> float:
        """Fraction of the pool's blocks in use."""
        return self.pool.num_used / self.pool.capacity.num_blocks

    def tables(self, items: list[VerifyItem]) -> int:
        """A fingerprint of the items' block tables (shards check they follow the coordinator's)."""
        return hash(tuple(tuple(self.caches[item.request_id].blocks) for item in items))


class Verifier(Protocol):
    # The KV pool every shard holds; the scheduler admits by it.
    kv_capacity: KVCapacity
    # Every request's cache as the scheduler sees it (KVBlocks).
    blocks: KVBlocks

    def logits(self, items: list[VerifyItem]) -> torch.Tensor: ...

    def commit(self, request_id: int, keep: list[int]) -> None: ...

    def release(self, request_id: int) -> None: ...

    def attach(self, request_id: int, tokens: list[int]) -> int: ...


def pool_capacity(
    model: Transformer,
    kv_blocks: int | None = None,
    kv_block_size: int = DEFAULT_BLOCK_SIZE,
    max_num_seqs: int = 16,
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
    enforce_eager: bool = False,
) -> KVCapacity:
    """The LLM's KV pool (the one sizing policy, also for each TP shard): ``kv_blocks`` blocks,
    or (None) as many as memory allows (runtime/block_pool.py: auto_capacity) once the CUDA
    graphs' memory is set aside (unless ``enforce_eager``), capped by what ``max_num_seqs``
    requests at the model's full context need. Call it after loading the weights."""
    if kv_blocks is not None:
        return KVCapacity(kv_blocks, kv_block_size)
    param = next(model.parameters())
    graphs = param.device.type == "cuda" and not enforce_eager
    return auto_capacity(
        model.num_layers, model.num_kv_heads, model.head_dim, param.dtype, param.device, kv_block_size,
        max_num_seqs * model.max_positions, gpu_memory_utilization,
        reserved=graph_memory(model, max_num_seqs, kv_block_size) if graphs else 0,
    )


class LocalVerifier:
    """All caches share one preallocated block pool, sized by ``pool_capacity``. Steps replay
    CUDA graphs on a GPU unless ``enforce_eager``; ``static_steps`` runs their bucketed path
    without capture on any device (runtime/step_graphs.py). ``prefix_caching``: requests reuse
    the published blocks of prefixes computed before (runtime/block_pool.py)."""

    def __init__(
        self,
        model: Transformer,
        kv_blocks: int | None = None,
        kv_block_size: int = DEFAULT_BLOCK_SIZE,
        max_num_seqs: int = 16,
        gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
        enforce_eager: bool = False,
        static_steps: bool = False,
        prefix_caching: bool = False,
    ) -> None:
        capacity = pool_capacity(model, kv_blocks, kv_block_size, max_num_seqs, gpu_memory_utilization, enforce_eager)
        self.runner = ModelRunner(model, capacity, enforce_eager=enforce_eager, static_steps=static_steps,
                                  prefix_caching=prefix_caching)
        self.pool = self.runner.pool
        self.kv_capacity = capacity
        self.blocks = KVBlocks(self.pool)

    def logits(self, items: list[VerifyItem]) -> torch.Tensor:
        """All items' logit rows, one after the other, on the LLM's device; the items' tokens stay
        pending in the caches."""
        return self.runner.run(self.blocks.run_items(items))

    def logits_hidden(self, items: list[VerifyItem], aux_layers: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``logits`` plus every item row's hidden states entering ``aux_layers``, per item and on
        the device (feature drafters read them; the same forward, no extra LLM pass)."""
        logits, aux = self.runner.run(self.blocks.run_items(items), aux_layers)
        return logits, list(aux.split([len(item.tokens) for item in items]))

    @property
    def caches(self) -> dict[int, PagedKVCache]:
        return self.blocks.caches

    def attach(self, request_id: int, tokens: list[int]) -> int:
        return self.blocks.attach(request_id, tokens)

    def commit(self, request_id: int, keep: list[int]) -> None:
        self.blocks.commit(request_id, keep)

    def release(self, request_id: int) -> None:
        self.blocks.release(request_id)

    def reset_prefix_cache(self) -> int:
        return self.blocks.reset_prefix_cache()

    def kv_usage(self) -> float:
        """Fraction of the pool's blocks in use."""
        return self.blocks.usage()
