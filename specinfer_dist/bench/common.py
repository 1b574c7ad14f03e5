"""Prompt files and machine labels shared by the benchmarks."""

from __future__ import annotations

import json
import os
import platform
import threading
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


class PeakMemory:
    """Peak memory while the block runs: the process's resident set (sampled every 5 ms, so
    models loaded earlier count too) and, on a GPU, torch's peak allocation."""

    def __enter__(self) -> "PeakMemory":
        self.rss_mb = self.gpu_mb = 0.0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
        while True:
            with open("/proc/self/statm") as f:
                self.rss_mb = max(self.rss_mb, int(f.read().split()[1]) * page_mb)
            if self._done.wait(0.005):
                return

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        if torch.cuda.is_available():
            self.gpu_mb = torch.cuda.max_memory_allocated() / 2**20

    def as_dict(self) -> dict[str, float]:
        peaks = {"peak_rss_mb": round(self.rss_mb, 1)}
        if torch.cuda.is_available():
            peaks["peak_gpu_mb"] = round(self.gpu_mb, 1)
        return peaks
