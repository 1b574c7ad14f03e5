"""OpenAI request bodies as pydantic models: wrong types and out-of-range values are refused
(strict mode, so "0.5" is not a number) before anything reaches the engine."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from specinfer_dist.engine.engine import Prompt
from specinfer_dist.runtime.sampling_params import SamplingParams

MAX_CHOICES = 16


class _Body(BaseModel):
    # Unknown fields (user, logit_bias, ...) are ignored, as most OpenAI-compatible servers do.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # extension (as vLLM): usage so far on every chunk, with include_usage


class SamplingRequest(_Body):
    """The fields completions and chat share."""

    model: str | None = None  # None: the served model
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)  # OpenAI's default; 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # extension (as vLLM): 0 = off
    seed: int | None = None  # choice i of n samples with seed + i
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension (as vLLM): keep going past EOS

    def sampling_params(self, max_tokens: int, choice: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            seed=None if self.seed is None else self.seed + choice, stop=self.stop or [], ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        # Speculation streams several tokens per chunk; this tells clients how many.
        return self.include_usage and self.stream_options.continuous_usage_stats


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]

    def prompts(self) -> list[Prompt]:
        """One prompt (text or token ids) or a batch of them."""
        p = self.prompt
        return [p] if isinstance(p, str) or not p or isinstance(p[0], int) else list(p)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def to_template(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": self.role, "content": content}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens
