"""Runs one model over many requests' new tokens in a single flattened forward.

The runner owns the KV pool and turns each request's cache and token parents into one
``AttentionMetadata`` for the step (runtime/step_layout.py, models/attention.py); the model
sees no caches. All integer inputs of a step go to the device in one copy from one reusable
(pinned, on CUDA) host buffer; no Python runs per layer. On CUDA, steps that fit a bucket
replay a captured graph instead of launching the model's kernels one by one
(runtime/step_graphs.py).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from specinfer_dist.models.attention import AttentionMetadata
from specinfer_dist.models.eagle3 import Eagle3Head
from specinfer_dist.models.transformer import Transformer
from specinfer_dist.runtime.block_pool import BlockPool, KVCapacity
from specinfer_dist.runtime.kv_cache import PagedKVCache
from specinfer_dist.runtime.step_graphs import StepGraphs
from specinfer_dist.runtime.step_layout import RunItem, StepLayout, chain_parents

__all__ = ["GROWABLE_START_BLOCKS", "ModelRunner", "RunItem", "chain_parents"]

GROWABLE_START_BLOCKS = 64  # first size of a runner's own (growable) pool


class ModelRunner:
    """Runs an LLM or SSM (``run``/``forward``), or gives an EAGLE-3 head its step (``prepare``).
    ``kv_capacity`` None: the runner's pool grows on demand (drafters, tools); otherwise it is
    fixed and the caller admits requests by it. A fixed pool on CUDA also gets step graphs
    (runtime/step_graphs.py) unless ``enforce_eager``; ``static_steps`` runs the same bucketed
    static-buffer path without capture on any device (how CPU tests check it). With
    ``prefix_caching`` its caches share published prefix blocks (runtime/block_pool.py)."""

    def __init__(
        self, model: Transformer | Eagle3Head, kv_capacity: KVCapacity | None = None, enforce_eager: bool = False,
        static_steps: bool = False, prefix_caching: bool = False,
    ) -> None:
        self.model = model.fuse_projections()  # one matmul for q/k/v and for gate/up (same parameters)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        capture = self.device.type == "cuda" and not enforce_eager and kv_capacity is not None
        graphs = capture or static_steps
        capacity = kv_capacity or KVCapacity(GROWABLE_START_BLOCKS)
        if graphs:  # one block more, never handed to a request: padded rows of a bucket write there
            capacity = KVCapacity(capacity.num_blocks + 1, capacity.block_size)
        self.pool = BlockPool(
            capacity, model.num_layers, model.num_kv_heads, model.head_dim,
            self.dtype, self.device, growable=kv_capacity is None, prefix_caching=prefix_caching,
        )
        self.graphs = StepGraphs(model, self.pool, capture) if graphs else None
        self._host = torch.empty(0, dtype=torch.long)
        self._copied: torch.cuda.Event | None = None  # the last host->device copy of _host

    def new_cache(self, seed: bytes = b"") -> PagedKVCache:
        return PagedKVCache(self.pool, seed)

    def forward(self, items: list[RunItem]) -> list[torch.Tensor]:
        """Logits [len(item.logit_rows), vocab] for every item, fp32 on the host (drafters, tools)."""
        return list(self.run(items).float().cpu().split([len(item.logit_rows) for item in items]))

    @torch.inference_mode()
    def run(self, items: list[RunItem], aux_layers: Sequence[int] = ()) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [sum of len(item.logit_rows), vocab] of one forward, on the model's device; with
        ``aux_layers`` also every row's hidden states entering them, [sum of len(item.tokens), k * hidden]
        (a feature drafter's input: the same forward, no extra pass)."""
        for item in items:
            item.cache.reserve(item.tokens)
        shape = self.graphs.bucket(items, tuple(aux_layers)) if self.graphs is not None else None
        if shape is not None:
            return self.graphs.run(items, shape, tuple(aux_layers), self._to_device)
        (ids, positions, logit_rows), meta = self._prepare(items)
        kv = self.pool.kv  # read after reserving: a growable pool may have grown
        return self.model(ids, positions, meta, kv, logit_rows, aux_layers=aux_layers)

    def prepare(self, items: list[RunItem]) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], AttentionMetadata]:
        """Reserve the items' rows and build the step's inputs: (ids, positions, logit rows) and metadata."""
        for item in items:
            item.cache.reserve(item.tokens)
        return self._prepare(items)

    def _prepare(self, items: list[RunItem]) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], AttentionMetadata]:
        layout = StepLayout.of(items, self.pool.block_size)
        step = layout.unpack(self._to_device(layout.flat))
        return (step.ids, step.positions, step.logit_rows), step.meta

    def _to_device(self, values: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """One copy of the step's integers to the device (into ``out`` if given), through a
        reused host buffer."""
        if self.device.type != "cuda":
            src = torch.from_numpy(values).to(self.device)  # no copy on a CPU
            return src if out is None else out[: len(values)].copy_(src)
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy must be done before we overwrite
        if self._host.numel() < len(values):
            self._host = torch.empty(max(len(values), 2 * self._host.numel()), dtype=torch.long, pin_memory=True)
        host = self._host[: len(values)]
        host.numpy()[:] = values
        if out is None:
            out = host.to(self.device, non_blocking=True)
        else:
            out[: len(values)].copy_(host, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return out
