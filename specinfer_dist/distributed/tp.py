"""Tensor parallelism applied to a loaded Transformer from outside (gpt-fast style).

Each rank keeps 1/world of the attention heads and of the MLP's intermediate features:
q/k/v and gate/up are column-parallel (a slice of their output rows); o_proj and down_proj
are row-parallel (a slice of their input columns) and all-reduce their partial sums. Fused
projections (Phi-3's qkv_proj = [q; k; v] and gate_up_proj = [gate; up]) are sliced part by
part, so each rank holds [q_r; k_r; v_r] and [gate_r; up_r]. Query and KV heads are split in
the same proportion, so every GQA group stays on one rank. Per-head q/k norms (Qwen3, Gemma 3)
have one head_dim weight shared by all heads: replicated. Soft-capping is per element and
needs nothing. The model code never sees ranks: attention reads its head counts from
``num_heads``/``num_kv_heads``, which this module divides, and KV caches are sized by
``model.num_kv_heads``.

The LM head is split by vocabulary and its logits all-gathered: the head is the largest
single matrix of a small LLM (SmolLM2: 49152 x 576), while the gathered logits are only the
tree's rows. Every rank thus returns the full logits, exactly like the unsharded model. The
embedding and the norms stay whole on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from specinfer_dist.errors import InvalidConfigError
from specinfer_dist.models.linear import linear
from specinfer_dist.models.transformer import Transformer


def shard_model(model: Transformer, rank: int, world_size: int, group: dist.ProcessGroup | None = None) -> Transformer:
    """Keep this rank's shard of ``model`` (in place; collectives run on ``group``) and return it."""
    if world_size == 1:
        return model
    heads = model.model.layers[0].self_attn.num_heads
    sizes = {"attention heads": heads, "KV heads": model.num_kv_heads, "intermediate size": model.config.intermediate_size}
    bad = [f"{name} ({n})" for name, n in sizes.items() if n % world_size]
    if bad:
        raise InvalidConfigError(f"tensor parallelism {world_size} must divide the model's {' and '.join(bad)}")
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        q_size, kv_size = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
        if attn.fused:
            _keep_rows(attn.qkv_proj, rank, world_size, (q_size, kv_size, kv_size))
            _keep_rows(mlp.gate_up_proj, rank, world_size, (model.config.intermediate_size,) * 2)
        else:
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                _keep_rows(proj, rank, world_size, (proj.out_features,))
        attn.num_heads //= world_size
        attn.num_kv_heads //= world_size
        attn.o_proj = RowParallelLinear(attn.o_proj, rank, world_size, group)
        mlp.down_proj = RowParallelLinear(mlp.down_proj, rank, world_size, group)
    model.lm_head = VocabParallelHead(model.lm_head, rank, world_size, group)
    return model


def _keep_rows(linear: nn.Linear, rank: int, world_size: int, parts: tuple[int, ...]) -> None:
    """Column parallelism: of each part of the output features (``parts`` sizes, in order), this
    rank's contiguous slice (whole heads), concatenated in the same order."""

    def mine(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([part.chunk(world_size, dim=0)[rank] for part in t.split(parts, dim=0)])

    linear.weight = _param(mine(linear.weight))
    if linear.bias is not None:
        linear.bias = _param(mine(linear.bias))
    linear.out_features = linear.weight.shape[0]


def _param(tensor: torch.Tensor) -> nn.Parameter:
    # A copy, so the unsharded tensor can be freed.
    return nn.Parameter(tensor.detach().clone(), requires_grad=False)


class RowParallelLinear(nn.Module):
    """A Linear whose input features are split across ranks: the partial products are summed
    by an all-reduce, then the bias is added once."""

    def __init__(self, linear: nn.Linear, rank: int, world_size: int, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.weight = _param(linear.weight.chunk(world_size, dim=1)[rank])
        self.bias = linear.bias
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x, self.weight)
        dist.all_reduce(out, group=self.group)
        return out if self.bias is None else out + self.bias


class VocabParallelHead(nn.Module):
    """The LM head split by vocabulary rows; the logits are all-gathered (see module docstring).
    The last shard is zero-padded so every rank gathers equal sizes."""

    def __init__(self, head: nn.Linear, rank: int, world_size: int, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.vocab_size = head.out_features
        per_rank = -(-self.vocab_size // world_size)
        rows = head.weight[rank * per_rank : (rank + 1) * per_rank]
        self.weight = _param(F.pad(rows, (0, 0, 0, per_rank - rows.shape[0])))
        self.world_size = world_size
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = linear(x, self.weight)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]
