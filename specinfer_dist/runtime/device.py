"""Labels for the device numbers were measured on (benchmarks, the tuned-tree cache)."""

from __future__ import annotations

import platform

import torch


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
