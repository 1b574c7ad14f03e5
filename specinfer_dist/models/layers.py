"""The per-token pieces of our decoders: norms, rotary embeddings, embeddings and MLPs.

None of them sees a batch layout, a cache or a rank; each computes its Hugging Face
counterpart's formula with the same dtype casts in the same places, so fp32 logits match HF's
to rounding and bf16 runs follow HF's bf16 arithmetic. Where fewer ops give the same formula
(RoPE's addcmul, RMSNorm via the vector norm on the CPU) the results differ from HF's only by
float rounding (~1e-7 relative), never by an approximation. Parameter names are HF's.

Invariant: rotary frequencies are fp32 whatever the model dtype. ``RotaryEmbedding`` keeps its
buffers out of dtype casts (``model.to(torch.bfloat16)`` moves them, never rounds them), and
cos/sin are computed in fp32 and cast only at the end, as HF does.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from specinfer_dist.errors import ModelLoadError
from specinfer_dist.models.linear import FusedRows, Linear, fuse_rows


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class RMSNorm(nn.Module):
    """Llama's RMSNorm: ``w * norm(x)``, the weight applied after casting back to x's dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # norm(x) computes in fp32 and rounds once to x's dtype, as the reference does before the weight.
        return self.weight * rms_norm(x, self.eps)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """norm(x) in fp32, without the weight."""
        return rms_norm(x.float(), self.eps)


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps)`` over the last dim (the reference's formula)."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        # F.rms_norm is one kernel on CUDA but five ops on the CPU; mean(x^2) from |x| makes it four.
        n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        return x * torch.addcmul(_eps(eps), n, n, value=1 / x.shape[-1]).rsqrt_()
    return F.rms_norm(x, (x.shape[-1],), eps=eps)  # other dtypes: it computes in fp32 inside


@functools.cache
def _eps(eps: float) -> torch.Tensor:
    """eps as a CPU fp32 scalar, made once: a normal tensor even when first asked for under
    inference mode (training may use it later)."""
    with torch.inference_mode(False):
        return torch.tensor(eps, dtype=torch.float32)


class OffsetRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the weight is stored as an offset from 1, and ``(1 + w) * norm(x)`` is
    computed in fp32 before the cast (the reverse order of Llama's)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__(dim, eps)
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.normalize(x) * (1.0 + self.weight.float())).to(x.dtype)


class ScaledEmbedding(nn.Embedding):
    """Gemma's embedding, multiplied by sqrt(hidden_size) rounded to the model dtype (as HF does:
    in bf16 the factor for hidden 3072 is 55.5, not 55.43)."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__(vocab_size, hidden_size)
        # A buffer, so that model.to(dtype) rounds it exactly like HF's.
        self.register_buffer("embed_scale", torch.tensor(hidden_size**0.5), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)


def rope_parameters(config: PretrainedConfig, layer_type: str | None = None) -> dict:
    """The RoPE settings of one layer type (Gemma 3 has one set per type), or the model's only set."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if layer_type is not None:
        rope = dict(rope[layer_type])
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return rope


def rope_layer_types(config: PretrainedConfig) -> list[str] | None:
    """The layer types with their own RoPE settings (Gemma 3: sliding and full), else None."""
    rope = getattr(config, "rope_parameters", None) or {}
    if rope and all(isinstance(v, dict) for v in rope.values()):  # nested: one set per layer type
        return sorted(rope)
    return None


class RotaryEmbedding(nn.Module):
    """cos/sin of one RoPE variant (default, linear, llama3, yarn, longrope) for given positions.

    LongRoPE (Phi-3) has two frequency sets. HF picks one per forward: the long factors once the
    sequence is longer than ``original_max_position_embeddings`` (its ``generate()`` then
    re-encodes the whole sequence with them), the short ones before. We pick per position:
    positions below ``original_max_position_embeddings`` use the short factors, later ones the
    long factors, and cached keys are never re-encoded. So we equal HF exactly while a sequence
    stays within ``original_max_position_embeddings`` tokens; beyond it, the earlier keys keep
    their short-factor rotation where HF would recompute them.
    """

    def __init__(self, config: PretrainedConfig, layer_type: str | None = None) -> None:
        super().__init__()
        rope = rope_parameters(config, layer_type)
        rope_type = rope["rope_type"]
        kwargs = {} if layer_type is None else {"layer_type": layer_type}
        if rope_type == "default":
            dim = int(head_dim(config) * rope.get("partial_rotary_factor", 1.0))
            exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
            inv_freq, scaling = 1.0 / (rope["rope_theta"] ** exponents), 1.0
        else:  # architectures.check_supported has refused the types we cannot run
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None, **kwargs)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.long_from: int | None = None
        if rope_type == "longrope":
            self.long_from = rope["original_max_position_embeddings"]
            long_inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=self.long_from + 1, **kwargs)
            self.register_buffer("long_inv_freq", long_inv_freq.float(), persistent=False)
        self.scaling = scaling

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() / .bfloat16() would round the frequencies (at position 2048,
        # bf16 frequencies are off by radians). Keep the fp32 values; follow only device moves.
        fp32 = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, buf in fp32.items():
            self._buffers[name] = buf.to(self._buffers[name].device)
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for ``apply_rope`` ([tokens, rotary_dim] each); sin's first half is
        negated, which folds rotate_half's negation into the table (once per step, not per layer)."""
        inv_freq = self.inv_freq
        if self.long_from is not None:
            inv_freq = torch.where((positions >= self.long_from)[:, None], self.long_inv_freq, inv_freq)
        freqs = positions[:, None].float() * inv_freq  # fp32, whatever the model dtype
        sin = freqs.sin() * self.scaling
        return (freqs.cos() * self.scaling).to(dtype).repeat(1, 2), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x ([tokens, heads, head_dim]) by ``RotaryEmbedding``'s cos/sin ([tokens, rotary_dim]):
    HF's ``x * cos + rotate_half(x) * sin`` with the negation already in ``sin``. The second
    product and the sum are one ``addcmul`` (3 ops, not 4), which may fuse them into one
    rounding: equal to HF's within float rounding, no longer bitwise. With a partial rotary
    factor (Phi-4-mini) only the first rotary_dim features turn."""
    cos, sin = cos[:, None], sin[:, None]
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return torch.addcmul(x * cos, _swap_halves(x), sin)
    turn, keep = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((torch.addcmul(turn * cos, _swap_halves(turn), sin), keep), dim=-1)


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x2, x1), dim=-1)


def activation(config: PretrainedConfig) -> nn.Module:
    # Gemma names it hidden_activation (its hidden_act is a legacy alias).
    name = getattr(config, "hidden_activation", None) or config.hidden_act
    if name not in ACT2FN:
        raise ModelLoadError(f"unknown activation {name!r}")
    return ACT2FN[name]


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); at inference gate and up run as one matmul."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act = activation(config)
        self.gate_up: FusedRows | None = None  # set by fuse_projections

    def fuse_projections(self) -> None:
        if not (self.gate_up is not None and self.gate_up.intact()):
            self.gate_up = fuse_rows(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP's output, plus ``residual`` if given (added by the down projection's matmul)."""
        if self.gate_up is not None and self.gate_up.intact():
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down_proj(self.act(gate) * up, residual)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x), residual)


class FusedMLP(nn.Module):
    """Phi-3's gated MLP: one ``gate_up_proj`` whose output rows are [gate; up]."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = activation(config)

    def fuse_projections(self) -> None:
        """Fused already."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up, residual)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """Gemma's tanh soft-capping, element by element: cap * tanh(x / cap)."""
    return torch.tanh(x / cap) * cap
