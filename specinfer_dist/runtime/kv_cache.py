"""Per-request KV caches with speculative rows.

Rows ``[0, length)`` hold committed tokens at positions ``0..length-1``. A step appends
*pending* rows (a prompt chunk, a token tree, or one draft depth after another), and
``commit(keep)`` then moves just the kept pending rows (the accepted path) down behind
the committed ones. Accepted tokens are never recomputed.

Attention only calls ``append``; the engine calls ``reserve``/``commit``/``rollback``.
``KVCache`` keeps a request's rows in one tensor that grows on demand; ``PagedKVCache``
keeps them in blocks of a shared, fixed-size ``BlockPool``. Both share the row bookkeeping.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch

from specinfer_dist.runtime.block_pool import BlockPool


class KVCacheBase(ABC):
    def __init__(self) -> None:
        self.length = 0  # committed rows
        self.pending = 0  # rows appended since the last commit/rollback
        self._write_at = 0
        self._write_n = 0

    def reserve(self, n: int) -> None:
        """Make room for the next forward's ``n`` rows, written after the pending ones."""
        self._hold(self.length + self.pending + n)
        self._write_at = self.length + self.pending
        self._write_n = n
        self.pending += n

    @torch.inference_mode()  # storage grown during a forward is an inference tensor: edit it in that mode too
    def commit(self, keep: Sequence[int]) -> None:
        """Keep pending rows ``keep`` (indices relative to the first pending row, ascending)."""
        if list(keep) != list(range(len(keep))):
            self._move([self.length + i for i in keep], self.length)
        self.length += len(keep)
        self.rollback()

    def rollback(self) -> None:
        """Drop every pending row."""
        self.pending = 0
        self._hold(self.length)

    def free(self) -> None:
        """Drop every row (a paged cache gives its blocks back)."""
        self.length = 0
        self.rollback()

    @abstractmethod
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's k/v ([kv_heads, n, head_dim]) in the reserved rows; return
        every row so far as (keys, values), each [kv_heads, rows, head_dim]."""

    @abstractmethod
    def committed(self) -> torch.Tensor:
        """A copy of the committed K/V, [layers, 2, kv_heads, length, head_dim] (for tests and tools)."""

    @abstractmethod
    def _hold(self, rows: int) -> None:
        """Have room for ``rows`` rows (rows past them are no longer needed)."""

    @abstractmethod
    def _move(self, src: list[int], dst: int) -> None:
        """Copy rows ``src`` to ``dst, dst + 1, ...`` (sources may overlap targets)."""


class KVCache(KVCacheBase):
    """Rows in one tensor per request, grown by doubling; memory is bounded by nothing."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        capacity: int = 64,
    ) -> None:
        super().__init__()
        self._kv = torch.empty(num_layers, 2, num_kv_heads, capacity, head_dim, dtype=dtype, device=device)

    @property
    def capacity(self) -> int:
        return self._kv.shape[3]

    def _hold(self, rows: int) -> None:
        if rows > self.capacity:
            grown = torch.empty(
                *self._kv.shape[:3], max(rows, 2 * self.capacity), self._kv.shape[4],
                dtype=self._kv.dtype, device=self._kv.device,
            )
            grown[:, :, :, : self.length + self.pending] = self._kv[:, :, :, : self.length + self.pending]
            self._kv = grown

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._write_at + self._write_n
        self._kv[layer, 0, :, self._write_at : end] = k
        self._kv[layer, 1, :, self._write_at : end] = v
        return self._kv[layer, 0, :, :end], self._kv[layer, 1, :, :end]

    def _move(self, src: list[int], dst: int) -> None:
        # index_select copies first, so overlapping source and target rows are safe.
        rows = self._kv.index_select(3, torch.tensor(src, device=self._kv.device))
        self._kv[:, :, :, dst : dst + len(src)] = rows

    def committed(self) -> torch.Tensor:
        return self._kv[:, :, :, : self.length].clone()


class PagedKVCache(KVCacheBase):
    """Rows in blocks of a shared pool, listed in a block table; row r is at offset
    ``r % block_size`` of block ``blocks[r // block_size]``.

    It holds exactly the blocks its rows need: ``reserve`` takes more, ``commit`` and
    ``rollback`` give back the ones past the kept rows, ``free`` gives back all. Attention
    gets each layer's rows gathered into a fresh contiguous tensor: a copy per layer, but a
    transient one, so lasting KV memory stays the pool's.
    """

    def __init__(self, pool: BlockPool) -> None:
        super().__init__()
        self.pool = pool
        self.blocks: list[int] = []
        self._table = self._tensor([])
        self._write_blocks = self._write_offsets = self._table

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.pool.kv.device)

    def _where(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block id, offset) of each row."""
        return self._table[rows // self.pool.block_size], rows % self.pool.block_size

    def _span(self, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._where(torch.arange(start, start + n, device=self.pool.kv.device))

    def _hold(self, rows: int) -> None:
        need = self.pool.capacity.blocks_for(rows) - len(self.blocks)
        if need > 0:
            self.blocks += self.pool.allocate(need)
        elif need < 0:
            self.pool.free(self.blocks[need:])
            del self.blocks[need:]
        if need:
            self._table = self._tensor(self.blocks)

    def reserve(self, n: int) -> None:
        super().reserve(n)
        self._write_blocks, self._write_offsets = self._span(self._write_at, n)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.pool.kv[layer]  # [2, kv_heads, blocks, block_size, head_dim]
        kv[:, :, self._write_blocks, self._write_offsets] = torch.stack((k, v))
        rows = kv.index_select(2, self._table).flatten(2, 3)[:, :, : self._write_at + self._write_n]
        return rows[0], rows[1]

    def _move(self, src: list[int], dst: int) -> None:
        kv = self.pool.kv
        # Advanced indexing reads into a new tensor first, so overlapping rows are safe.
        kv[:, :, :, *self._span(dst, len(src))] = kv[:, :, :, *self._where(self._tensor(src))]

    def committed(self) -> torch.Tensor:
        return self.pool.kv.index_select(3, self._table).flatten(3, 4)[:, :, :, : self.length]
