"""Which device a process computes on, its default dtype, and labels for the device numbers
were measured on: ``machine`` labels benchmark numbers, ``device_key`` names the device in the
tuning cache's key (tuning/cache.py)."""

from __future__ import annotations

import platform

import torch

from specinfer_dist.config import DEVICES
from specinfer_dist.errors import InvalidConfigError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: the (first visible) GPU when there is one, else the CPU. ``cuda`` without a GPU
    is a configuration error, not a silent fallback."""
    if isinstance(device, torch.device):
        return device
    if device not in DEVICES:
        raise InvalidConfigError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidConfigError("device 'cuda' was asked for but torch sees no GPU (CPU-only wheel or no driver?)")
    return torch.device(device)


def default_dtype(device: torch.device) -> str:
    """bfloat16 on GPUs (tensor cores, half the memory), float32 on CPUs (bf16 matmuls are slow there)."""
    return "bfloat16" if device.type == "cuda" else "float32"


def default_max_batched_tokens(device: torch.device) -> int:
    """LLM rows per step under ``max_num_batched_tokens: auto``: vLLM's online default on a GPU.
    On a CPU a step of 2048 rows takes seconds, and a short request that arrives during a long
    prompt's prefill waits about two steps (README, Chunked prefill: 128 keeps that near 3 s on
    2 cores, and prefills no slower than whole prompts)."""
    return 2048 if device.type == "cuda" else 128


def machine() -> str:
    """CPU model and threads (or the GPU), for labelling numbers."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{_cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def device_key(device: torch.device) -> str:
    """The kind and model of ``device`` ("cuda: NVIDIA H200", "cpu: Intel(R) Xeon(R) Processor"):
    what tuning results are kept per. The thread count is left out on purpose: on the 2-core CPU
    it changed the speeds but not the ranking (tuning/cache.py has the measurement)."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"{device.type}: {_cpu_model()}"


def _cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()
