"""How many KV blocks a device can hold once the weights are loaded.

The policy is one function, ``kv_blocks_for_budget``: the pool takes ``fraction`` of the
memory still free on the device after loading, in whole blocks of one layer stack's K and V.
On CUDA the default fraction is ``DEFAULT_GPU_FRACTION`` (vLLM's gpu_memory_utilization plays
the same role); on a CPU the pool is sized only when a fraction is given (host memory is
shared with everything else, so caches grow on demand by default). Invariant: every
tensor-parallel rank must use the same block count (the smallest of the ranks' answers),
since the scheduler admits requests against one ``KVCapacity``.
"""

from __future__ import annotations

import torch

from specinfer_dist.errors import InvalidConfigError
from specinfer_dist.models.transformer import Transformer
from specinfer_dist.runtime.block_pool import KVCapacity

DEFAULT_GPU_FRACTION = 0.9


def block_bytes(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block: K and V rows of ``block_size`` tokens in every layer."""
    return 2 * num_layers * num_kv_heads * head_dim * block_size * torch.empty((), dtype=dtype).element_size()


def free_bytes(device: torch.device) -> int:
    """Memory still free on ``device`` (CUDA: the driver's count; CPU: MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise InvalidConfigError("cannot size the KV pool from memory: /proc/meminfo has no MemAvailable")


def kv_blocks_for_budget(free: int, fraction: float, bytes_per_block: int) -> int:
    """Whole blocks in ``fraction`` of ``free`` bytes."""
    if not 0 < fraction <= 1:
        raise InvalidConfigError(f"kv_memory_fraction must be in (0, 1], got {fraction}")
    return int(free * fraction) // bytes_per_block


def kv_capacity_for(
    model: Transformer, kv_blocks: int | None, block_size: int, fraction: float | None
) -> KVCapacity | None:
    """The pool for a loaded model (or TP shard): ``kv_blocks`` if given, else sized from free
    memory (CUDA: ``fraction`` or the default; CPU: only with a ``fraction``), else None
    (caches grow). A model on the meta device (it never runs here) gets no pool."""
    if kv_blocks is not None:
        return KVCapacity(kv_blocks, block_size)
    param = next(model.parameters())
    device = param.device
    if any(p.is_meta for p in model.parameters()) or (fraction is None and device.type != "cuda"):
        return None
    per_block = block_bytes(model.num_layers, model.num_kv_heads, model.head_dim, block_size, param.dtype)
    blocks = kv_blocks_for_budget(free_bytes(device), fraction or DEFAULT_GPU_FRACTION, per_block)
    if blocks < 1:
        raise InvalidConfigError(f"no memory left for a KV pool on {device} after loading the weights")
    return KVCapacity(blocks, block_size)
