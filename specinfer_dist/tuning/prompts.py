"""Prompt files: JSON lines with a string 'prompt' and an optional 'chat' flag; and the
calibration prompts ``tree: auto`` measures on (never the held-out bench set), encoded the one
way both of its stages (tune.py, race.py) use."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from specinfer_dist.errors import InvalidConfigError


def load_prompts(path: str | Path) -> list[dict[str, Any]]:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise InvalidConfigError(f"cannot read prompts file {path}: {err}") from None
    try:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise InvalidConfigError(f"prompts file {path}: {err}") from None
    if not rows or not all(isinstance(r, dict) and isinstance(r.get("prompt"), str) for r in rows):
        raise InvalidConfigError(f"prompts file {path} needs JSON lines with a string 'prompt'")
    return rows


def calibration_prompts(encode: Callable[[str, bool], list[int]], chat: bool, keep: int) -> list[list[int]]:
    """The calibration prompts as token ids, each cut to its last ``keep`` tokens (so it fits the
    context). ``encode(text, chat)``; ``chat``: whether the model has a chat template (base
    models get the plain text of every prompt)."""
    rows = load_prompts(str(resources.files(__package__).joinpath("calibration.jsonl")))
    return [encode(r["prompt"], chat and bool(r.get("chat")))[-keep:] for r in rows]
