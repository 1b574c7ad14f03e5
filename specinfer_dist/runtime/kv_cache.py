"""Per-request KV caches with speculative rows, in blocks of a shared ``BlockPool``.

Rows ``[0, length)`` hold committed tokens at positions ``0..length-1``. A step appends
*pending* rows (a prompt chunk, a token tree, or one draft depth after another), and
``commit(keep)`` then moves just the kept pending rows (the accepted path) down behind
the committed ones. Accepted tokens are never recomputed.

Row r is at offset ``r % block_size`` of block ``blocks[r // block_size]``, i.e. pool slot
``blocks[r // block_size] * block_size + r % block_size``. A cache holds exactly the blocks its
rows need: ``reserve`` takes more, ``commit`` and ``rollback`` give back the ones past the kept
rows, ``free`` gives back all. The model never sees a cache: the runner turns caches into block
tables and slots (runtime/model_runner.py), and attention writes and reads the pool directly.
"""

from __future__ import annotations

from typing import Sequence

import torch

from specinfer_dist.runtime.block_pool import BlockPool, index_tensor


class PagedKVCache:
    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.length = 0  # committed rows
        self.pending = 0  # rows reserved since the last commit/rollback
        self.blocks: list[int] = []

    def reserve(self, n: int) -> None:
        """Make room for the next forward's ``n`` rows, written after the pending ones."""
        self._hold(self.length + self.pending + n)
        self.pending += n

    @torch.inference_mode()  # the pool may have been grown during a forward: an inference tensor
    def commit(self, keep: Sequence[int]) -> None:
        """Keep pending rows ``keep`` (indices relative to the first pending row, ascending)."""
        keep = list(keep)
        if keep != list(range(len(keep))):
            self._move([self.length + i for i in keep], self.length)
        self.length += len(keep)
        self.rollback()

    def rollback(self) -> None:
        """Drop every pending row."""
        self.pending = 0
        self._hold(self.length)

    def free(self) -> None:
        """Drop every row and give the blocks back."""
        self.length = 0
        self.rollback()

    def slots(self, rows: Sequence[int]) -> list[int]:
        size = self.pool.block_size
        return [self.blocks[r // size] * size + r % size for r in rows]

    def committed(self) -> torch.Tensor:
        """A copy of the committed K/V, [layers, 2, length, kv_heads, head_dim] (for tests and tools)."""
        return self.pool.kv[:, :, self.slots(range(self.length))]

    def _hold(self, rows: int) -> None:
        need = -(-rows // self.pool.block_size) - len(self.blocks)
        if need > 0:
            self.blocks += self.pool.allocate(need)
        elif need < 0:
            self.pool.free(self.blocks[need:])
            del self.blocks[need:]

    def _move(self, src: list[int], dst: int) -> None:
        kv = self.pool.kv
        source, target = index_tensor(self.slots(src) + self.slots(range(dst, dst + len(src))), kv.device).view(2, -1)
        # index_select copies first, so overlapping source and target rows are safe.
        kv.index_copy_(2, target, kv.index_select(2, source))
