"""What generate() returns for each prompt."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from specinfer_dist.engine.sequence import SpecStats, TokenLogprob


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop", "length", or "error" (then ``error`` says why)
    stats: SpecStats
    logprobs: list[TokenLogprob] | None = None  # one per token id, when requested
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache, not computed

    def to_dict(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.logprobs is not None:
            extra["logprobs"] = [asdict(lp) for lp in self.logprobs]
        if self.error is not None:
            extra["error"] = self.error
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "prompt_tokens": len(self.prompt_token_ids),
            "cached_tokens": self.cached_tokens,
            **extra,
            **self.stats.to_dict(),
        }
