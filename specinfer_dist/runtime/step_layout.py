"""One step's integer inputs, laid out on the host and sent to the device in one copy.

A step is a flat run of new tokens from several requests. For each request the runner knows
its cache (committed rows, blocks) and the parents of its pending rows: the longest prefix of
them that is a causal chain (each row the child of the previous, the first a child of the
committed prefix) plus a token tree after it. A tree's layout (ancestor mask, depths, where it
hangs off the chain) depends only on its parents, so it is computed once per shape and cached.

``StepLayout.of`` turns the requests into numpy arrays of a ``StepShape`` (B requests, Q
queries each, T tree rows each, K blocks each) packed into one int64 array; ``unpack`` splits
its device copy into the model's inputs and ``AttentionMetadata``. Two layouts:

- natural (eager steps): B, Q, T, K are the step's own maxima; the flat run holds only real
  tokens unless every request has Q of them (``dense``);
- bucketed (static steps, CUDA graphs): a given, larger shape, always dense (request b's token
  j at row b * Q + j). Rows nobody uses are padding: token 0 at position 0 writing its K/V to
  the reserved ``scratch_block``, seeing only row 0 of its table, with no logits. Padding
  requests' tables are all ``scratch_block``. A padded step computes the same values for the
  real rows as the natural one (attention masks out everything padded).

``query_index`` maps every real token, in the natural order of the items, to its row.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from specinfer_dist.models.attention import AttentionMetadata
from specinfer_dist.runtime.kv_cache import PagedKVCache
from specinfer_dist.tree.token_tree import ancestor_mask


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
    prefix: np.ndarray  # rows below tree start + prefix[r] are the chain rows row r sees (<= 0)
    position: np.ndarray  # position of row r = tree start + position[r]


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
    mask = ancestor_mask([max(p, -1) for p in parents]).numpy()
    return TreeLayout(mask, np.asarray(prefix, dtype=np.int64), np.asarray(position, dtype=np.int64))


def chain_length(parents: list[int]) -> int:
    c = 0
    while c < len(parents) and parents[c] == c - 1:
        c += 1
    return c


@dataclass(frozen=True)
class StepShape:
    batch: int  # B
    queries: int  # Q
    tree_rows: int  # T
    blocks: int  # K

    @property
    def tokens(self) -> int:
        return self.batch * self.queries


@dataclass
class Step:
    """A step's inputs on the device (views of one copied buffer)."""

    ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    logit_rows: torch.Tensor  # [L]
    meta: AttentionMetadata


FIELDS = ("ids", "slots", "positions", "query_index", "prefix", "query_positions", "tree_start", "tables",
          "tree_mask", "tree_positions", "logit_rows")  # packed in this order; logit_rows last (its length varies)


class StepLayout:
    """The packed host arrays of one step (see module docstring)."""

    def __init__(self, shape: StepShape, tokens: int, dense: bool, num_logits: int, block_size: int) -> None:
        self.shape, self.tokens, self.dense, self.num_logits = shape, tokens, dense, num_logits
        self.block_size = block_size
        b, q, t, k = shape.batch, shape.queries, shape.tree_rows, shape.blocks
        self.shapes = {
            "ids": (tokens,), "slots": (tokens,), "positions": (tokens,), "query_index": (tokens,),
            "prefix": (b, q), "query_positions": (b, q), "tree_start": (b,), "tables": (b, k),
            "tree_mask": (b, q, t), "tree_positions": (b, t), "logit_rows": (num_logits,),
        }
        self.sizes = [int(np.prod(self.shapes[name])) for name in FIELDS]
        self.flat = np.zeros(sum(self.sizes), dtype=np.int64)

    @property
    def fixed_size(self) -> int:
        """Everything but the logit rows: what a step graph's buffer holds at fixed offsets."""
        return sum(self.sizes[:-1])

    def arrays(self) -> dict[str, np.ndarray]:
        """Named views of ``flat``, in their shapes."""
        parts = np.split(self.flat, np.cumsum(self.sizes)[:-1])
        return {name: part.reshape(self.shapes[name]) for name, part in zip(FIELDS, parts)}

    @classmethod
    def of(
        cls, items: list[RunItem], block_size: int, shape: StepShape | None = None, scratch_block: int = 0
    ) -> "StepLayout":
        """The layout of ``items`` (their rows already reserved): natural, or bucketed to ``shape``."""
        counts = [len(item.tokens) for item in items]
        chains = [chain_length(item.parents) for item in items]
        trees = [tree_layout(tuple(p - c for p in item.parents[c:])) for item, c in zip(items, chains)]
        dense = shape is not None or len(set(counts)) <= 1
        if shape is None:
            shape = StepShape(len(items), max(counts, default=0), max((len(t.position) for t in trees), default=0),
                              max((len(item.cache.blocks) for item in items), default=0))
        layout = cls(shape, shape.tokens if dense else sum(counts), dense, sum(len(i.logit_rows) for i in items),
                     block_size)
        a = layout.arrays()
        a["prefix"][:] = 1  # padding queries see row 0 only, so their softmax stays finite
        a["slots"][:] = scratch_block * block_size
        a["tables"][:] = scratch_block
        offset = logits = 0
        for b, (item, n, c, tree) in enumerate(zip(items, counts, chains, trees)):
            cache, pending = item.cache, len(item.parents)
            first = pending - n  # pending index of the first new token
            row = b * shape.queries if dense else offset  # of its first token in the flat run
            start = cache.length + c  # the tree's first row
            rows = np.arange(cache.length + first, cache.length + pending)
            blocks = np.asarray(cache.blocks, dtype=np.int64)
            tree_first = max(first - c, 0)
            chain_new = max(c - first, 0)  # new chain rows: row i sees rows up to itself
            prefix = np.concatenate((np.arange(first - c + 1, first - c + 1 + chain_new), tree.prefix[tree_first:]))
            position = np.concatenate((np.arange(first - c, first - c + chain_new), tree.position[tree_first:]))
            a["ids"][row : row + n] = item.tokens
            a["slots"][row : row + n] = blocks[rows // block_size] * block_size + rows % block_size
            a["positions"][row : row + n] = position + start
            a["query_index"][offset : offset + n] = np.arange(b * shape.queries, b * shape.queries + n)
            a["prefix"][b, :n] = prefix + start
            a["query_positions"][b, :n] = position + start
            a["tree_start"][b] = start
            a["tables"][b, : len(blocks)] = blocks
            mask = tree.mask[tree_first:]
            a["tree_mask"][b, n - len(mask) : n, : mask.shape[1]] = mask
            a["tree_positions"][b] = start
            a["tree_positions"][b, : len(tree.position)] += tree.position
            a["logit_rows"][logits : logits + len(item.logit_rows)] = np.asarray(item.logit_rows, dtype=np.int64) + row
            offset += n
            logits += len(item.logit_rows)
        return layout

    def unpack(self, flat: torch.Tensor) -> Step:
        """The step's inputs from ``flat`` (this layout's device copy, or a buffer that starts with it)."""
        parts = flat[: sum(self.sizes)].split(self.sizes)
        t = {name: part.view(self.shapes[name]) for name, part in zip(FIELDS, parts)}
        meta = AttentionMetadata(
            slot_mapping=t["slots"], query_index=t["query_index"], block_tables=t["tables"],
            block_size=self.block_size, max_queries=self.shape.queries, prefix=t["prefix"],
            positions=t["query_positions"], tree_start=t["tree_start"], tree_mask=t["tree_mask"] != 0,
            tree_positions=t["tree_positions"], dense=self.dense,
        )
        return Step(t["ids"], t["positions"], t["logit_rows"], meta)
