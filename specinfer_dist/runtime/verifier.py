"""The LLM side of a step: one forward over every request's new tokens, then commits.

``LocalVerifier`` keeps the LLM and the per-request KV caches in this process. A group of
tensor-parallel shards offers the same calls, so the engine does not care where the
LLM runs; it only tracks how many of each request's tokens are cached (``Sequence.num_cached``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from specinfer_dist.models.transformer import Transformer
from specinfer_dist.runtime.block_pool import BlockPool, KVCapacity
from specinfer_dist.runtime.kv_cache import KVCacheBase, PagedKVCache
from specinfer_dist.runtime.model_runner import ModelRunner, RunItem


@dataclass
class VerifyItem:
    """New tokens of one request: what is committed but uncached, then its token tree."""

    request_id: int
    tokens: list[int]
    parents: list[int]  # over these tokens; -1 = child of the cached prefix
    logit_rows: list[int]


class Verifier(Protocol):
    # The KV pool every shard holds (None: caches grow unbounded); the scheduler admits by it.
    kv_capacity: KVCapacity | None

    def forward(self, items: list[VerifyItem]) -> list[torch.Tensor]: ...

    def commit(self, request_id: int, keep: list[int]) -> None: ...

    def release(self, request_id: int) -> None: ...


class LocalVerifier:
    """``kv_capacity`` None keeps each request's cache in its own growing tensor; otherwise
    all caches share one preallocated block pool of that size."""

    def __init__(self, model: Transformer, kv_capacity: KVCapacity | None = None) -> None:
        self.runner = ModelRunner(model)
        self.kv_capacity = kv_capacity
        self.pool = None if kv_capacity is None else BlockPool(
            kv_capacity, model.num_layers, model.num_kv_heads, model.head_dim, self.runner.dtype, self.runner.device
        )
        self.caches: dict[int, KVCacheBase] = {}

    def forward(self, items: list[VerifyItem]) -> list[torch.Tensor]:
        """Logits for each item's ``logit_rows``; the items' tokens stay pending in the caches."""
        return self.runner.forward(self._run_items(items))

    def forward_hidden(self, items: list[VerifyItem], aux_layers: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``forward`` that also returns every item row's hidden states entering ``aux_layers``
        (feature drafters read them; the same forward, no extra LLM pass)."""
        return self.runner.forward_hidden(self._run_items(items), aux_layers)

    def _run_items(self, items: list[VerifyItem]) -> list[RunItem]:
        run = []
        for item in items:
            if item.request_id not in self.caches:
                self.caches[item.request_id] = self._new_cache()
            run.append(RunItem(self.caches[item.request_id], item.tokens, item.parents, item.logit_rows))
        return run

    def _new_cache(self) -> KVCacheBase:
        return self.runner.new_cache() if self.pool is None else PagedKVCache(self.pool)

    def commit(self, request_id: int, keep: list[int]) -> None:
        """Keep these pending rows (the uncached prefix and the accepted path); drop the rest."""
        self.caches[request_id].commit(keep)

    def release(self, request_id: int) -> None:
        cache = self.caches.pop(request_id, None)
        if cache is not None:
            cache.free()

    def kv_usage(self) -> float | None:
        """Fraction of the pool's blocks in use (None without a pool: nothing to fill)."""
        return None if self.pool is None else self.pool.num_used / self.pool.capacity.num_blocks
