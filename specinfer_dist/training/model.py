"""The SSM: the LLM's first layers plus its final norm, on the LLM's own frozen embedding and
(tied) LM head. Only the layers and the norm are trained and shipped.

Why: starting from the LLM's own first layers keeps the SSM's hidden states in the space the
shared head reads, so distillation starts far above a random model; sharing the 49152x576
embedding keeps each shipped 1-layer SSM at ~7 MB (fp16) instead of ~64 MB.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import safetensors.torch
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from specinfer_dist.errors import InvalidConfigError
from specinfer_dist.models.cache import atomic_dir
from specinfer_dist.models.loader import SHARED_FROM_LLM_KEY

SHARED = ["model.embed_tokens.weight", "lm_head.weight"]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "tokenizer.model", "vocab.json", "merges.txt")


def init_ssm(llm: PreTrainedModel, num_layers: int) -> PreTrainedModel:
    """A ``num_layers``-layer copy of the LLM's first layers and final norm, sharing (not
    copying) the LLM's embedding and head, which stay frozen."""
    if not 1 <= num_layers <= llm.config.num_hidden_layers:
        raise InvalidConfigError(
            f"an SSM needs 1 to {llm.config.num_hidden_layers} layers (the LLM's count), got {num_layers}"
        )
    if not llm.config.tie_word_embeddings:
        raise InvalidConfigError("SSMs share the LLM's tied embedding/LM head; this LLM's head is untied")
    config = copy.deepcopy(llm.config)
    config.num_hidden_layers = num_layers
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer settings must match the count
        config.layer_types = config.layer_types[:num_layers]
    setattr(config, SHARED_FROM_LLM_KEY, list(SHARED))
    ssm = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    ssm.model.embed_tokens = llm.model.embed_tokens
    ssm.lm_head = llm.lm_head
    for i in range(num_layers):
        ssm.model.layers[i].load_state_dict(llm.model.layers[i].state_dict())
    ssm.model.norm.load_state_dict(llm.model.norm.state_dict())
    ssm.requires_grad_(True)
    ssm.model.embed_tokens.requires_grad_(False)
    ssm.lm_head.requires_grad_(False)
    return ssm


def trainable_state(ssm: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Everything but the shared tensors: exactly what a checkpoint stores."""
    return {k: v for k, v in ssm.state_dict().items() if k not in SHARED}


def save_ssm(ssm: PreTrainedModel, out_dir: Path, llm_dir: Path, dtype: torch.dtype = torch.float16) -> None:
    """Write an SSM checkpoint: config.json (naming the shared tensors), model.safetensors with
    only the trained tensors, and the LLM's tokenizer files (so vocabularies can be compared)."""
    state = {k: v.detach().to(dtype).contiguous() for k, v in trainable_state(ssm).items()}
    with atomic_dir(Path(out_dir)) as tmp:
        safetensors.torch.save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        ssm.config.to_json_file(tmp / "config.json")
        for name in _TOKENIZER_FILES:
            if (Path(llm_dir) / name).is_file():
                shutil.copy(Path(llm_dir) / name, tmp / name)
