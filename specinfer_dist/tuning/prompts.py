"""Prompt files: JSON lines with a string 'prompt' and an optional 'chat' flag."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
