"""A model's KV memory, allocated once up front and handed out in fixed-size blocks of rows.

Bounding memory by a pool (vLLM's PagedAttention idea) is what lets the scheduler admit only
what fits, instead of requests failing or the process running out of memory mid-generation.
Every tensor-parallel shard holds a pool of the same ``KVCapacity`` (its own share of the KV
heads), so block accounting done once on the scheduler side holds for all of them.

Layout: ``kv[layer]`` is ``[2, slots, kv_heads, head_dim]`` with slot = block * block_size +
offset, the form attention reads and writes (models/attention.py). Blocks are zeroed when
handed out, and block 0 (where block tables are padded) at once: attention masks out rows no
one wrote, but a masked NaN would still poison a softmax. Zeroing never synchronises with the
device: consecutive blocks are a slice, others one index copied without blocking. Memory is
not touched up front, so on a CPU the resident set grows with use although the pool is reserved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specinfer_dist.config import DEFAULT_BLOCK_SIZE, DEFAULT_GPU_MEMORY_UTILIZATION
from specinfer_dist.errors import InvalidConfigError

DEFAULT_CPU_KV_BYTES = 1 << 30  # KV pool budget on a CPU when kv_blocks is not given


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


def block_bytes(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, block_size: int) -> int:
    return num_layers * 2 * num_kv_heads * head_dim * block_size * dtype.itemsize


def auto_capacity(
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    block_size: int = DEFAULT_BLOCK_SIZE,
    max_rows: int | None = None,
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
    reserved: int = 0,
) -> KVCapacity:
    """A pool sized from memory. CUDA: what is left of ``gpu_memory_utilization`` of the device
    after everything allocated so far (load the weights first) and ``reserved`` bytes (CUDA
    graphs), as vLLM does. Elsewhere: ``DEFAULT_CPU_KV_BYTES``. Never more than ``max_rows``
    rows need (all requests at full length)."""
    per_block = block_bytes(num_layers, num_kv_heads, head_dim, dtype, block_size)
    if device.type == "cuda":
        if not 0 < gpu_memory_utilization <= 1:
            raise InvalidConfigError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        free, total = torch.cuda.mem_get_info(device)
        budget = free - (1 - gpu_memory_utilization) * total - reserved
    else:
        budget = DEFAULT_CPU_KV_BYTES
    blocks = int(budget // per_block)
    if max_rows is not None:
        blocks = min(blocks, -(-max_rows // block_size))
    if blocks < 1:
        raise InvalidConfigError(
            f"no memory left for a KV pool on {device} ({budget / 2**20:.0f} MiB free within the budget, a block "
            f"needs {per_block / 2**20:.1f} MiB); lower the model size or raise gpu_memory_utilization"
        )
    return KVCapacity(blocks, block_size)


class BlockPool:
    """Preallocated K/V for ``capacity.num_blocks`` blocks, and which of them are free.

    A ``growable`` pool (drafters' caches, tools) doubles its storage instead of running out;
    block ids stay valid, so caches do not notice. The LLM's pool never grows: the scheduler
    admits by its capacity.
    """

    def __init__(
        self,
        capacity: KVCapacity,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        growable: bool = False,
    ) -> None:
        self.capacity = capacity
        self.growable = growable
        self.kv = torch.empty(
            num_layers, 2, capacity.num_blocks * capacity.block_size, num_kv_heads, head_dim, dtype=dtype, device=device
        )
        self._free = list(range(capacity.num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._zero([0])

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
            if not self.growable:
                # The scheduler reserves every step's worst case, so this is a bug, not load.
                raise RuntimeError(f"KV block pool exhausted: {n} blocks wanted, {len(self._free)} free")
            self._grow(max(2 * self.capacity.num_blocks, self.num_used + n))
        blocks = [self._free.pop() for _ in range(n)]
        self._zero(blocks)
        return blocks

    def _zero(self, blocks: list[int]) -> None:
        if not blocks:
            return
        by_block = self.kv.unflatten(2, (-1, self.block_size))
        first = blocks[0]
        if blocks == list(range(first, first + len(blocks))):  # what a tidy pool hands out: a slice, no index copy
            by_block[:, :, first : first + len(blocks)] = 0
        else:
            # index_fill_, not `[index] = 0`: that copies the 0 to the device, waiting for it.
            by_block.index_fill_(2, index_tensor(blocks, self.kv.device), 0)

    def _grow(self, num_blocks: int) -> None:
        old = self.capacity.num_blocks
        grown = self.kv.new_empty(*self.kv.shape[:2], num_blocks * self.block_size, *self.kv.shape[3:])
        grown[:, :, : self.kv.shape[2]] = self.kv
        self.kv = grown
        self.capacity = KVCapacity(num_blocks, self.block_size)
        self._free[:0] = range(num_blocks - 1, old - 1, -1)  # new blocks handed out after the old free ones

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


def index_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    """``values`` as an int64 index on ``device`` in one host->device copy. On CUDA it leaves
    from pinned memory without blocking (PyTorch's caching host allocator keeps the buffer until
    the copy is done): a plain ``.to``, or a Python list used as an index, waits for every kernel
    queued on the stream."""
    pinned = device.type == "cuda"
    return torch.tensor(values, dtype=torch.int64, pin_memory=pinned).to(device, non_blocking=pinned)
