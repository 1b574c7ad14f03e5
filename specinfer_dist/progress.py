"""Start-up progress: one line on stderr for every stage that can take more than a second, and
the stage this process is in (what ``/health`` reports while a replica loads).

Lines go to this process's stderr, flushed at once. In a Ray Serve replica Ray forwards a
worker's stderr to the console of the driver that deployed it, so ``specinfer-dist serve`` shows
the replica's lines too. ``stage()`` is recorded whether or not the line is shown: a library
caller that asked for no progress output still gets an honest health answer.
"""

from __future__ import annotations

import sys

_stage = "starting"


def say(message: str, stage: str | None = None, show: bool = True) -> None:
    """Print ``specinfer-dist: message`` on stderr (when ``show``); ``stage`` names what this
    process is now doing (e.g. "loading", "tuning", "ready")."""
    global _stage
    if stage is not None:
        _stage = stage
    if show:
        print(f"specinfer-dist: {message}", file=sys.stderr, flush=True)


def stage() -> str:
    """The stage last named by ``say``."""
    return _stage
