"""Where converted and derived checkpoints live, and how they are written safely.

Entries are built under an exclusive per-entry lock into a temporary directory that is
renamed into place only when complete, so concurrent processes never see half an entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def cache_root() -> Path:
    """Where converted and derived checkpoints live."""
    if os.environ.get("SPECINFER_DIST_CACHE"):
        return Path(os.environ["SPECINFER_DIST_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "specinfer_dist"
    return Path.home() / ".cache" / "specinfer_dist"


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Hold an exclusive lock on cache entry `name`, so two processes never build it at once."""
    lock_dir = cache_root() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a temp dir next to `out_dir` that becomes `out_dir` only if the block succeeds.

    An interrupted build therefore never leaves a half-written directory behind.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        # A leftover without config.json is not a usable entry; os.replace needs the name free.
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
