"""Tensor parallelism applied to a Transformer from outside (gpt-fast style).

Each rank keeps 1/world of the attention heads and of the MLP's intermediate features:
q/k/v and gate/up are column-parallel (a slice of their output rows); o_proj and down_proj
are row-parallel (a slice of their input columns) and all-reduce their partial sums; the
residual the model hands them (``proj(h, residual=x)``) joins rank 0's partial sum only, in its
matmul, so the reduced sum holds it once and no rank runs a separate add (with a bias, it is
added last, in the unsharded order). Fused
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

Invariant: ``tp_slice`` is the one description of "which dim, which slices" per parameter
name. ``shard_model`` cuts in-memory tensors with it and the loader reads exactly those
slices from safetensors (``TensorParallel``, models/loader.py), so a model built on the meta
device, sharded, then filled from the checkpoint equals a loaded-then-sharded one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from specinfer_dist.errors import InvalidConfigError
from specinfer_dist.models.layers import head_dim
from specinfer_dist.models.linear import linear
from specinfer_dist.models.transformer import Transformer

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "qkv_proj", "gate_up_proj")  # dim 0
ROW_PARALLEL = ("o_proj", "down_proj")  # weight: dim 1; bias whole (added once, after the all-reduce)
VOCAB_PARALLEL = ("lm_head",)  # weight: dim 0 in ceil(vocab / world) rows, the last rank zero-padded


@dataclass(frozen=True)
class TPSlice:
    """Ranges ``pieces`` of dim ``dim`` of the full tensor, concatenated in order, then
    zero-padded to ``length`` along that dim."""

    dim: int
    pieces: tuple[tuple[int, int], ...]
    length: int

    def indices(self, ndim: int) -> list[tuple[slice, ...]]:
        """One index per piece (e.g. for a safetensors ``get_slice``)."""
        return [tuple(slice(a, b) if d == self.dim else slice(None) for d in range(ndim)) for a, b in self.pieces]

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """This slice of the full ``tensor`` in its own storage (so the full one can be freed)."""
        part = torch.cat([tensor.narrow(self.dim, a, b - a) for a, b in self.pieces], dim=self.dim)
        pad = self.length - part.shape[self.dim]
        if pad:
            shape = list(part.shape)
            shape[self.dim] = pad
            part = torch.cat([part, part.new_zeros(shape)], dim=self.dim)
        return part.detach().clone()


def _column_parts(module: str, rows: int, config: Any) -> tuple[int, ...]:
    """Sizes of the independently split parts of a column-parallel projection's output rows."""
    if module == "qkv_proj":
        hd = head_dim(config)
        return (config.num_attention_heads * hd, config.num_key_value_heads * hd, config.num_key_value_heads * hd)
    if module == "gate_up_proj":
        return (config.intermediate_size,) * 2
    return (rows,)


def tp_slice(name: str, shape: Sequence[int], rank: int, world_size: int, config: Any) -> TPSlice | None:
    """Which part of parameter ``name`` (full ``shape``) rank ``rank`` keeps; None: all of it."""
    if world_size == 1:
        return None
    *_, module, kind = name.split(".")
    if module in COLUMN_PARALLEL:
        pieces, start = [], 0
        for size in _column_parts(module, shape[0], config):
            per_rank = size // world_size
            pieces.append((start + rank * per_rank, start + (rank + 1) * per_rank))
            start += size
        return TPSlice(0, tuple(pieces), sum(b - a for a, b in pieces))
    if module in ROW_PARALLEL and kind == "weight":
        per_rank = shape[1] // world_size
        return TPSlice(1, ((rank * per_rank, (rank + 1) * per_rank),), per_rank)
    if module in VOCAB_PARALLEL and kind == "weight":
        per_rank = -(-shape[0] // world_size)
        start = min(rank * per_rank, shape[0])
        return TPSlice(0, ((start, min(start + per_rank, shape[0])),), per_rank)
    return None


def check_divisible(model: Transformer, world_size: int) -> None:
    config = model.config
    sizes = {"attention heads": config.num_attention_heads, "KV heads": config.num_key_value_heads,
             "intermediate size": config.intermediate_size}
    bad = [f"{name} ({n})" for name, n in sizes.items() if n % world_size]
    if bad:
        raise InvalidConfigError(f"tensor parallelism {world_size} must divide the model's {' and '.join(bad)}")


def shard_model(model: Transformer, rank: int, world_size: int, group: dist.ProcessGroup | None = None) -> Transformer:
    """Keep this rank's shard of ``model`` (in place; collectives run on ``group``) and return it.
    Works on the meta device too: the loader shards an empty model, then fills the slices."""
    if world_size == 1:
        return model
    check_divisible(model, world_size)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.num_heads //= world_size
        attn.num_kv_heads //= world_size
        attn.o_proj = RowParallelLinear(attn.o_proj, rank, group)
        mlp.down_proj = RowParallelLinear(mlp.down_proj, rank, group)
    model.lm_head = VocabParallelHead(model.lm_head, world_size, group)  # unties a tied head
    for name, param in list(model.named_parameters()):
        cut = tp_slice(name, param.shape, rank, world_size, model.config)
        if cut is not None:
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            setattr(module, attr, nn.Parameter(cut.take(param), requires_grad=False))
            if isinstance(module, nn.Linear):
                module.out_features = module.weight.shape[0]
    return model


@dataclass(frozen=True)
class TensorParallel:
    """Rank ``rank`` of ``world_size`` as the loader's Sharding (models/loader.py): it shards
    the empty model and reads only this rank's slices."""

    rank: int
    world_size: int
    group: dist.ProcessGroup | None = None

    def apply(self, model: Transformer) -> None:
        shard_model(model, self.rank, self.world_size, self.group)

    def index(self, name: str, shape: tuple[int, ...], config: Any) -> tuple[int, list[tuple[slice, ...]]] | None:
        cut = tp_slice(name, shape, self.rank, self.world_size, config)
        return None if cut is None else (cut.dim, cut.indices(len(shape)))


class RowParallelLinear(nn.Module):
    """A Linear whose input features are split across ranks: the partial products are summed
    by an all-reduce, then the bias is added once. A ``residual`` is added once too: by rank 0,
    in its partial product's matmul."""

    def __init__(self, linear: nn.Linear, rank: int, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.rank = rank
        self.group = group

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.bias is not None and residual is not None:  # residual + (x W + b), the unsharded order
            return residual + self.forward(x)
        out = linear(x, self.weight, residual=residual if self.rank == 0 else None)
        out = out.contiguous()  # collectives need contiguous memory
        dist.all_reduce(out, group=self.group)
        return out if self.bias is None else out + self.bias


class VocabParallelHead(nn.Module):
    """The LM head split by vocabulary rows; the logits are all-gathered (see module docstring)."""

    def __init__(self, head: nn.Linear, world_size: int, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.vocab_size = head.out_features
        self.weight = nn.Parameter(head.weight.detach(), requires_grad=False)  # a new Parameter: no tie
        self.world_size = world_size
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = linear(x, self.weight).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]
