"""Tensor parallelism applied to a Transformer from outside (gpt-fast style).

Each rank keeps 1/world of the attention heads and of the MLP's intermediate features:
q/k/v and gate/up are column-parallel (a slice of their output rows); o_proj and down_proj
are row-parallel (a slice of their input columns) and all-reduce their partial sums. Query
and KV heads are split in the same proportion, so every GQA group stays on one rank. The
model code never sees ranks: attention reads head counts from weight shapes and KV caches
are sized by ``model.num_kv_heads``.

The LM head is split by vocabulary and its logits all-gathered: the head is the largest
single matrix of a small LLM (SmolLM2: 49152 x 576), while the gathered logits are only the
tree's rows. Every rank thus returns the full logits, exactly like the unsharded model. The
embedding and the norms stay whole on every rank.

Invariant: ``tp_slice`` is the one description of "which dim, which slice" per parameter
name. ``shard_model`` cuts in-memory tensors with it and the loader reads exactly those
slices from safetensors (models/loader.py), so a model built on the meta device, sharded,
then filled from the checkpoint equals a loaded-then-sharded one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from specinfer_dist.errors import InvalidConfigError
from specinfer_dist.models.linear import linear
from specinfer_dist.models.transformer import Transformer

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # weight and bias: dim 0
ROW_PARALLEL = ("o_proj", "down_proj")  # weight: dim 1; bias whole (added once, after the all-reduce)
VOCAB_PARALLEL = ("lm_head",)  # weight: dim 0 in ceil(vocab / world) rows, the last rank zero-padded


@dataclass(frozen=True)
class TPSlice:
    """Rows/columns ``[start, stop)`` of dim ``dim`` of the full tensor, zero-padded to ``length``."""

    dim: int
    start: int
    stop: int
    length: int

    def index(self, ndim: int) -> tuple[slice, ...]:
        """The index that reads this slice (e.g. from a safetensors ``get_slice``)."""
        return tuple(slice(self.start, self.stop) if d == self.dim else slice(None) for d in range(ndim))

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """This slice of the full ``tensor`` in its own storage (so the full one can be freed)."""
        part = tensor.narrow(self.dim, self.start, self.stop - self.start)
        pad = self.length - (self.stop - self.start)
        if pad:  # F.pad counts dims from the last one, two entries each
            part = F.pad(part, [0, 0] * (tensor.dim() - 1 - self.dim) + [0, pad])
        return part.detach().clone()


def tp_slice(name: str, shape: Sequence[int], rank: int, world_size: int) -> TPSlice | None:
    """Which part of parameter ``name`` (full ``shape``) rank ``rank`` keeps; None: all of it."""
    if world_size == 1:
        return None
    *_, module, kind = name.split(".")
    if module in COLUMN_PARALLEL:
        dim = 0
    elif module in ROW_PARALLEL and kind == "weight":
        dim = 1
    elif module in VOCAB_PARALLEL and kind == "weight":
        per_rank = -(-shape[0] // world_size)
        start = min(rank * per_rank, shape[0])
        return TPSlice(0, start, min(start + per_rank, shape[0]), per_rank)
    else:
        return None
    per_rank = shape[dim] // world_size
    return TPSlice(dim, rank * per_rank, (rank + 1) * per_rank, per_rank)


def check_divisible(model: Transformer, world_size: int) -> None:
    config = model.config
    heads = config.num_attention_heads
    sizes = {"attention heads": heads, "KV heads": config.num_key_value_heads, "intermediate size": config.intermediate_size}
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
        attn.o_proj = RowParallelLinear(attn.o_proj, group)
        mlp.down_proj = RowParallelLinear(mlp.down_proj, group)
    model.lm_head = VocabParallelHead(model.lm_head, world_size, group)  # unties a tied head
    for name, param in list(model.named_parameters()):
        cut = tp_slice(name, param.shape, rank, world_size)
        if cut is not None:
            module_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module_name), attr, nn.Parameter(cut.take(param), requires_grad=False))
    for layer in model.model.layers:
        for proj in (*(getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj")), layer.mlp.gate_proj, layer.mlp.up_proj):
            proj.out_features = proj.weight.shape[0]
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

    def index(self, name: str, shape: tuple[int, ...]) -> tuple[slice, ...] | None:
        cut = tp_slice(name, shape, self.rank, self.world_size)
        return None if cut is None else cut.index(len(shape))


class RowParallelLinear(nn.Module):
    """A Linear whose input features are split across ranks: the partial products are summed
    by an all-reduce, then the bias is added once."""

    def __init__(self, linear: nn.Linear, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x, self.weight)
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
        local = linear(x, self.weight)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]
