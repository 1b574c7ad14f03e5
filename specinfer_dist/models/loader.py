"""Turn a user-given model source into a loaded (model, tokenizer) pair.

Sources: the default model, a local Hugging Face directory, a GGUF file (converted once
into the cache) or a Hugging Face hub id. Every failure surfaces as ModelLoadError.

Loading never holds a full copy of the checkpoint: the model is built on the meta device,
optionally restructured into a tensor-parallel shard, and each parameter is then read from
safetensors (only this rank's slice, ``Sharding.index``) in the target dtype straight onto
the target device. Peak host memory is about one tensor above what the process keeps.
Buffers (RoPE frequencies, embedding scales) are computed by the constructors, never cast.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import safetensors
import torch
import transformers
from accelerate import init_empty_weights
from torch import nn

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


class Sharding(Protocol):
    """How one rank keeps part of the model (tensor parallelism: distributed/tp.py). The loader
    applies it to the empty model, then reads from the checkpoint only what ``index`` names."""

    def apply(self, model: Transformer) -> None:
        """Restructure ``model`` (on the meta device) into this rank's shard."""
        ...

    def index(self, name: str, shape: tuple[int, ...], config: Any) -> tuple[int, list[tuple[slice, ...]]] | None:
        """The parts of parameter ``name`` (full stored ``shape``) to read, concatenated along
        the returned dim; None: all of it."""
        ...


@dataclass(frozen=True)
class _Stored:
    file: Path
    key: str
    shape: tuple[int, ...]


@dataclass
class _Checkpoint:
    """What a loaded model needs to read more of its own tensors later (``materialize``)."""

    index: dict[str, _Stored]
    sharding: Sharding | None


def _checkpoint_index(model_dir: Path) -> dict[str, _Stored]:
    """Where every tensor is and its shape, from the safetensors headers only."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError("no *.safetensors files")
    index: dict[str, _Stored] = {}
    for f in files:  # sharded checkpoints: every shard holds disjoint keys
        with safetensors.safe_open(f, framework="pt") as st:
            for key in st.keys():
                index[key] = _Stored(f, key, tuple(st.get_slice(key).get_shape()))
    return index


def _check_shapes(expected: dict[str, tuple[int, ...]], index: dict[str, _Stored]) -> None:
    """Describe key and shape mismatches in one line (load_state_dict lists every key)."""
    missing = sorted(set(expected) - set(index))
    unexpected = sorted(set(index) - set(expected))
    if missing:
        raise ValueError(f"{len(missing)} missing weights, e.g. {missing[0]}")
    if unexpected:
        raise ValueError(f"{len(unexpected)} unexpected weights, e.g. {unexpected[0]}")
    for k, stored in index.items():
        if stored.shape != expected[k]:
            raise ValueError(f"weight {k} has shape {stored.shape}, config expects {expected[k]}")


@torch.no_grad()
def _read_into(param: torch.Tensor, stored: _Stored, index: tuple[int, list[tuple[slice, ...]]] | None) -> None:
    """Copy a stored tensor (or the parts ``index`` names, one after another along its dim) into
    ``param``, converting the dtype on the way. The file is opened per tensor, so at most one
    tensor's pages of its memory map are resident; parts shorter than ``param`` (the padded last
    vocabulary shard) leave zeros behind them."""
    with safetensors.safe_open(stored.file, framework="pt") as st:
        if index is None:
            param.copy_(st.get_tensor(stored.key))
            return
        dim, parts = index
        at = 0
        for part in (st.get_slice(stored.key)[i] for i in parts):
            param.narrow(dim, at, part.shape[dim]).copy_(part)
            at += part.shape[dim]
    if at < param.shape[dim]:
        param.narrow(dim, at, param.shape[dim] - at).zero_()


def _build(
    config: Any, model_dir: Path, dtype: torch.dtype, device: torch.device, shared: list[str],
    sharding: Sharding | None, weights: bool,
) -> Transformer:
    """The model built with its parameters on the meta device, sharded, then each parameter read
    straight from safetensors in ``dtype`` onto ``device``: no full copy of the checkpoint
    exists. Buffers (RoPE frequencies, embedding scales: non-persistent, not in checkpoints)
    are computed by the constructors on the CPU, as they are, in fp32, then moved."""
    with init_empty_weights(include_buffers=False):
        model = Transformer(config)
    for param in model.parameters():
        param.data = param.data.to(dtype)  # still meta; in place, so tied parameters stay tied
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in shared}
    index = _checkpoint_index(model_dir)
    # Tied checkpoints usually omit lm_head.weight; it is the embedding matrix.
    tied = config.tie_word_embeddings and "model.embed_tokens.weight" in index
    if tied and "lm_head.weight" in expected:
        index.setdefault("lm_head.weight", index["model.embed_tokens.weight"])
    _check_shapes(expected, index)
    if sharding is not None:
        sharding.apply(model)
    model.checkpoint = _Checkpoint(index, sharding)
    if weights:
        materialize(model, [k for k, _ in model.named_parameters(remove_duplicate=False) if k not in shared], device)
        for module in model.modules():
            for key, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[key] = buf.to(device)
    return model


def materialize(model: Transformer, names: list[str], device: torch.device | str) -> None:
    """Read parameters ``names`` of a model made by ``load_model`` from its checkpoint onto
    ``device`` (those already there are kept); the rest stays as it is, e.g. on the meta
    device: a draft worker's LLM holds only the tensors its SSMs share."""
    checkpoint: _Checkpoint = model.checkpoint
    device = torch.device(device)
    tie = model.config.tie_word_embeddings and checkpoint.sharding is None
    for name in names:
        if model.get_parameter(name).device == device:
            continue
        old = model.get_parameter(name)
        real = nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device=device), requires_grad=False)
        stored = checkpoint.index[name]
        _read_into(real, stored, checkpoint.sharding.index(name, stored.shape, model.config) if checkpoint.sharding else None)
        if tie and name in ("lm_head.weight", "model.embed_tokens.weight"):
            model.lm_head.weight = model.model.embed_tokens.weight = real
        else:
            module_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module_name), attr, real)


def load_model(
    source: str | None,
    *,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = True,
    shared_from: Transformer | None = None,
    sharding: Sharding | None = None,
    weights: bool = True,
) -> tuple[Transformer, Any, Path]:
    """Load (model, tokenizer, model_dir) from a source accepted by `resolve_model_dir`.

    Tensors go straight from the checkpoint to ``device`` in ``dtype``, and with ``sharding``
    only this rank's slices are read. ``weights=False`` reads none (the model stays on the meta
    device; see ``materialize``). A checkpoint whose config names tensors under
    SHARED_FROM_LLM_KEY gets them from ``shared_from`` (its LLM, in the same dtype): the same
    tensors, not copies, read from the LLM's checkpoint first if it has not read them yet.
    """
    dtype = parse_dtype(dtype)
    device = torch.device(device)
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
        model = _build(config, model_dir, dtype, device, shared, sharding, weights)
    except Exception as e:
        raise ModelLoadError(f"could not load model from {source}: weights: {reason(e)}") from e
    model = model.eval().requires_grad_(False)
    if shared:
        _share_tensors(model, shared_from, shared, source, device)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:
        raise ModelLoadError(f"could not load model from {source}: tokenizer: {reason(e)}") from e
    return model, tokenizer, model_dir


def _share_tensors(model: Transformer, llm: Transformer, names: list[str], source: str, device: torch.device) -> None:
    """Point ``model``'s parameters ``names`` at ``llm``'s (no copy; the dtype must match)."""
    for name in names:
        module_name, _, attr = name.rpartition(".")
        try:
            mine, theirs = model.get_parameter(name), llm.get_parameter(name)
            if theirs.is_meta:  # an LLM loaded without weights reads just what its SSMs share
                materialize(llm, [name], device)
                theirs = llm.get_parameter(name)
        except (AttributeError, KeyError) as e:
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
