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

Prefix caching (``prefix_caching``): a block full of committed rows can be published under a
digest of everything its rows depend on (``chain_digests``), so a later request with the same
prefix takes it by reference instead of recomputing it (vLLM's automatic prefix caching, over
block hashes). Invariants:

- A block is free, held (reference count > 0), or cached and unreferenced (``evictable``). Only
  full blocks of committed rows are published, and rows are only ever written at or past a
  cache's committed length, so a published block is never written again while it is published:
  drafted (tree) rows never reach one.
- Unreferenced cached blocks stay until an allocation finds no free block; then the least
  recently released goes first. A cache gives its blocks back last block first, so a chain's
  leaves are evicted before its parents.
- A digest is a 128-bit BLAKE2b chained over the parent block's digest and the block's token ids:
  a hit compares digests only (a collision needs ~2^64 distinct blocks; Python's ``hash`` of a
  tuple could be forced by a client). The index dies with the pool, so cached KV never outlives
  the model or dtype that computed it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

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
    """Preallocated K/V for ``capacity.num_blocks`` blocks: which are free, who holds them, and
    (with ``prefix_caching``) which hold a published prefix.

    A ``growable`` pool (drafters' caches, tools) doubles its storage instead of running out
    (after evicting what it caches); block ids stay valid, so caches do not notice. The LLM's
    pool never grows: the scheduler admits by its capacity.
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
        prefix_caching: bool = False,
    ) -> None:
        self.capacity = capacity
        self.growable = growable
        self.prefix_caching = prefix_caching
        self.kv = torch.empty(
            num_layers, 2, capacity.num_blocks * capacity.block_size, num_kv_heads, head_dim, dtype=dtype, device=device
        )
        self._free = list(range(capacity.num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._refs = [0] * capacity.num_blocks
        self._block_of: dict[bytes, int] = {}  # published digest -> block
        self._digest_of: dict[int, bytes] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self.evictions = 0  # cached blocks given to allocations since the start
        self._zero([0])

    @property
    def block_size(self) -> int:
        return self.capacity.block_size

    @property
    def num_free(self) -> int:
        """Blocks an allocation can have: free ones and cached ones nobody holds."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks some cache holds (a shared one counts once)."""
        return self.capacity.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Published blocks (held or not)."""
        return len(self._block_of)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            if not self.growable:
                # The scheduler reserves every step's worst case, so this is a bug, not load.
                raise RuntimeError(f"KV block pool exhausted: {n} blocks wanted, {self.num_free} free")
            self._grow(max(2 * self.capacity.num_blocks, self.num_used + n))
        while len(self._free) < n:
            self._evict(next(iter(self._evictable)))
            self.evictions += 1
        blocks = [self._free.pop() for _ in range(n)]
        for block in blocks:
            self._refs[block] = 1
        self._zero(blocks)
        return blocks

    def set_aside(self) -> int:
        """The highest free block, never handed out (a step graph's scratch block): the blocks
        requests get are then numbered as in a pool without it."""
        block = self._free.pop(0)
        self._refs[block] = 1
        self._zero([block])
        return block

    def hold(self, blocks: Sequence[int]) -> None:
        """Take another reference to blocks in use or cached (a prefix hit)."""
        for block in blocks:
            self._refs[block] += 1
            self._evictable.pop(block, None)

    def free(self, blocks: Sequence[int]) -> None:
        """Drop a reference to each block, in the order given: the last one given is evicted last."""
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._digest_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def publish(self, block: int, digest: bytes) -> None:
        """Offer a held block, full of committed rows, to later prefixes. A digest already
        published keeps its first block (this one stays its holder's alone)."""
        if self.prefix_caching and digest not in self._block_of and block not in self._digest_of:
            self._block_of[digest] = block
            self._digest_of[block] = digest

    def lookup(self, digests: Iterable[bytes]) -> list[tuple[int, bytes]]:
        """(block, digest) of the longest published prefix of ``digests`` (nothing is taken). It
        stops at the first miss: pass ``iter_digests`` and nothing past it is hashed."""
        hits = []
        for digest in digests:
            block = self._block_of.get(digest)
            if block is None:
                break
            hits.append((block, digest))
        return hits

    def num_evictable(self, blocks: Sequence[int]) -> int:
        """How many of ``blocks`` nobody holds (taking them leaves fewer for allocations)."""
        return sum(block in self._evictable for block in blocks)

    def reset_prefix_cache(self) -> int:
        """Forget every published prefix (blocks in use stay with their holders); returns how many."""
        count = len(self._block_of)
        while self._evictable:
            self._evict(next(iter(self._evictable)))
        self._block_of.clear()
        self._digest_of.clear()
        return count

    def _evict(self, block: int) -> None:
        del self._evictable[block]
        del self._block_of[self._digest_of.pop(block)]
        self._free.append(block)

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
        self._refs += [0] * (num_blocks - old)
        self._free[:0] = range(num_blocks - 1, old - 1, -1)  # new blocks handed out after the old free ones


def iter_digests(tokens: Sequence[int], block_size: int, seed: bytes = b"") -> Iterator[bytes]:
    """One digest per full block of ``tokens``, each covering the block and everything before it
    (``seed`` stands for what comes before the first block), computed as they are asked for."""
    parent = seed
    ids = np.asarray(tokens[: len(tokens) // block_size * block_size], dtype=np.int64)
    for start in range(0, len(ids), block_size):
        parent = hashlib.blake2b(parent + ids[start : start + block_size].tobytes(), digest_size=16).digest()
        yield parent


def chain_digests(tokens: Sequence[int], block_size: int, seed: bytes = b"") -> list[bytes]:
    return list(iter_digests(tokens, block_size, seed))


def index_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    """``values`` as an int64 index on ``device`` in one host->device copy. On CUDA it leaves
    from pinned memory without blocking (PyTorch's caching host allocator keeps the buffer until
    the copy is done): a plain ``.to``, or a Python list used as an index, waits for every kernel
    queued on the stream."""
    pinned = device.type == "cuda"
    return torch.tensor(values, dtype=torch.int64, pin_memory=pinned).to(device, non_blocking=pinned)
