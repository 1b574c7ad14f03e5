"""Per-request generation settings, validated on construction.

``temperature``, ``top_p`` and ``top_k`` left as None are filled by ``with_defaults`` when the
engine admits the request: the model's generation_config.json values where it sets them
(vLLM's ``--generation-config auto``), else the OpenAI defaults. Parameters held by a running
request are always concrete.

Invariants after construction: every value set is one the engine can use without numerical
trouble or overflow: temperature is 0 (greedy) or at least ``SAMPLING_EPS`` (so the float64
logits / temperature of any finite logit stays finite), top_k >= 0, and a seed fits the
per-request ``torch.Generator`` (``0 <= seed <= MAX_SEED``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from specinfer_dist.errors import InvalidRequestError
from specinfer_dist.runtime.grammar import StructuredOutputsParams

# Positive temperatures below this are greedy (vLLM's _SAMPLING_EPS). vLLM also raises
# temperatures in (0, 0.01) to 0.01; here sampling runs in float64, where dividing any finite
# logit by 1e-5 stays finite, so temperatures from 1e-5 up are sampled as asked.
SAMPLING_EPS = 1e-5
MAX_SEED = 2**63 - 1  # torch.Generator takes 64 bits, and a negative seed would alias a large one


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Filled from the model's generation_config.json, else these (OpenAI's; top_k 0 = off).
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
SAMPLING_DEFAULT_FIELDS = tuple(OPENAI_DEFAULTS)
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs


@dataclass
class SamplingParams:
    """Like vLLM's: temperature 0 (or below ``SAMPLING_EPS``) is greedy; otherwise the LLM's
    distribution after temperature, top-k (0 = off) and top-p (1 = off) is sampled exactly."""

    max_tokens: int = 16
    temperature: float | None = None  # None: the model's default (see module docstring)
    top_p: float | None = None
    top_k: int | None = None
    # Same seed + same inputs -> same tokens, whichever requests share the batch, up to
    # floating-point ties: logits are not bitwise batch-invariant (kernels pick their blocking
    # by row count), so a draw that falls within rounding of a boundary can differ.
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # generation ends before the first occurrence
    ignore_eos: bool = False  # keep going past EOS (benchmarks)
    # Log-probabilities of each emitted token under the LLM's raw distribution (log-softmax of
    # its logits, before temperature/top-k/top-p, as OpenAI and vLLM's default report them),
    # plus the ``logprobs`` most likely alternatives; None: none computed.
    logprobs: int | None = None
    # The output follows this constraint (runtime/grammar.py): a JSON schema, any JSON object, a
    # regex, one of some strings, or a grammar. Drafts it forbids are dropped; the LLM's
    # distribution is renormalised over the tokens it allows at every step.
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None:
            self.stop = []
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        t = self.temperature
        if t is not None and (not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0):
            raise InvalidRequestError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if t is not None and t < SAMPLING_EPS:
            self.temperature = 0.0  # e.g. 1e-310 would overflow logits / temperature to inf
        p = self.top_p
        if p is not None and (not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 0):
            raise InvalidRequestError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise InvalidRequestError(f"seed must be an integer in [0, {MAX_SEED}], got {self.seed!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise InvalidRequestError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise InvalidRequestError("structured_outputs must be a StructuredOutputsParams")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequestError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")

    def with_defaults(self, defaults: dict[str, Any]) -> "SamplingParams":
        """These params with every unset sampling field filled: ``defaults`` first (the
        model's), then OpenAI's. Invalid model defaults are reported as the request's."""
        unset = {name: defaults.get(name, OPENAI_DEFAULTS[name]) for name in OPENAI_DEFAULTS if getattr(self, name) is None}
        return replace(self, **unset) if unset else self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
