"""A model's KV memory, allocated once up front and handed out in fixed-size blocks of rows.

Bounding memory by a pool (vLLM's PagedAttention idea) is what lets the scheduler admit only
what fits, instead of requests failing or the process running out of memory mid-generation.
Every tensor-parallel shard holds a pool of the same ``KVCapacity`` (its own share of the KV
heads), so block accounting done once on the scheduler side holds for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specinfer_dist.config import DEFAULT_BLOCK_SIZE
from specinfer_dist.errors import InvalidConfigError


@dataclass(frozen=True)
class KVCapacity:
    num_blocks: int
    block_size: int = DEFAULT_BLOCK_SIZE

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.block_size < 1:
            raise InvalidConfigError(
                f"a KV pool needs positive kv_blocks and kv_block_size, got {self.num_blocks} and {self.block_size}"
            )

    def blocks_for(self, rows: int) -> int:
        return -(-rows // self.block_size)


class BlockPool:
    """Preallocated K/V for ``capacity.num_blocks`` blocks, and which of them are free."""

    def __init__(
        self,
        capacity: KVCapacity,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.capacity = capacity
        # Blocks on dim 3: one index_select gathers a request's K and V of a layer, and the
        # result views as [2, kv_heads, rows, head_dim] without a second copy.
        self.kv = torch.empty(
            num_layers, 2, num_kv_heads, capacity.num_blocks, capacity.block_size, head_dim, dtype=dtype, device=device
        )
        self._free = list(range(capacity.num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def block_size(self) -> int:
        return self.capacity.block_size

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.capacity.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            # The scheduler reserves every step's worst case, so this is a bug, not load.
            raise RuntimeError(f"KV block pool exhausted: {n} blocks wanted, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
