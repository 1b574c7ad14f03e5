"""Runs one model over many requests' new tokens in a single flattened forward.

The runner owns the KV pool and turns each request's cache and token parents into one
``AttentionMetadata`` for the step (models/attention.py); the model sees no caches.

How a request's pending rows are described: the longest prefix of them that is a causal
chain (each row the child of the previous, the first a child of the committed prefix) plus a
token tree after it. A tree's layout (ancestor mask, depths, where it hangs off the chain)
depends only on its parents, so it is computed once per shape and cached. All integer inputs
of a step go to the device in one copy from one reusable (pinned, on CUDA) host buffer; no
Python runs per layer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from specinfer_dist.models.attention import AttentionMetadata
from specinfer_dist.models.eagle3 import Eagle3Head
from specinfer_dist.models.transformer import Transformer
from specinfer_dist.runtime.block_pool import BlockPool, KVCapacity
from specinfer_dist.runtime.kv_cache import PagedKVCache
from specinfer_dist.tree.token_tree import ancestor_mask

GROWABLE_START_BLOCKS = 64  # first size of a runner's own (growable) pool


@dataclass
class RunItem:
    """New tokens for one request.

    ``parents`` covers every pending row of the cache in this step (earlier forwards'
    rows first, then this forward's ``tokens``); -1 means "child of the committed prefix".
    ``logit_rows`` picks which of this forward's rows need logits.
    """

    cache: PagedKVCache
    tokens: list[int]
    parents: list[int]
    logit_rows: list[int]


def chain_parents(n: int) -> list[int]:
    """Parents of ``n`` consecutive tokens right after the committed prefix."""
    return list(range(-1, n - 1))


@dataclass(frozen=True)
class TreeLayout:
    """A tree of t rows hanging below a causal chain of c rows; row offsets relative to the
    tree's first row (so the same for every chain length)."""

    mask: np.ndarray  # bool [t, t]: ancestors and self
    prefix: tuple[int, ...]  # rows below tree start + prefix[r] are the chain rows row r sees (<= 0)
    position: tuple[int, ...]  # position of row r = tree start + position[r]


@functools.lru_cache(maxsize=1024)
def tree_layout(parents: tuple[int, ...]) -> TreeLayout:
    """``parents[r]`` >= 0: a tree row; < 0: hangs below chain row ``c + parents[r]``."""
    prefix, position = [], []
    for p in parents:
        if p >= 0:
            prefix.append(prefix[p])
            position.append(position[p] + 1)
        else:
            prefix.append(p + 1)
            position.append(p + 1)
    return TreeLayout(ancestor_mask([max(p, -1) for p in parents]).numpy(), tuple(prefix), tuple(position))


def _chain_length(parents: list[int]) -> int:
    c = 0
    while c < len(parents) and parents[c] == c - 1:
        c += 1
    return c


class ModelRunner:
    """Runs an LLM or SSM (``run``/``forward``), or gives an EAGLE-3 head its step (``prepare``).
    ``kv_capacity`` None: the runner's pool grows on demand (drafters, tools); otherwise it is
    fixed and the caller admits requests by it."""

    def __init__(self, model: Transformer | Eagle3Head, kv_capacity: KVCapacity | None = None) -> None:
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.pool = BlockPool(
            kv_capacity or KVCapacity(GROWABLE_START_BLOCKS), model.num_layers, model.num_kv_heads, model.head_dim,
            self.dtype, self.device, growable=kv_capacity is None,
        )
        self._host = torch.empty(0, dtype=torch.long)
        self._copied: torch.cuda.Event | None = None  # the last host->device copy of _host

    def new_cache(self) -> PagedKVCache:
        return PagedKVCache(self.pool)

    def forward(self, items: list[RunItem]) -> list[torch.Tensor]:
        """Logits [len(item.logit_rows), vocab] for every item, fp32 on the host (drafters, tools)."""
        return list(self.run(items).float().cpu().split([len(item.logit_rows) for item in items]))

    @torch.inference_mode()
    def run(self, items: list[RunItem], aux_layers: Sequence[int] = ()) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [sum of len(item.logit_rows), vocab] of one forward, on the model's device; with
        ``aux_layers`` also every row's hidden states entering them, [sum of len(item.tokens), k * hidden]
        (a feature drafter's input: the same forward, no extra pass)."""
        (ids, positions, logit_rows), meta = self.prepare(items)
        kv = self.pool.kv  # read after prepare: a growable pool may have grown
        return self.model(ids, positions, meta, kv, logit_rows, aux_layers=aux_layers)

    def prepare(self, items: list[RunItem]) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], AttentionMetadata]:
        """Reserve the items' rows and build the step's inputs: (ids, positions, logit rows) and metadata."""
        block_size = self.pool.block_size
        ids: list[int] = []
        rows: list[int] = []  # each new token's row in its request
        prefix: list[int] = []  # relative to its request's tree start, like pos
        pos: list[int] = []
        tree_start: list[int] = []
        logit_rows: list[int] = []
        trees: list[tuple[np.ndarray, tuple[int, ...]]] = []  # per request: mask rows of its queries, tree positions
        tables: list[list[int]] = []
        for item in items:
            n, cache = len(item.tokens), item.cache
            cache.reserve(n)
            pending = len(item.parents)
            first = pending - n  # pending index of the first new token
            c = _chain_length(item.parents)
            layout = tree_layout(tuple(p - c for p in item.parents[c:]))
            ids.extend(item.tokens)
            rows.extend(range(cache.length + first, cache.length + pending))
            logit_rows.extend(len(prefix) + r for r in item.logit_rows)
            if first < c:  # new chain rows: row i sees rows up to itself
                prefix.extend(range(first - c + 1, 1))
                pos.extend(range(first - c, 0))
            tree_first = max(first - c, 0)
            prefix.extend(layout.prefix[tree_first:])
            pos.extend(layout.position[tree_first:])
            tree_start.append(cache.length + c)
            trees.append((layout.mask[tree_first:], layout.position))
            tables.append(cache.blocks)
        batch = len(items)
        counts = [len(item.tokens) for item in items]
        max_q, max_t, max_blocks = max(counts), max(len(t[1]) for t in trees), max(map(len, tables))
        query_index = [b * max_q + j for b, n in enumerate(counts) for j in range(n)]
        request = [b for b, n in enumerate(counts) for _ in range(n)]
        tree_mask = np.zeros((batch, max_q, max_t), dtype=np.int64)
        tree_pos = np.zeros((batch, max_t), dtype=np.int64)
        for b, (mask, position) in enumerate(trees):
            if len(mask):
                tree_mask[b, counts[b] - len(mask) : counts[b], : mask.shape[1]] = mask
                tree_pos[b, : len(position)] = position
        table = np.zeros((batch, max_blocks), dtype=np.int64)
        for b, blocks in enumerate(tables):
            table[b, : len(blocks)] = blocks
        parts = [ids, rows, prefix, pos, query_index, request, logit_rows, tree_start,
                 table.ravel(), tree_mask.ravel(), tree_pos.ravel()]
        sizes = [len(p) for p in parts]
        flat = self._to_device(np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]))
        (ids_t, rows_t, prefix_t, pos_t, query_t, request_t, logit_t, start_t, table_t, mask_t, tree_pos_t) = (
            flat.split(sizes)
        )
        table_t = table_t.view(batch, max_blocks)
        starts = start_t[request_t]
        positions = pos_t + starts
        slots = table_t[request_t, rows_t // block_size] * block_size + rows_t % block_size
        pad = batch * max_q
        meta = AttentionMetadata(
            slot_mapping=slots,
            query_index=query_t,
            block_tables=table_t,
            block_size=block_size,
            max_queries=max_q,
            # Padding queries see row 0 only, so their softmax stays finite.
            prefix=prefix_t.new_ones(pad).index_copy_(0, query_t, prefix_t + starts).view(batch, max_q),
            positions=prefix_t.new_zeros(pad).index_copy_(0, query_t, positions).view(batch, max_q),
            tree_start=start_t,
            tree_mask=mask_t.view(batch, max_q, max_t).bool(),
            tree_positions=tree_pos_t.view(batch, max_t) + start_t[:, None],
        )
        return (ids_t, positions, logit_t), meta

    def _to_device(self, values: np.ndarray) -> torch.Tensor:
        """One copy of the step's integers to the device, through a reused host buffer."""
        if self.device.type != "cuda":
            return torch.from_numpy(values).to(self.device)  # no copy on a CPU
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy must be done before we overwrite
        if self._host.numel() < len(values):
            self._host = torch.empty(max(len(values), 2 * self._host.numel()), dtype=torch.long, pin_memory=True)
        host = self._host[: len(values)]
        host.numpy()[:] = values
        out = host.to(self.device, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return out
