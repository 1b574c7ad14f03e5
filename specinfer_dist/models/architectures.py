"""Which Hugging Face model types our decoder runs, how each differs from Llama, and what is refused.

A family here is only the structural differences (norm flavour, fused projections, q/k norms,
extra norms, embedding scale, whether attention logits are soft-capped). Everything numeric (RoPE variant and bases per layer type,
sliding windows per layer, attention scale, soft-capping) is read from the config itself, so
a supported family runs whatever settings of those its config carries.

Invariant: ``check_supported`` accepts a config only if ``Transformer`` reproduces the HF
model it describes; anything else raises ModelLoadError naming what is unsupported.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from specinfer_dist.errors import ModelLoadError
from specinfer_dist.models.layers import (
    OffsetRMSNorm,
    RMSNorm,
    rope_layer_types,
    rope_parameters,
)


@dataclass(frozen=True)
class Family:
    norm: type[nn.Module] = RMSNorm  # every RMSNorm of the model, q/k norms included
    qkv_bias: bool | None = None  # None: the config's attention_bias
    o_bias: bool | None = None  # None: the config's attention_bias
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3)
    fused: bool = False  # one qkv_proj and one gate_up_proj (Phi-3)
    sandwich_norms: bool = False  # Gemma: attention and MLP outputs normalised before the residual add
    scaled_embedding: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    # Gemma 2 soft-caps attention logits at attn_logit_softcapping. HF's Gemma 3 ignores that field
    # (its q/k norms replaced the cap; released configs set it to null), and so do we.
    attn_softcap: bool = False


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(qkv_bias=True, o_bias=False),
    "qwen3": Family(qk_norm=True),
    "gemma2": Family(norm=OffsetRMSNorm, sandwich_norms=True, scaled_embedding=True, attn_softcap=True),
    "gemma3_text": Family(norm=OffsetRMSNorm, qk_norm=True, sandwich_norms=True, scaled_embedding=True),
    "phi3": Family(fused=True),
}
# HF classes behind the model types, for messages and the README.
CAUSAL_LM_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
_EXPERT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")


def family(config: PretrainedConfig) -> Family:
    check_supported(config)
    return FAMILIES[config.model_type]


def check_supported(config: PretrainedConfig) -> None:
    """Raise ModelLoadError, naming the reason, unless we run this config exactly."""
    model_type = config.model_type
    name = ", ".join(getattr(config, "architectures", None) or []) or model_type
    if getattr(config, "vision_config", None) is not None:
        hint = "; load its text model (Gemma3ForCausalLM, model_type gemma3_text)" if model_type == "gemma3" else ""
        raise ModelLoadError(f"{name} has a vision tower (vision_config): only text-only decoders are supported{hint}")
    experts = next((f"{k}={getattr(config, k)}" for k in _EXPERT_FIELDS if getattr(config, k, None)), None)
    if experts or "moe" in model_type or model_type == "mixtral":
        detail = f" ({experts})" if experts else ""
        raise ModelLoadError(f"{name} is a mixture-of-experts model{detail}: not supported, only dense decoders are")
    if model_type not in FAMILIES:
        supported = ", ".join(f"{t} ({c})" for t, c in CAUSAL_LM_CLASSES.items())
        raise ModelLoadError(f"unsupported model type {model_type!r}; supported: {supported}")
    if getattr(config, "use_bidirectional_attention", False):
        raise ModelLoadError(f"{name} uses bidirectional attention (an embedding model): not a causal LM")
    for layer_type in rope_layer_types(config) or [None]:
        rope_type = rope_parameters(config, layer_type)["rope_type"]
        if rope_type == "dynamic":
            # Dynamic NTK changes frequencies with sequence length; trees need fixed ones.
            raise ModelLoadError("rope_type 'dynamic' is not supported")
        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            raise ModelLoadError(f"unknown rope_type {rope_type!r}")
