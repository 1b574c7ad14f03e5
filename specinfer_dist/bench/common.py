"""Prompt files and machine labels shared by the benchmarks."""

from __future__ import annotations

import json
import platform
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from specinfer_dist.errors import InvalidConfigError


def load_prompts(path: str | None) -> list[dict[str, Any]]:
    text = Path(path).read_text() if path else resources.files(__package__).joinpath("prompts.jsonl").read_text()
    try:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise InvalidConfigError(f"prompts file {path}: {err}") from None
    if not rows or not all(isinstance(r, dict) and isinstance(r.get("prompt"), str) for r in rows):
        raise InvalidConfigError(f"prompts file {path} needs JSON lines with a string 'prompt'")
    return rows


def machine() -> str:
    """CPU model and threads (or the GPU), for labelling numbers."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
