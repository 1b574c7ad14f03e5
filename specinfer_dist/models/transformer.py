"""A plain PyTorch Llama-family decoder (Llama, Qwen2, Mistral) that runs token trees.

One forward takes a flat run of new tokens from several requests. Each request brings
its own KV store and a boolean mask over [its stored rows + its new tokens], so a whole
token tree (or a prompt, or one token) is one pass. Parameter names equal Hugging Face's
``*ForCausalLM`` state dicts, so checkpoints load without renaming. The model knows
nothing of ranks: tensor parallelism is applied to it from outside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from specinfer_dist.errors import ModelLoadError
from specinfer_dist.models.linear import Linear


class KVStore(Protocol):
    """What attention needs from a request's cache (see runtime/kv_cache.py)."""

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's k/v ([kv_heads, n, head_dim]) and return all rows so far."""
        ...


@dataclass
class Segment:
    """One request's slice ``[start, end)`` of a flattened forward batch."""

    start: int
    end: int
    cache: KVStore
    mask: torch.Tensor  # bool [end - start, rows stored before + (end - start)]; True = may attend


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like the reference implementation, so bf16 runs agree with it.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        rope = dict(getattr(config, "rope_parameters", None) or {"rope_type": "default"})
        rope_type = rope.get("rope_type", "default")
        if rope_type == "dynamic":
            # Dynamic NTK changes frequencies with sequence length; trees need fixed ones.
            raise ModelLoadError("rope_type 'dynamic' is not supported")
        if rope_type == "default":
            head_dim = _head_dim(config)
            theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            scaling = 1.0
        elif rope_type in ROPE_INIT_FUNCTIONS:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
        else:
            raise ModelLoadError(f"unknown rope_type {rope_type!r}")
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.scaling = scaling

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [heads, tokens, head_dim]; cos/sin: [tokens, head_dim]
    return x * cos + _rotate_half(x) * sin


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = _head_dim(config)
        qkv_bias = config.model_type == "qwen2" or getattr(config, "attention_bias", False)
        o_bias = config.model_type != "qwen2" and getattr(config, "attention_bias", False)
        hidden = config.hidden_size
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=o_bias)
        self.sliding_window = _sliding_window(config, layer)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        segments: Sequence[Segment],
    ) -> torch.Tensor:
        n = x.shape[0]
        # Head counts come from the weights, so a tensor-parallel shard with fewer heads just works.
        q = self.q_proj(x).view(n, -1, self.head_dim).transpose(0, 1)
        k = self.k_proj(x).view(n, -1, self.head_dim).transpose(0, 1)
        v = self.v_proj(x).view(n, -1, self.head_dim).transpose(0, 1)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        out = torch.empty_like(q)
        for seg in segments:
            keys, values = seg.cache.append(self.layer, k[:, seg.start : seg.end], v[:, seg.start : seg.end])
            mask = seg.mask
            if self.sliding_window is not None:
                mask = mask & self._window_mask(positions[seg.start : seg.end], keys.shape[1], seg)
            out[:, seg.start : seg.end] = F.scaled_dot_product_attention(
                q[None, :, seg.start : seg.end], keys[None], values[None], attn_mask=mask, enable_gqa=True
            )[0]
        return self.o_proj(out.transpose(0, 1).reshape(n, -1))

    def _window_mask(self, q_pos: torch.Tensor, num_keys: int, seg: Segment) -> torch.Tensor:
        # Stored rows hold consecutive positions 0..stored-1; the new rows' positions are q_pos.
        stored = num_keys - q_pos.shape[0]
        k_pos = torch.cat((torch.arange(stored, device=q_pos.device), q_pos))
        return (q_pos[:, None] - k_pos[None, :]) < self.sliding_window


def _sliding_window(config: PretrainedConfig, layer: int) -> int | None:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and layer_types[layer] != "sliding_attention"):
        return None
    return window


class MLP(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, positions, segments):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, segments)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class Transformer(nn.Module):
    """Causal LM over flattened multi-request token runs (see module docstring)."""

    SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        if config.model_type not in self.SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported architecture {config.model_type!r}; supported: {', '.join(self.SUPPORTED_ARCHITECTURES)}"
            )
        self.config = config
        self.model = Decoder(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        """KV heads this module holds (fewer than the config's on a tensor-parallel shard)."""
        return self.model.layers[0].self_attn.k_proj.out_features // self.head_dim

    @property
    def head_dim(self) -> int:
        return _head_dim(self.config)

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        segments: Sequence[Segment],
        logit_rows: torch.Tensor | None = None,
        aux_layers: Sequence[int] = (),
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ([len(logit_rows) or tokens, vocab]) for a flat run of new tokens.

        Only ``logit_rows`` get the vocabulary projection: a prompt's earlier tokens need none.
        With ``aux_layers`` (feature drafters, models/eagle3.py) it returns (logits, aux): the
        residual stream entering each of those layers, concatenated, for every token [tokens, k * hidden].
        """
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(positions, x.dtype)
        captured = {}
        for i, layer in enumerate(self.model.layers):
            if i in aux_layers:
                captured[i] = x
            x = layer(x, cos, sin, positions, segments)
        if logit_rows is not None:
            x = x[logit_rows]
        logits = self.lm_head(self.model.norm(x))
        return (logits, torch.cat([captured[i] for i in aux_layers], dim=-1)) if aux_layers else logits
