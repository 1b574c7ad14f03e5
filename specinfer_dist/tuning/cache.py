"""The one cache of ``tree: auto`` results: the cost model's measurement (tune.py, under
``tree-auto/``) and the race's (race.py, under ``tree-race/``), one JSON file per fingerprint in
the cache root, shared by every process on the machine (``generate``, ``serve``, ``bench``, the
Ray runtime's shards).

Invariants:
- One fingerprint (``result_path``) for both: the device's kind and model (``device_key``), the
  torch version, the dtype, the model files (``files_digest``: names, sizes and modification
  times, so a retrained drafter at the same path is measured again and nothing is loaded to
  know), and what the result depends on: for the race, the config fields marked ``race`` in
  their metadata (config.py ``option``). The time budget is not part of it: a result measured
  under any budget is reused.
- The thread count is not part of it either, because it did not change the answer here.
  Measured on the 2-core CPU (Intel Xeon, torch 2.13 CPU wheel), default LLM and SSMs: the
  unbounded ``tune_tree`` and ``race`` under ``torch.set_num_threads(1)`` and ``(2)``, twice each
  (pre-budget code, /tmp script calling them on ``EngineConfig()``): every SSM subset's tree was
  empty in all four runs (a 2-token verify costs 2.3x a 1-token one at either count: 120 vs
  52 ms at 1 thread, 76 vs 33 ms at 2), and the race chose incremental decoding every time
  (dynamic / incremental tokens/s: 6.9/19.0 and 6.7/18.7 at 1 thread, 11.1/30.9 and 10.9/29.8
  at 2). Threads change the speeds, not the ranking, so ``serve`` (1 thread per replica) and
  ``generate`` (2) share one result.
- Writes are atomic (a temporary file renamed into place): a reader never sees half a result,
  and two processes tuning at once each write a whole one (the last wins).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch

from specinfer_dist.config import EngineConfig
from specinfer_dist.models.cache import cache_root
from specinfer_dist.models.default import feature_drafter_source, ssm_sources
from specinfer_dist.runtime.device import default_dtype, device_key, resolve_device

VERSION = "v3"  # bump when a result's meaning changes: older files are then never read


def result_path(kind: str, device: torch.device, dtype: str | torch.dtype, sources: Iterable[str],
                **setup: Any) -> Path:
    """Where the ``kind`` result ("tree-auto", "tree-race") for these models and ``setup`` on
    ``device`` lives. ``sources``: the model sources it was measured with (their files are
    digested); ``setup``: anything else the result depends on (JSON-able)."""
    sources = list(sources)
    key = {
        "device": device_key(device), "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
        "sources": sources, "files": files_digest(sources).hex(), "setup": setup,
    }
    digest = hashlib.sha256(json.dumps([VERSION, kind, key], sort_keys=True, default=str).encode()).hexdigest()
    return cache_root() / kind / f"{digest[:16]}.json"


def race_path(config: EngineConfig) -> Path:
    """Where the race's result for ``config`` on this machine lives."""
    device = resolve_device(config.device)
    options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.metadata.get("race")}
    # Resolved: "auto" and "cpu" on a CPU-only machine are one device, dtype None is its default.
    options.pop("device", None)
    options["dtype"] = config.dtype or default_dtype(device)
    return result_path("tree-race", device, options["dtype"], [], options=options, models=models_digest(config).hex())


def model_sources(config: EngineConfig) -> list[str]:
    """The LLM's, the SSMs' and the feature head's sources (paths or hub ids)."""
    head = feature_drafter_source(config.llm, config.feature_drafter)
    return [config.llm, *ssm_sources(config.llm, config.ssms), *([head] if head else [])]


def models_digest(config: EngineConfig) -> bytes:
    """``files_digest`` of ``model_sources(config)``: what a race's result depends on besides
    the options."""
    return files_digest(model_sources(config))


def files_digest(sources: Iterable[str]) -> bytes:
    """A digest of the files at ``sources`` (names, sizes, modification times; every file of a
    directory). A source that is no path (a hub id, "default", "draft_vocab=True") counts by
    name; the default LLM is a cache entry converted from a pinned package, so its name is it."""
    digest = hashlib.sha256()
    for source in sources:
        path = Path(source)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
        digest.update(source.encode() + b"\0")
        for file in files:
            stat = file.stat()
            digest.update(f"{file}:{stat.st_size}:{stat.st_mtime_ns}\0".encode())
    return digest.digest()


def read_result(path: Path) -> dict[str, Any] | None:
    """The cached result at ``path``, or None (none yet, or unreadable: measured again)."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) else None


def write_result(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(result, out, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
