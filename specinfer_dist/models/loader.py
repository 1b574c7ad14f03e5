"""Turn a user-given model source into a loaded (model, tokenizer) pair.

Sources: the default model, a local Hugging Face directory, a GGUF file (converted once
into the cache) or a Hugging Face hub id. Every failure surfaces as ModelLoadError.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import transformers

from specinfer_dist.errors import InvalidConfigError, ModelLoadError
from specinfer_dist.models.architectures import check_supported
from specinfer_dist.models.cache import cache_lock
from specinfer_dist.models.default import default_llm_dir
from specinfer_dist.models.gguf import convert_gguf, gguf_cache_dir, reason
from specinfer_dist.models.transformer import Transformer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# config.json field of an SSM checkpoint that omits tensors it takes from its LLM (e.g. the
# embedding): `load_model(..., shared_from=llm)` fills them with the LLM's own tensors.
SHARED_FROM_LLM_KEY = "specinfer_shared_from_llm"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map "float32" / "bfloat16" / "float16" (or the torch dtypes themselves) to a torch.dtype."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise InvalidConfigError(f"unknown dtype {dtype!r}; expected one of {', '.join(_DTYPES)}")


def resolve_model_dir(source: str | None, *, progress: bool = True) -> Path:
    """Turn a model source into a local HF directory (config.json, safetensors, tokenizer)."""
    if source is None or source == "default":
        return default_llm_dir(progress=progress)

    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"could not load model from {source}: no config.json in directory")
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"could not load model from {source}: expected a directory with config.json "
                "or a .gguf file"
            )
        path = path.resolve()
        out = gguf_cache_dir(path)
        if not (out / "config.json").is_file():
            with cache_lock(f"gguf-{out.name}"):
                if not (out / "config.json").is_file():  # another process may have just made it
                    convert_gguf(path, out, progress=progress)
        return out
    if _HUB_ID.match(source):
        return _download_from_hub(source)
    raise ModelLoadError(
        f"could not load model from {source}: no such file or directory; expected 'default', "
        "an HF model directory, a .gguf file or a Hugging Face hub id like 'owner/name'"
    )


def _download_from_hub(repo_id: str) -> Path:
    import huggingface_hub

    try:
        path = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except Exception as e:
        raise ModelLoadError(
            f"could not download {repo_id} from the Hugging Face hub (no network?): {reason(e)}"
        ) from e
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"could not load model from {repo_id}: hub repo has no config.json")
    return path


def _load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError("no *.safetensors files")
    state: dict[str, torch.Tensor] = {}
    for f in files:  # sharded checkpoints: every shard holds disjoint keys
        state.update(safetensors.torch.load_file(f))
    return state


def _check_state_dict(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Describe key and shape mismatches in one line (load_state_dict lists every key)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise ValueError(f"{len(missing)} missing weights, e.g. {missing[0]}")
    if unexpected:
        raise ValueError(f"{len(unexpected)} unexpected weights, e.g. {unexpected[0]}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ValueError(
                f"weight {k} has shape {tuple(v.shape)}, config expects {tuple(expected[k].shape)}"
            )


def load_model(
    source: str | None,
    *,
    dtype: str | torch.dtype = torch.float32,
    progress: bool = True,
    shared_from: Transformer | None = None,
) -> tuple[Transformer, Any, Path]:
    """Load (model, tokenizer, model_dir) from a source accepted by `resolve_model_dir`.

    A checkpoint whose config names tensors under SHARED_FROM_LLM_KEY gets them from
    ``shared_from`` (its LLM, already loaded in the same dtype): the same tensors, not copies.
    """
    dtype = parse_dtype(dtype)
    model_dir = resolve_model_dir(source, progress=progress)
    source = source or "default"
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir)
    except Exception as e:
        raise ModelLoadError(f"could not load model from {source}: config: {reason(e)}") from e
    try:
        check_supported(config)
    except ModelLoadError as e:
        raise ModelLoadError(f"could not load model from {source}: {e}") from None
    shared = list(getattr(config, SHARED_FROM_LLM_KEY, None) or [])
    if shared and shared_from is None:
        raise ModelLoadError(
            f"could not load model from {source}: it takes {', '.join(shared)} from its LLM; "
            "load it as an SSM of that LLM"
        )
    try:
        # Built on CPU rather than the meta device: the model's non-persistent buffers
        # (e.g. rotary frequencies) must be computed by its constructor.
        model = Transformer(config)
        state = _load_state_dict(model_dir)
        expected = {k: v for k, v in model.state_dict().items() if k not in shared}
        # Tied checkpoints usually omit lm_head.weight; it is the embedding matrix.
        tied = config.tie_word_embeddings and "model.embed_tokens.weight" in state
        if tied and "lm_head.weight" in expected:
            state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
        _check_state_dict(expected, state)
        model.load_state_dict(state, strict=not shared)
    except Exception as e:
        raise ModelLoadError(f"could not load model from {source}: weights: {reason(e)}") from e
    model = model.to(dtype).eval().requires_grad_(False)
    if shared:
        _share_tensors(model, shared_from, shared, source)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:
        raise ModelLoadError(f"could not load model from {source}: tokenizer: {reason(e)}") from e
    return model, tokenizer, model_dir


def _share_tensors(model: Transformer, llm: Transformer, names: list[str], source: str) -> None:
    """Point ``model``'s parameters ``names`` at ``llm``'s (no copy; the dtype must match)."""
    for name in names:
        module_name, _, attr = name.rpartition(".")
        try:
            mine, theirs = model.get_parameter(name), llm.get_parameter(name)
        except AttributeError as e:
            raise ModelLoadError(f"could not load model from {source}: shared weight {name}: {reason(e)}") from e
        if mine.shape != theirs.shape or mine.dtype != theirs.dtype:
            raise ModelLoadError(
                f"could not load model from {source}: shared weight {name} is {tuple(mine.shape)} "
                f"{mine.dtype} but the LLM's is {tuple(theirs.shape)} {theirs.dtype}"
            )
        setattr(model.get_submodule(module_name), attr, theirs)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def check_same_vocabulary(
    llm_tokenizer: Any, ssm_tokenizer: Any, llm_config: Any, ssm_config: Any, ssm_source: str
) -> None:
    """Speculation only works if draft and target agree on every token id; raise if they don't."""
    prefix = f"SSM {ssm_source} does not share the LLM's vocabulary"
    if llm_config.vocab_size != ssm_config.vocab_size:
        raise ModelLoadError(
            f"{prefix}: vocab_size {ssm_config.vocab_size} vs LLM's {llm_config.vocab_size}"
        )
    llm_vocab, ssm_vocab = llm_tokenizer.get_vocab(), ssm_tokenizer.get_vocab()
    if len(llm_vocab) != len(ssm_vocab):
        raise ModelLoadError(
            f"{prefix}: tokenizer has {len(ssm_vocab)} tokens vs LLM's {len(llm_vocab)}"
        )
    if llm_vocab != ssm_vocab:
        differ = sorted(t for t in llm_vocab if ssm_vocab.get(t) != llm_vocab[t])
        token = differ[0]
        in_ssm = "missing" if token not in ssm_vocab else f"id {ssm_vocab[token]}"
        raise ModelLoadError(
            f"{prefix}: {len(differ)} tokens differ, e.g. {token!r} is {in_ssm} in the SSM "
            f"but id {llm_vocab[token]} in the LLM"
        )
