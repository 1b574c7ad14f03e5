"""A plain PyTorch decoder for the Llama family and its relatives (Llama 2/3.x, Mistral, Qwen2,
Qwen3, Gemma 2, Gemma 3 text, Phi-3/4) that runs token trees.

One forward takes a flat run of new tokens from several requests (prompt chunks, token
trees, single tokens) with an ``AttentionMetadata`` and one KV pool tensor per layer
(models/attention.py): each layer writes the new K/V rows into the pool and runs one
attention call for the whole batch. Parameter names equal Hugging Face's
``*ForCausalLM`` state dicts, so checkpoints load without renaming. The model knows
nothing of ranks: tensor parallelism is applied to it from outside (it reads head counts
from ``Attention.num_heads``/``num_kv_heads``, which a shard divides). How the families
differ, and what is refused: ``models/architectures.py``; the per-token pieces: ``models/layers.py``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from transformers import PretrainedConfig

from specinfer_dist.models.architectures import Family, family
from specinfer_dist.models.attention import StepAttention
from specinfer_dist.models.layers import (
    MLP,
    FusedMLP,
    RotaryEmbedding,
    ScaledEmbedding,
    apply_rope,
    head_dim,
    rope_layer_types,
    softcap,
)
from specinfer_dist.models.linear import FusedRows, Linear, fuse_rows


class Attention(nn.Module):
    """Self-attention over the flattened run. Per layer it holds everything the attention core
    needs besides q/k/v: ``scale`` (SDPA's, 1/sqrt(query_pre_attn_scalar) for Gemma),
    ``softcap`` (Gemma 2's attention-logit soft-capping, else None), ``sliding_window``
    (None on global layers) and ``rope`` (which of the decoder's rotary embeddings it uses)."""

    def __init__(self, config: PretrainedConfig, layer: int, fam: Family) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim(config)
        bias = getattr(config, "attention_bias", False)
        qkv_bias = bias if fam.qkv_bias is None else fam.qkv_bias
        o_bias = bias if fam.o_bias is None else fam.o_bias
        hidden, q_size, kv_size = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if fam.fused:  # Phi-3: output rows [q; k; v]
            self.qkv_proj = Linear(hidden, q_size + 2 * kv_size, bias=qkv_bias)
        else:
            self.q_proj = Linear(hidden, q_size, bias=qkv_bias)
            self.k_proj = Linear(hidden, kv_size, bias=qkv_bias)
            self.v_proj = Linear(hidden, kv_size, bias=qkv_bias)
        self.o_proj = Linear(q_size, hidden, bias=o_bias)
        self.fused = fam.fused
        self.qkv: FusedRows | None = None  # set by fuse_projections
        # Per-head norms (one weight of head_dim, shared by every head, so replicated under TP).
        self.q_norm = fam.norm(self.head_dim, config.rms_norm_eps) if fam.qk_norm else None
        self.k_norm = fam.norm(self.head_dim, config.rms_norm_eps) if fam.qk_norm else None
        self.sliding_window = _sliding_window(config, layer)
        self.rope = _rope_key(config, layer)
        self.scale = float(getattr(config, "query_pre_attn_scalar", None) or self.head_dim) ** -0.5
        self.softcap: float | None = getattr(config, "attn_logit_softcapping", None) if fam.attn_softcap else None

    def fuse_projections(self) -> None:
        """One matmul for q, k and v at inference (see ``fuse_rows``); Phi-3's are fused already."""
        if not self.fused and not (self.qkv is not None and self.qkv.intact()):
            self.qkv = fuse_rows(self.q_proj, self.k_proj, self.v_proj)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """[tokens, q + k + v features]."""
        if self.fused:
            return self.qkv_proj(x)
        if self.qkv is not None and self.qkv.intact():
            return self.qkv(x)
        return torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), dim=-1)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: StepAttention, kv: torch.Tensor | None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The attention output, plus ``residual`` if given (added by o_proj's matmul)."""
        n = x.shape[0]
        # Head counts are attributes a tensor-parallel shard divides (see distributed/tp.py).
        heads, kv_heads, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self._project(x)
        v = qkv[:, (heads + kv_heads) * d :].view(n, kv_heads, d)
        if self.q_norm is None:  # q and k are adjacent rows: rotate both in one go
            qk = apply_rope(qkv[:, : (heads + kv_heads) * d].view(n, heads + kv_heads, d), cos, sin)
            q, k = qk[:, :heads], qk[:, heads:]
        else:
            q = apply_rope(self.q_norm(qkv[:, : heads * d].view(n, heads, d)), cos, sin)
            k = apply_rope(self.k_norm(qkv[:, heads * d : (heads + kv_heads) * d].view(n, kv_heads, d)), cos, sin)
        out = meta.attend(q, k, v, kv, self.scale, self.sliding_window, self.softcap)
        return self.o_proj(out.reshape(n, -1), residual)


def _sliding_window(config: PretrainedConfig, layer: int) -> int | None:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and layer_types[layer] != "sliding_attention"):
        return None
    return window


def _rope_key(config: PretrainedConfig, layer: int) -> str:
    """Which rotary embedding a layer uses: its layer type where types have their own (Gemma 3)."""
    return config.layer_types[layer] if rope_layer_types(config) else "all"


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, layer: int, fam: Family) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer, fam)
        self.mlp = FusedMLP(config) if fam.fused else MLP(config)
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = fam.norm(hidden, eps)
        self.post_attention_layernorm = fam.norm(hidden, eps)  # Llama: before the MLP; Gemma: after attention
        self.sandwich = fam.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = fam.norm(hidden, eps)
            self.post_feedforward_layernorm = fam.norm(hidden, eps)

    def forward(
        self, x: torch.Tensor, rope: dict[str, tuple[torch.Tensor, torch.Tensor]], meta: StepAttention,
        kv: torch.Tensor | None,
    ) -> torch.Tensor:
        cos, sin = rope[self.self_attn.rope]
        if not self.sandwich:  # x + proj(h) as proj(h, residual=x): the add runs in the matmul
            x = self.self_attn(self.input_layernorm(x), cos, sin, meta, kv, residual=x)
            return self.mlp(self.post_attention_layernorm(x), residual=x)
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, meta, kv))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Decoder(nn.Module):
    def __init__(self, config: PretrainedConfig, fam: Family) -> None:
        super().__init__()
        embedding = ScaledEmbedding if fam.scaled_embedding else nn.Embedding
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, fam) for i in range(config.num_hidden_layers))
        self.norm = fam.norm(config.hidden_size, config.rms_norm_eps)
        layer_types = rope_layer_types(config)
        self.rotary_emb = nn.ModuleDict(
            {t: RotaryEmbedding(config, t) for t in layer_types} if layer_types else {"all": RotaryEmbedding(config)}
        )


class Transformer(nn.Module):
    """Causal LM over flattened multi-request token runs (see module docstring)."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        fam = family(config)  # raises ModelLoadError for what we do not run
        self.config = config
        self.model = Decoder(config, fam)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.final_softcap: float | None = getattr(config, "final_logit_softcapping", None)

    def fuse_projections(self) -> "Transformer":
        """Run q/k/v and gate/up as one matmul each (inference; names and state_dict unchanged)."""
        for layer in self.model.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()
        return self

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        """KV heads this module holds (fewer than the config's on a tensor-parallel shard)."""
        return self.model.layers[0].self_attn.num_kv_heads

    @property
    def head_dim(self) -> int:
        return head_dim(self.config)

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: StepAttention,
        kv: Sequence[torch.Tensor],
        logit_rows: torch.Tensor | None = None,
        aux_layers: Sequence[int] = (),
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ([len(logit_rows) or tokens, vocab]) for a flat run of new tokens; ``kv[i]``
        is layer i's pool, where this forward's K/V rows are written.

        Only ``logit_rows`` get the vocabulary projection: a prompt's earlier tokens need none.
        With ``aux_layers`` (feature drafters, models/eagle3.py) it returns (logits, aux): the
        residual stream entering each of those layers, concatenated, for every token [tokens, k * hidden].
        """
        x = self.model.embed_tokens(input_ids)
        rope = {key: emb(positions, x.dtype) for key, emb in self.model.rotary_emb.items()}
        captured = {}
        for i, (layer, layer_kv) in enumerate(zip(self.model.layers, kv)):
            if i in aux_layers:
                captured[i] = x
            x = layer(x, rope, meta, layer_kv)
        if logit_rows is not None:
            x = x[logit_rows]
        logits = self.lm_head(self.model.norm(x))
        logits = logits if self.final_softcap is None else softcap(logits, self.final_softcap)
        return (logits, torch.cat([captured[i] for i in aux_layers], dim=-1)) if aux_layers else logits
