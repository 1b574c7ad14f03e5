"""Per-request generation settings, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from specinfer_dist.errors import InvalidRequestError


@dataclass
class SamplingParams:
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)  # generation ends before the first occurrence
    ignore_eos: bool = False  # keep going past EOS (benchmarks)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None:
            self.stop = []
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequestError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
