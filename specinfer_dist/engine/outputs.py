"""What generate() returns for each prompt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from specinfer_dist.engine.sequence import SpecStats


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: SpecStats

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "prompt_tokens": len(self.prompt_token_ids),
            **self.stats.to_dict(),
        }
