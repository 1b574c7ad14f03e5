"""Per-request generation settings, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from specinfer_dist.errors import InvalidRequestError


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """Like vLLM's: temperature 0 is greedy; otherwise the LLM's distribution after
    temperature, top-k (0 = off) and top-p (1 = off) is sampled exactly."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None  # same seed + same inputs -> same output, whatever the batch holds
    stop: list[str] = field(default_factory=list)  # generation ends before the first occurrence
    ignore_eos: bool = False  # keep going past EOS (benchmarks)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None:
            self.stop = []
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool) or not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise InvalidRequestError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequestError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
