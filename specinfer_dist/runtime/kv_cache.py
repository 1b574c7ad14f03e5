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

Prefix caching (the pool's ``prefix_caching``): a cache remembers the token ids of its committed
rows (the ids ``reserve`` was given) and publishes each block once its rows are all committed;
``attach`` starts an empty cache on the published blocks of the longest matching prefix. Shared
blocks are full and below ``length``, and rows are written only from ``length`` on (the
accepted-path compaction included), so a cache never writes into a block another one holds.
"""

from __future__ import annotations

from typing import Sequence

import torch

from specinfer_dist.runtime.block_pool import BlockPool, chain_digests, index_tensor, iter_digests


class PagedKVCache:
    """``seed`` is what every row depends on besides the ids given to ``reserve`` (a feature
    drafter's row t also depends on the request's token 0; see drafters/feature.py)."""

    def __init__(self, pool: BlockPool, seed: bytes = b"") -> None:
        self.pool = pool
        self.seed = seed
        self.length = 0  # committed rows
        self.pending = 0  # rows reserved since the last commit/rollback
        self.blocks: list[int] = []
        self.tokens: list[int] = []  # ids of the committed rows (prefix caching only)
        self._pending_tokens: list[int] = []
        self._published: list[bytes] = []  # digests of blocks[:len(_published)]

    def reserve(self, tokens: Sequence[int]) -> None:
        """Make room for the next forward's rows (one per id in ``tokens``), written after the pending ones."""
        self._hold(self.length + self.pending + len(tokens))
        self.pending += len(tokens)
        if self.pool.prefix_caching:
            self._pending_tokens.extend(tokens)

    def attach(self, tokens: Sequence[int]) -> int:
        """Take the published blocks that continue this cache's rows along ``tokens`` (the ids of
        all its rows, cached or not; pass only those the caller may skip, not the ones whose
        logits it needs); returns the committed length after. Only a cache whose rows are all
        in published blocks, with nothing pending, can take more."""
        size = self.pool.block_size
        done = len(self._published)
        if self.pending or self.length != done * size or len(self.blocks) != done or len(tokens) < (done + 1) * size:
            return self.length
        hits = self.pool.lookup(iter_digests(tokens[done * size :], size, self._parent()))
        blocks = [block for block, _ in hits]
        self.pool.hold(blocks)
        self.blocks += blocks
        self._published += [digest for _, digest in hits]
        self.length += len(blocks) * size
        self.tokens += tokens[done * size : self.length]
        return self.length

    def reusable(self, tokens: Sequence[int]) -> tuple[int, int]:
        """What ``attach(tokens)`` would take: (blocks, of which nobody holds now)."""
        hits = self.pool.lookup(iter_digests(tokens, self.pool.block_size, self.seed))
        return len(hits), self.pool.num_evictable([block for block, _ in hits])

    @torch.inference_mode()  # the pool may have been grown during a forward: an inference tensor
    def commit(self, keep: Sequence[int]) -> None:
        """Keep pending rows ``keep`` (indices relative to the first pending row, ascending)."""
        keep = list(keep)
        if keep != list(range(len(keep))):
            self._move([self.length + i for i in keep], self.length)
        self.length += len(keep)
        if self.pool.prefix_caching:
            self.tokens.extend(self._pending_tokens[i] for i in keep)
            self._publish()
        self.rollback()

    def rollback(self) -> None:
        """Drop every pending row."""
        self.pending = 0
        self._pending_tokens = []
        self._hold(self.length)

    def free(self) -> None:
        """Drop every row and give the blocks back."""
        self.length = 0
        self.tokens, self._published = [], []
        self.rollback()

    def slots(self, rows: Sequence[int]) -> list[int]:
        size = self.pool.block_size
        return [self.blocks[r // size] * size + r % size for r in rows]

    def committed(self) -> torch.Tensor:
        """A copy of the committed K/V, [layers, 2, length, kv_heads, head_dim] (for tests and tools)."""
        return self.pool.kv[:, :, self.slots(range(self.length))]

    def _publish(self) -> None:
        size, done = self.pool.block_size, len(self._published)
        full = self.length // size
        if full > done:
            new = chain_digests(self.tokens[done * size : full * size], size, self._parent())
            for block, digest in zip(self.blocks[done:full], new):
                self.pool.publish(block, digest)
            self._published += new

    def _parent(self) -> bytes:
        """What the next block's digest chains from."""
        return self._published[-1] if self._published else self.seed

    def _hold(self, rows: int) -> None:
        need = -(-rows // self.pool.block_size) - len(self.blocks)
        if need > 0:
            self.blocks += self.pool.allocate(need)
        elif need < 0:
            self.pool.free(self.blocks[:need-1:-1])  # last block first: leaves are evicted before parents
            del self.blocks[need:]

    def _move(self, src: list[int], dst: int) -> None:
        kv = self.pool.kv
        source, target = index_tensor(self.slots(src) + self.slots(range(dst, dst + len(src))), kv.device).view(2, -1)
        # index_select copies first, so overlapping source and target rows are safe.
        kv.index_copy_(2, target, kv.index_select(2, source))
