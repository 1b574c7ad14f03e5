"""Batched attention for one step over a paged KV pool: one call per layer for every request.

The runner (runtime/model_runner.py) describes a step with an ``AttentionMetadata``: where
each new token's K/V row goes in the pool (``slot_mapping``), each request's block table, and
which of a request's rows each query may see. The model stays cache- and rank-agnostic: it
gets that metadata and one pool tensor per layer, ``[2, slots, kv_heads, head_dim]`` (slot =
block * block_size + offset), and nothing else about caches.

Visibility. A request's rows are ``[0, kv_len)``: committed rows, then rows pending in this
step. Rows ``< tree_start`` sit at positions equal to their index (a causal chain); rows from
``tree_start`` on are a token tree. A query sees every row below its ``prefix`` (its causal
past) plus the tree rows flagged in its ``tree_mask`` row (itself and its tree ancestors).
Sliding windows drop keys whose position is ``window`` or more behind the query's.

Backend (measured, tiny batch-16 decode on CPU: padded SDPA 0.5 ms vs FlexAttention eager
9.4 ms, which materialises the score matrix without torch.compile): padded SDPA over the
batch's blocks, gathered once per layer. Queries are padded to the longest request in the
step (not at all when every request has as many: ``dense``), keys to the longest block
table. The mask is built once per step as SDPA's additive bias. On CPU, SDPA takes GQA
natively (``enable_gqa``); on CUDA a mask plus ``enable_gqa`` would force the math backend
(a materialised score matrix), so there each KV head's query group is folded into the query
rows: no K/V head is ever repeated.

Every tensor here has a shape fixed by (B, Q, T, blocks), so a step of a given bucket can be
captured in a CUDA graph and replayed (runtime/model_runner.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from specinfer_dist.models.layers import softcap as soft_cap


class StepAttention(Protocol):
    """What a layer's attention asks of its step: store the new rows where they belong and
    attend. ``AttentionMetadata`` (the paged pool) serves inference; training an EAGLE-3 head
    brings its own (training/feature.py), so the model stays one module for both."""

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pool: torch.Tensor | None,
        scale: float | None, sliding_window: int | None, softcap: float | None,
    ) -> torch.Tensor:
        """q [N, heads, d], k/v [N, kv_heads, d] of the step's new tokens -> [N, heads, d]."""
        ...


@dataclass
class AttentionMetadata:
    """One step's layout; every tensor is on the model's device. B requests, N new tokens,
    Q = most new tokens of one request, T = most tree rows of one request."""

    slot_mapping: torch.Tensor  # long [N]: pool slot of each new token's K/V row
    query_index: torch.Tensor  # long [N]: b * Q + (index among request b's new tokens)
    block_tables: torch.Tensor  # long [B, max blocks]: padded with block 0 (masked out)
    block_size: int
    max_queries: int  # Q
    prefix: torch.Tensor  # long [B, Q]: rows below this are visible (padding queries: 1)
    positions: torch.Tensor  # long [B, Q]: query positions
    tree_start: torch.Tensor  # long [B]
    tree_mask: torch.Tensor  # bool [B, Q, T]: visible tree rows (relative to tree_start)
    tree_positions: torch.Tensor  # long [B, T]: positions of the tree rows
    # True when every request has exactly Q new tokens (decode steps, padded buckets): the flat
    # run is already [B, Q] and attention skips padding and unpadding the queries.
    dense: bool = False
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict, repr=False)
    _biases: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pool: torch.Tensor | None,
        scale: float | None, sliding_window: int | None, softcap: float | None,
    ) -> torch.Tensor:
        """Write the new K/V rows into ``pool`` (a layer's), then attend over the requests' rows."""
        assert pool is not None, "paged attention needs the layer's pool"
        write_kv(pool, self, k, v)
        return paged_attention(q, pool, self, scale, sliding_window, softcap)

    def mask(self, window: int | None) -> torch.Tensor:
        """Bool [B, 1, Q, keys]; built once per step and window, shared by the layers."""
        if window not in self._masks:
            self._masks[window] = _build_mask(self, window)
        return self._masks[window]

    def bias(self, window: int | None, dtype: torch.dtype, groups: int) -> torch.Tensor:
        """The mask as SDPA's additive bias (0 / -inf) in ``dtype``, its query rows repeated
        ``groups`` times ([B, 1, groups * Q, keys]): what SDPA would convert a bool mask to in
        every layer, done once per step."""
        key = (window, dtype, groups)
        if key not in self._biases:
            mask = self.mask(window)
            bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
            self._biases[key] = bias.repeat(1, 1, groups, 1) if groups > 1 else bias
        return self._biases[key]


def _build_mask(meta: AttentionMetadata, window: int | None) -> torch.Tensor:
    num_keys = meta.block_tables.shape[1] * meta.block_size
    keys = torch.arange(num_keys, device=meta.prefix.device)
    mask = keys[None, None, :] < meta.prefix[:, :, None]  # [B, Q, keys]
    tree_rows = meta.tree_mask.shape[2]
    if tree_rows:
        rel = keys[None, :] - meta.tree_start[:, None]  # [B, keys]
        in_tree = (rel >= 0) & (rel < tree_rows)
        rel = rel.clamp(0, tree_rows - 1)
        seen = meta.tree_mask.gather(2, rel[:, None, :].expand(-1, meta.max_queries, -1))
        mask |= seen & in_tree[:, None, :]
    if window is not None:
        key_pos = keys[None, :].expand(meta.prefix.shape[0], -1)
        if tree_rows:
            key_pos = torch.where(in_tree, meta.tree_positions.gather(1, rel), key_pos)
        mask &= (meta.positions[:, :, None] - key_pos[:, None, :]) < window
    return mask[:, None]


def write_kv(pool: torch.Tensor, meta: AttentionMetadata, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store the step's new K/V rows ([N, kv_heads, head_dim] each) in their pool slots."""
    pool[0].index_copy_(0, meta.slot_mapping, k)
    pool[1].index_copy_(0, meta.slot_mapping, v)


def fold_gqa(device: torch.device) -> bool:
    """Whether grouped queries are folded into the query rows (CUDA) rather than left to SDPA's
    ``enable_gqa`` (elsewhere). Tests replace it to run the folded path on a CPU."""
    return device.type == "cuda"


def paged_attention(
    q: torch.Tensor,
    pool: torch.Tensor,
    meta: AttentionMetadata,
    scale: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of the step's queries ([N, heads, head_dim]) over their requests' rows in
    ``pool`` (new rows already written); returns [N, heads, head_dim]. ``softcap``: Gemma 2's
    attention-logit soft-capping, which SDPA cannot do (that path materialises the scores)."""
    n, heads, head_dim = q.shape
    batch, num_blocks = meta.block_tables.shape
    kv_heads, queries = pool.shape[2], meta.max_queries
    # One gather for the batch: [2, B, blocks, block_size, kv_heads, d] -> [2, B, kv_heads, keys, d]
    kv = pool.view(2, -1, meta.block_size * kv_heads * head_dim).index_select(1, meta.block_tables.view(-1))
    kv = kv.view(2, batch, num_blocks * meta.block_size, kv_heads, head_dim).transpose(2, 3)
    keys, values = kv[0], kv[1]
    if meta.dense:
        padded = q.view(batch, queries, heads, head_dim)
    else:
        padded = q.new_zeros(batch * queries, heads, head_dim).index_copy_(0, meta.query_index, q)
        padded = padded.view(batch, queries, heads, head_dim)
    padded = padded.transpose(1, 2)  # [B, heads, Q, d]
    groups = heads // kv_heads
    if softcap is not None:  # in the order of HF's eager attention: scale, cap, mask, fp32 softmax, cast back
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        scores = soft_cap((padded @ keys.transpose(-1, -2)) * (scale or head_dim**-0.5), softcap)
        weights = torch.softmax(scores.masked_fill(~meta.mask(sliding_window), float("-inf")), dim=-1,
                                dtype=torch.float32)
        out = (weights.to(q.dtype) @ values).transpose(1, 2)
    elif groups > 1 and fold_gqa(q.device):
        # A mask with enable_gqa falls back to the math kernel on CUDA, and repeating K/V heads
        # copies the whole context per layer: fold each KV head's query group into the query
        # rows instead ([B, kv_heads, groups * Q, d]), which the memory-efficient kernel takes.
        folded = padded.reshape(batch, kv_heads, groups * queries, head_dim)
        bias = meta.bias(sliding_window, q.dtype, groups)
        out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=bias, scale=scale)
        # Kernels may return it in [B, rows, heads, d] memory: unfold by views, then one copy below.
        out = out.unflatten(2, (groups, queries)).permute(0, 3, 1, 2, 4)  # [B, Q, kv_heads, groups, d]
    else:
        bias = meta.bias(sliding_window, q.dtype, 1)
        out = F.scaled_dot_product_attention(padded, keys, values, attn_mask=bias, scale=scale, enable_gqa=groups > 1)
        out = out.transpose(1, 2)
    out = out.reshape(batch * queries, heads, head_dim)
    return out if meta.dense else out.index_select(0, meta.query_index)
