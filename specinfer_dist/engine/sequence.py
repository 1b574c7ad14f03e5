"""A request's state inside the engine: its tokens, its LLM cache, and how it ends.

A request ends once: at EOS, a stop string or max_tokens, or with an error of its own
(``finish_reason`` ERROR and ``error`` set), which ends no other request.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import torch

from specinfer_dist.runtime.grammar import Grammar
from specinfer_dist.runtime.sampling_params import SamplingParams


class FinishReason(str, Enum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens reached
    ERROR = "error"  # processing this request raised (``Sequence.error`` says what)


@dataclass
class TokenLogprob:
    """An emitted token's log-probability under the LLM's raw distribution, and the most
    likely tokens there as (id, log-probability), most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SpecStats:
    steps: int = 0  # LLM verification passes
    drafted_tokens: int = 0
    accepted_tokens: int = 0  # drafted tokens the LLM kept and the request emitted
    generated_tokens: int = 0
    accepted_at_depth: list[int] = field(default_factory=list)  # steps that kept a token at depth d+1
    forced_tokens: int = 0  # tokens a grammar alone decided, appended without a forward (engine: _jump_forward)

    def record(self, drafted: int, accepted: int, generated: int) -> None:
        """One verification step: ``drafted`` tree tokens, the first ``accepted`` of the
        accepted path emitted, ``generated`` output tokens in all so far."""
        self.steps += 1
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        self.accepted_at_depth.extend([0] * (accepted - len(self.accepted_at_depth)))
        for depth in range(accepted):
            self.accepted_at_depth[depth] += 1
        self.generated_tokens = generated

    @property
    def tokens_per_step(self) -> float:
        return self.generated_tokens / self.steps if self.steps else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_step": self.tokens_per_step}


@dataclass
class Sequence:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    text: str | None = None  # set when the request finishes
    finish_reason: FinishReason | None = None
    stats: SpecStats = field(default_factory=SpecStats)
    num_cached: int = 0  # tokens whose K/V the LLM holds (all but the newest, after a step)
    cached_tokens: int | None = None  # prompt tokens taken from the prefix cache (None: never admitted)
    error: str | None = None  # why the request failed (finish_reason ERROR)
    logprobs: list[TokenLogprob] | None = None  # one per output token, when params.logprobs is set
    generator: torch.Generator = field(init=False)  # the verifier's random draws for this request
    grammar: Grammar | None = None  # structured outputs: the grammar at the committed output tokens
    tree_paths: list[tuple[int, ...] | None] | None = None  # the grammar's path per node of this step's tree

    def __post_init__(self) -> None:
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs = []
        self.generator = torch.Generator()
        if self.params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(self.params.seed)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefilling(self) -> bool:
        """Whether tokens before the newest are still uncached (a prompt, or a preempted
        request's prefix, not yet fully through the LLM)."""
        return self.num_cached < len(self.prompt_ids) + len(self.output_ids) - 1

    @property
    def remaining(self) -> int:
        return self.params.max_tokens - len(self.output_ids)
