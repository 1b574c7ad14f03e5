"""EAGLE-3 draft heads, in the checkpoint format vLLM and SGLang load (SafeAILab EAGLE, SpecForge).

A head reads three of the LLM's hidden states per token (a low, a middle and a high layer),
fuses them (``fc``: 3 * target_hidden -> hidden), and runs ONE decoder layer (``midlayer``)
whose attention input is [input_layernorm(embedding of the next token), hidden_norm(fused)],
hence q/k/v projections of width 2 * hidden. ``norm`` + ``lm_head`` score a *draft vocabulary*
of ``draft_vocab_size`` tokens; draft id i is target id ``i + d2t[i]`` and ``t2d`` marks the
target ids in it. Later draft steps feed the layer's own pre-norm output back as the hidden
state (no ``fc``). Row t pairs the LLM's feature of token t with token t + 1, at position t.

Format facts (config.json and tensor names, as the engines define them):
- ``architectures: ["LlamaForCausalLMEagle3"]``, ``model_type: "llama"``, ``num_hidden_layers: 1``,
  ``vocab_size`` = the LLM's, ``draft_vocab_size``, optional ``target_hidden_size`` (fc input is
  3x it), optional ``norm_before_residual``.
- Captured layers: vLLM's top-level ``eagle_aux_hidden_state_layer_ids`` index the residual
  stream *entering* a layer (HF ``hidden_states[i]``); SGLang's ``eagle_config.
  eagle_aux_hidden_state_layer_ids`` name layer *outputs* (one less). Both default to
  (2, L // 2, L - 3) in the first convention, which is the one ``aux_layers`` uses here.
- Tensors: ``fc.weight``, ``midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight``,
  ``midlayer.self_attn.{q,k,v,o}_proj.weight``, ``midlayer.mlp.{gate,up,down}_proj.weight``,
  ``norm.weight``, ``lm_head.weight`` [draft_vocab, hidden], ``d2t`` (int64), ``t2d`` (bool),
  optional ``embed_tokens.weight`` (absent: the LLM's embedding is used).

Heads we train share the LLM's embedding and (restricted to the draft vocabulary) its head:
config.json lists them under ``specinfer_shared_from_llm`` and the file omits them, so a head
for the default LLM fits in the repository; ``save_eagle3(..., include_shared=True)`` writes a
self-contained checkpoint for other engines. Like models/transformer.py, the module is
cache-agnostic (the step's ``StepAttention`` says where K/V rows live).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, PretrainedConfig

from specinfer_dist.errors import ModelLoadError
from specinfer_dist.models.linear import Linear
from specinfer_dist.models.architectures import family
from specinfer_dist.models.layers import MLP, RMSNorm, RotaryEmbedding
from specinfer_dist.models.attention import StepAttention
from specinfer_dist.models.loader import materialize
from specinfer_dist.models.transformer import Attention, Transformer

ARCHITECTURE = "LlamaForCausalLMEagle3"
# Other names published heads use for the same layout.
ARCHITECTURES = (ARCHITECTURE, "Eagle3LlamaForCausalLM", "LlamaForCausalLMEagle")
SHARED_KEY = "specinfer_shared_from_llm"
SHAREABLE = ("embed_tokens.weight", "lm_head.weight")
LLM_NAMES = {"embed_tokens.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}  # the LLM's names
WEIGHTS_FILE = "model.safetensors"


def default_aux_layers(num_layers: int) -> list[int]:
    """EAGLE-3's choice (2, L // 2, L - 3), clamped into [0, L) for shallow (test) models."""
    return [min(max(i, 0), num_layers - 1) for i in (2, num_layers // 2, num_layers - 3)]


def eagle3_config(
    llm_config: PretrainedConfig,
    draft_vocab_size: int,
    aux_layers: Sequence[int] | None = None,
    intermediate_size: int | None = None,
) -> LlamaConfig:
    """A head config for ``llm_config``'s LLM: same width, heads and RoPE, one layer."""
    aux = list(aux_layers) if aux_layers is not None else default_aux_layers(llm_config.num_hidden_layers)
    return LlamaConfig(
        architectures=[ARCHITECTURE],
        hidden_size=llm_config.hidden_size,
        target_hidden_size=llm_config.hidden_size,
        intermediate_size=intermediate_size or llm_config.intermediate_size,
        num_hidden_layers=1,
        num_attention_heads=llm_config.num_attention_heads,
        num_key_value_heads=llm_config.num_key_value_heads,
        head_dim=getattr(llm_config, "head_dim", None) or llm_config.hidden_size // llm_config.num_attention_heads,
        rms_norm_eps=llm_config.rms_norm_eps,
        rope_theta=getattr(llm_config, "rope_theta", None) or (getattr(llm_config, "rope_parameters", None) or {}).get(
            "rope_theta", 10000.0),
        max_position_embeddings=llm_config.max_position_embeddings,
        vocab_size=llm_config.vocab_size,
        draft_vocab_size=draft_vocab_size,
        tie_word_embeddings=False,
        eagle_aux_hidden_state_layer_ids=aux,
        eagle_config={"eagle_aux_hidden_state_layer_ids": [i - 1 for i in aux], "use_aux_hidden_state": True},
    )


def aux_layers_of(config: PretrainedConfig, llm_layers: int | None) -> list[int]:
    """Captured layers (residual entering layer i) from either engine's field, else the default
    (which needs the LLM's depth: ``llm_layers`` None only when the config names them)."""
    top = getattr(config, "eagle_aux_hidden_state_layer_ids", None)
    nested = (getattr(config, "eagle_config", None) or {}).get("eagle_aux_hidden_state_layer_ids")
    if top or nested:
        layers = list(top) if top else [i + 1 for i in nested]
    elif llm_layers is None:
        raise ModelLoadError("EAGLE-3 head names no aux layers; load it with its LLM to use the default")
    else:
        layers = default_aux_layers(llm_layers)
    bound = llm_layers if llm_layers is not None else float("inf")
    if len(layers) != 3 or not all(0 <= i < bound for i in layers):
        raise ModelLoadError(f"EAGLE-3 head: aux layers {layers} must be 3 layer ids of the LLM's {llm_layers}")
    return layers


class Eagle3Layer(nn.Module):
    """The ``midlayer``: a Llama decoder layer whose attention reads [embedding, hidden]."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.self_attn = Attention(config, 0, family(config))
        for name in ("q_proj", "k_proj", "v_proj"):
            out = getattr(self.self_attn, name).out_features
            setattr(self.self_attn, name, Linear(2 * hidden, out, bias=False))
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(hidden, config.rms_norm_eps)
        self.hidden_norm = RMSNorm(hidden, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hidden, config.rms_norm_eps)
        self.norm_before_residual = bool(getattr(config, "norm_before_residual", False))

    def forward(self, embeds, hidden, cos, sin, meta, kv):
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_before_residual else hidden
        x = torch.cat((self.input_layernorm(embeds), normed), dim=-1)
        x = self.self_attn(x, cos, sin, meta, kv, residual=residual)  # residual + attention
        return self.mlp(self.post_attention_layernorm(x), residual=x)


class Eagle3Head(nn.Module):
    """An EAGLE-3 head (see module docstring); parameter names equal the checkpoint's."""

    def __init__(self, config: PretrainedConfig, aux_layers: Sequence[int]) -> None:
        super().__init__()
        self.config = config
        self.aux_layers = list(aux_layers)
        hidden = config.hidden_size
        target_hidden = getattr(config, "target_hidden_size", None) or hidden
        draft_vocab = getattr(config, "draft_vocab_size", None) or config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
        self.fc = Linear(3 * target_hidden, hidden, bias=False)
        self.midlayer = Eagle3Layer(config)
        self.norm = RMSNorm(hidden, config.rms_norm_eps)
        self.lm_head = Linear(hidden, draft_vocab, bias=False)
        self.rotary_emb = RotaryEmbedding(config)
        self.register_buffer("d2t", torch.zeros(draft_vocab, dtype=torch.long))
        self.register_buffer("t2d", torch.ones(config.vocab_size, dtype=torch.bool) if draft_vocab == config.vocab_size
                             else torch.zeros(config.vocab_size, dtype=torch.bool))

    # What a ModelRunner needs to give it a KV cache.
    num_layers = 1

    def fuse_projections(self) -> "Eagle3Head":
        """As ``Transformer.fuse_projections``."""
        self.midlayer.self_attn.fuse_projections()
        self.midlayer.mlp.fuse_projections()
        return self

    @property
    def num_kv_heads(self) -> int:
        return self.midlayer.self_attn.k_proj.out_features // self.head_dim

    @property
    def head_dim(self) -> int:
        return self.midlayer.self_attn.head_dim

    @property
    def draft_ids(self) -> torch.Tensor:
        """Target id of every draft id."""
        return torch.arange(len(self.d2t), device=self.d2t.device) + self.d2t

    def set_draft_vocab(self, draft_ids: torch.Tensor) -> None:
        """Fill d2t / t2d for a draft vocabulary given as target ids (draft id = position)."""
        draft_ids = draft_ids.to(self.d2t.device)
        self.d2t.copy_(draft_ids - torch.arange(len(draft_ids), device=draft_ids.device))
        self.t2d.zero_()
        self.t2d[draft_ids] = True

    def fuse(self, aux: torch.Tensor) -> torch.Tensor:
        """The LLM's three captured hidden states [n, 3 * target_hidden] -> the head's input [n, hidden]."""
        return self.fc(aux)

    def step(
        self, input_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, meta: StepAttention,
        kv: torch.Tensor | None,
    ) -> torch.Tensor:
        """Pre-norm outputs [n, hidden] of the layer: fed back as the next step's hidden state.
        ``kv``: the layer's pool (inference) or None (``meta`` keeps the rows itself: training)."""
        cos, sin = self.rotary_emb(positions, hidden.dtype)
        return self.midlayer(self.embed_tokens(input_ids), hidden, cos, sin, meta, kv)

    def draft_logits(self, out: torch.Tensor) -> torch.Tensor:
        """Scores over the draft vocabulary [n, draft_vocab]."""
        return self.lm_head(self.norm(out))

    def target_logits(self, out: torch.Tensor) -> torch.Tensor:
        """Scores over the LLM's vocabulary, -inf outside the draft vocabulary (as vLLM maps them)."""
        draft = self.draft_logits(out)
        logits = draft.new_full((*draft.shape[:-1], self.config.vocab_size), float("-inf"))
        logits[..., self.draft_ids] = draft
        return logits

    def share_from(self, llm: Transformer, names: Sequence[str]) -> None:
        """Take ``names`` (of SHAREABLE) from the LLM: its embedding itself, its head's draft rows (a copy)."""
        for name in names:
            if name == "embed_tokens.weight":
                self.embed_tokens.weight = llm.model.embed_tokens.weight
            elif name == "lm_head.weight":
                head = llm.lm_head.weight.detach()[self.draft_ids.to(llm.lm_head.weight.device)]
                self.lm_head.weight = nn.Parameter(head.clone(), requires_grad=False)
            else:
                raise ModelLoadError(f"EAGLE-3 head: cannot share {name!r} with the LLM (only {', '.join(SHAREABLE)})")


def save_eagle3(head: Eagle3Head, path: str | Path, shared: Sequence[str] = (), dtype: torch.dtype | None = None,
                extra: dict[str, Any] | None = None) -> Path:
    """Write config.json + model.safetensors; tensors named in ``shared`` are left out and listed
    under SHARED_KEY (the loader takes them from the LLM). ``dtype`` casts floating tensors."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = head.config.to_dict()
    config.update(architectures=[ARCHITECTURE], eagle_aux_hidden_state_layer_ids=head.aux_layers,
                  eagle_config={"eagle_aux_hidden_state_layer_ids": [i - 1 for i in head.aux_layers],
                                "use_aux_hidden_state": True}, **(extra or {}))
    config.pop(SHARED_KEY, None)
    if shared:
        config[SHARED_KEY] = list(shared)
    if dtype is not None:
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
    state = {}
    for name, tensor in head.state_dict().items():
        if name in shared:
            continue
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor.contiguous().clone()
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(state, path / WEIGHTS_FILE, metadata={"format": "pt"})
    return path


def is_eagle3_dir(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return bool(set(json.loads(config.read_text()).get("architectures") or []) & set(ARCHITECTURES))
    except ValueError:
        return False


def load_eagle3(
    path: str | Path, llm: Transformer | None = None, dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Eagle3Head:
    """Load a head onto ``device`` (default: the LLM's, else the CPU); with ``llm`` check it fits
    that LLM and fill what it shares/omits from it. An LLM loaded without weights (a process that
    only drafts, like the Ray coordinator) reads just those tensors from its checkpoint."""
    path = Path(path)
    where = f"EAGLE-3 head {path}"
    if not is_eagle3_dir(path):
        raise ModelLoadError(f"{where}: no config.json naming one of {', '.join(ARCHITECTURES)}")
    raw = json.loads((path / "config.json").read_text())
    shared = list(raw.pop(SHARED_KEY, []))
    config = LlamaConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    if config.num_hidden_layers != 1:
        raise ModelLoadError(f"{where}: num_hidden_layers is {config.num_hidden_layers}; EAGLE-3 heads have 1")
    head = Eagle3Head(config, aux_layers_of(config, None if llm is None else llm.num_layers))
    if llm is not None:
        _check_fits(head, llm, where)
    state = _read_state(path, where)
    if "d2t" not in state:  # the draft vocabulary is the whole vocabulary
        state["d2t"] = torch.zeros(len(head.d2t), dtype=torch.long)
    if "t2d" not in state:
        state["t2d"] = torch.zeros(config.vocab_size, dtype=torch.bool)
        state["t2d"][torch.arange(len(state["d2t"])) + state["d2t"].long()] = True
    omitted = [n for n in SHAREABLE if n not in state]
    if omitted and llm is None:
        raise ModelLoadError(f"{where}: it takes {', '.join(omitted)} from its LLM; load it with the LLM")
    own = head.state_dict()
    expected = {k for k in own if k not in omitted}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ModelLoadError(f"{where}: missing tensors {sorted(missing)}, unexpected {sorted(unexpected)}")
    for name in expected:
        want = own[name].shape
        if state[name].shape != want:
            raise ModelLoadError(f"{where}: {name} is {tuple(state[name].shape)}, expected {tuple(want)}")
    state["d2t"], state["t2d"] = state["d2t"].long(), state["t2d"].bool()
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    head.load_state_dict(state, strict=False)
    head.to(dtype)
    if llm is not None:
        device = device if device is not None else next(llm.parameters()).device
        meta = [LLM_NAMES[name] for name in omitted if llm.get_parameter(LLM_NAMES[name]).is_meta]
        if meta:
            materialize(llm, meta, device)
        head.share_from(llm, omitted)
    if device is not None:
        head.to(device)
    return head.eval()


def _check_fits(head: Eagle3Head, llm: Transformer, where: str) -> None:
    target_hidden = getattr(head.config, "target_hidden_size", None) or head.config.hidden_size
    if target_hidden != llm.config.hidden_size:
        raise ModelLoadError(f"{where}: made for hidden size {target_hidden}, the LLM has {llm.config.hidden_size}")
    if head.config.vocab_size != llm.config.vocab_size:
        raise ModelLoadError(f"{where}: vocab_size {head.config.vocab_size} vs the LLM's {llm.config.vocab_size}")


def _read_state(path: Path, where: str) -> dict[str, torch.Tensor]:
    """model.safetensors (SpecForge) or pytorch_model.bin (SafeAILab's EAGLE releases)."""
    try:
        if (path / WEIGHTS_FILE).is_file():
            return dict(load_file(path / WEIGHTS_FILE))
        if (path / "pytorch_model.bin").is_file():
            return dict(torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True))
    except Exception as e:  # corrupt file: one line for the user
        raise ModelLoadError(f"{where}: cannot read weights: {type(e).__name__}: {e}") from None
    raise ModelLoadError(f"{where}: no {WEIGHTS_FILE} or pytorch_model.bin")


__all__ = ["ARCHITECTURE", "Eagle3Head", "default_aux_layers", "eagle3_config", "is_eagle3_dir", "load_eagle3",
           "save_eagle3"]
