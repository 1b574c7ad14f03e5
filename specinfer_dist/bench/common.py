"""The held-out prompt set and peak-memory measurement shared by the benchmarks."""

from __future__ import annotations

import json
import os
import threading
from importlib import resources
from pathlib import Path
from typing import Any

import torch

# Held out: tree tuning calibrates on its own prompts (tuning/calibration.jsonl).
BENCH_PROMPTS = str(resources.files(__package__).joinpath("prompts.jsonl"))


def report(result: dict[str, Any], out: str | None) -> None:
    """Print a benchmark's JSON result, and write it to ``out`` when given."""
    text = json.dumps(result, indent=1)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    print(text)


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
