"""One configuration system: dataclasses, loadable from YAML (see configs/), overridable by flags."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from specinfer_dist.errors import InvalidConfigError
from specinfer_dist.tree.spec import DEFAULT_TOKEN_BUDGET, DEFAULT_WIDTHS


@dataclass
class EngineConfig:
    llm: str = "default"  # "default", a HF checkpoint dir, a .gguf file or a hub id
    ssms: list[str] | None = None  # None: the default SSM for the default LLM, none otherwise
    drafters: list[str] = field(default_factory=list)  # model-free drafters, e.g. "ngram" or "ngram:2,1,1,1"
    tree: str = ",".join(map(str, DEFAULT_WIDTHS))
    tree_budget: int = DEFAULT_TOKEN_BUDGET
    mode: str | None = None  # incremental | sequence | tree; None: tree when there is an SSM
    verify: str = "mss"  # how sampled requests are verified: mss | naive
    draft_temperature: float | None = None  # None: SSMs sample with each request's own transforms
    dtype: str = "float32"
    max_num_seqs: int = 16

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EngineConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InvalidConfigError(f"unknown engine option(s): {', '.join(sorted(unknown))}")
        return cls(**data)


def load_config(path: str | Path) -> EngineConfig:
    """Read the ``engine:`` section of a YAML file."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise InvalidConfigError(f"cannot read config {path}: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("engine", {}), dict):
        raise InvalidConfigError(f"config {path} must be a mapping with an 'engine' section")
    return EngineConfig.from_dict(data.get("engine", {}))
