"""GGUF checkpoints: dequantised once into a plain Hugging Face directory in the cache."""

from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path

import safetensors.torch
import torch
import transformers

from specinfer_dist.errors import ModelLoadError
from specinfer_dist.models.cache import atomic_dir, cache_root
from specinfer_dist.progress import say


def reason(e: BaseException) -> str:
    """First line of an exception, so users see one short line instead of a traceback."""
    lines = str(e).strip().splitlines()
    first = lines[0] if lines else ""
    text = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: bool = True) -> None:
    """Dequantize a GGUF checkpoint into a plain HF directory (config, safetensors, tokenizer)."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    say(f"converting GGUF to HF format ({gguf_path.name})...", "converting the model", progress)
    # transformers draws its own tqdm bars on stderr; hide them when asked to be quiet.
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    try:
        with quiet:
            src, name = str(gguf_path.parent), gguf_path.name
            tokenizer = transformers.AutoTokenizer.from_pretrained(src, gguf_file=name)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                src, gguf_file=name, dtype=torch.float32
            )
    except Exception as e:
        raise ModelLoadError(f"could not convert GGUF {gguf_path}: {reason(e)}") from e

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    config = model.config
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    # The weights are now plain float32; a leftover quantization_config would make
    # transformers try to re-quantize (and save_pretrained refuses GGUF-quantized models).
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    with atomic_dir(out_dir) as tmp:
        safetensors.torch.save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config.to_json_file(tmp / "config.json")
        model.generation_config.to_json_file(tmp / "generation_config.json")
        tokenizer.save_pretrained(tmp)


def gguf_cache_dir(path: Path) -> Path:
    # Key on path, size and mtime so a replaced file is converted again.
    st = path.stat()
    key = hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{path.stem}-{key}"
