"""Per-request KV cache with speculative rows.

Rows ``[0, length)`` hold committed tokens at positions ``0..length-1``. A step appends
*pending* rows (a prompt chunk, a token tree, or one draft depth after another), and
``commit(keep)`` then moves just the kept pending rows (the accepted path) down behind
the committed ones. Accepted tokens are never recomputed.

Attention only calls ``append``; the engine calls ``reserve``/``commit``/``rollback``.
A paged block pool can implement the same four methods without touching verification.
"""

from __future__ import annotations

from typing import Sequence

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        capacity: int = 64,
    ) -> None:
        self._kv = torch.empty(num_layers, 2, num_kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.length = 0  # committed rows
        self.pending = 0  # rows appended since the last commit/rollback
        self._write_at = 0
        self._write_n = 0

    @property
    def capacity(self) -> int:
        return self._kv.shape[3]

    def reserve(self, n: int) -> None:
        """Make room for the next forward's ``n`` rows, written after the pending ones."""
        needed = self.length + self.pending + n
        if needed > self.capacity:
            grown = torch.empty(
                *self._kv.shape[:3], max(needed, 2 * self.capacity), self._kv.shape[4],
                dtype=self._kv.dtype, device=self._kv.device,
            )
            grown[:, :, :, : self.length + self.pending] = self._kv[:, :, :, : self.length + self.pending]
            self._kv = grown
        self._write_at = self.length + self.pending
        self._write_n = n
        self.pending += n

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._write_at + self._write_n
        self._kv[layer, 0, :, self._write_at : end] = k
        self._kv[layer, 1, :, self._write_at : end] = v
        return self._kv[layer, 0, :, :end], self._kv[layer, 1, :, :end]

    def commit(self, keep: Sequence[int]) -> None:
        """Keep pending rows ``keep`` (indices relative to the first pending row, ascending)."""
        if keep:
            src = torch.as_tensor(keep, device=self._kv.device) + self.length
            if not torch.equal(src, torch.arange(self.length, self.length + len(keep), device=src.device)):
                # index_select copies first, so overlapping source and target rows are safe.
                rows = self._kv.index_select(3, src)
                self._kv[:, :, :, self.length : self.length + len(keep)] = rows
        self.length += len(keep)
        self.pending = 0

    def rollback(self) -> None:
        """Drop every pending row."""
        self.pending = 0

    def committed(self) -> torch.Tensor:
        """A copy of the committed K/V, [layers, 2, kv_heads, length, head_dim] (for tests and tools)."""
        return self._kv[:, :, :, : self.length].clone()
