"""A plain PyTorch Llama-family decoder (Llama, Qwen2, Mistral) that runs token trees.

One forward takes a flat run of new tokens from several requests (prompt chunks, token
trees, single tokens) with an ``AttentionMetadata`` and one KV pool tensor per layer
(models/attention.py): each layer writes the new K/V rows into the pool and runs one
attention call for the whole batch. Parameter names equal Hugging Face's
``*ForCausalLM`` state dicts, so checkpoints load without renaming. The model knows
nothing of ranks: tensor parallelism is applied to it from outside.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from specinfer_dist.errors import ModelLoadError
from specinfer_dist.models.attention import AttentionMetadata, paged_attention, write_kv
from specinfer_dist.models.linear import Linear


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
    # x: [tokens, heads, head_dim]; cos/sin: [tokens, head_dim]
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


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
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata, kv: torch.Tensor
    ) -> torch.Tensor:
        n = x.shape[0]
        # Head counts come from the weights, so a tensor-parallel shard with fewer heads just works.
        q = self.q_proj(x).view(n, -1, self.head_dim)
        k = self.k_proj(x).view(n, -1, self.head_dim)
        v = self.v_proj(x).view(n, -1, self.head_dim)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        write_kv(kv, meta, k, v)
        out = paged_attention(q, kv, meta, sliding_window=self.sliding_window)
        return self.o_proj(out.reshape(n, -1))


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

    def forward(self, x, cos, sin, meta, kv):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, kv)
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
        meta: AttentionMetadata,
        kv: Sequence[torch.Tensor],
        logit_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ([len(logit_rows) or tokens, vocab]) for a flat run of new tokens; ``kv[i]``
        is layer i's pool, where this forward's K/V rows are written.

        Only ``logit_rows`` get the vocabulary projection: a prompt's earlier tokens need none.
        """
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(positions, x.dtype)
        for layer, layer_kv in zip(self.model.layers, kv):
            x = layer(x, cos, sin, meta, layer_kv)
        if logit_rows is not None:
            x = x[logit_rows]
        return self.lm_head(self.model.norm(x))
