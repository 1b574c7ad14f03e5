"""OpenAI request bodies as pydantic models: wrong types and out-of-range values are refused
(strict mode, so "0.5" is not a number) before anything reaches the engine.

Invariants of a validated body: it names only options we honour (an option we do not
implement is accepted only at the value that means "off", e.g. ``echo: false``; anything else
is a 400 naming it, never silently ignored), and every string in it is valid Unicode (a lone
surrogate such as ``"\\ud800"`` is a 400, not a tokenizer crash).

Structured outputs: OpenAI's ``response_format`` (text, json_object, json_schema) and vLLM's
``structured_outputs`` extension become one ``StructuredOutputsParams`` (``constraint``), whose
shape is checked here (a 400 naming the option); whether the schema, regex or grammar itself
compiles is the engine's verdict, also a 400, given before the request is queued.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from specinfer_dist.engine.engine import Prompt
from specinfer_dist.errors import InvalidRequestError
from specinfer_dist.runtime.grammar import StructuredOutputsParams
from specinfer_dist.runtime.sampling_params import (
    MAX_LOGPROBS,
    MAX_SEED,
    SamplingParams,
)
from specinfer_dist.serve.api_errors import ApiError

MAX_CHOICES = 16

# OpenAI options we do not implement, with the values that mean "not used": those are accepted
# (clients and SDKs send them), any other value is refused with a 400 naming the option.
_OFF: dict[str, tuple[Any, ...]] = {
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, True, False),  # meaningless without tools
    "functions": (None, []),
    "function_call": (None, "none"),
    "store": (None, False),
    "metadata": (None, {}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "service_tier": (None, "auto", "default"),
}


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")  # forbid: a backstop; _honoured_only says which
    _IN: ClassVar[str | None] = None  # a part's top-level field, for its errors

    @model_validator(mode="before")
    @classmethod
    def _honoured_only(cls, data: Any) -> Any:
        """Drop the unimplemented options set to "off"; refuse every other option we do not know."""
        # ApiError, not ValueError: pydantic passes it through unchanged, with the option as param.
        if not isinstance(data, dict):
            return data
        known = {field.alias or name for name, field in cls.model_fields.items()}  # the names a body uses
        for key, value in data.items():
            if key in known:
                continue
            where = f" in {cls._IN}" if cls._IN else ""
            if key not in _OFF or cls._IN:
                raise ApiError(400, f"unknown option '{key}'{where}", param=cls._IN or key)
            if not any(type(value) is type(off) and value == off for off in _OFF[key]):  # typed: 0 is not False
                raise ApiError(400, f"'{key}' is not supported (only {_off_values(key)})", param=key)
        return {k: v for k, v in data.items() if k in known}


def _off_values(key: str) -> str:
    return " or ".join(json.dumps(v) for v in _OFF[key])


class _Request(_Body):
    """A whole request body (the nested models are its parts)."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        # Before the option checks (which echo option names) and before any tokenizer sees it.
        path = _invalid_unicode(data, "")
        if path is not None:
            raise ApiError(400, f"invalid Unicode (a lone surrogate) in {path or 'the body'}",
                           param=path.split(".")[0].split("[")[0] or None)
        return data


def _invalid_unicode(value: Any, path: str) -> str | None:
    """The path of the first string (or key) that is not valid Unicode, None if all are."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
    elif isinstance(value, dict):
        for key, item in value.items():
            sub = f"{path}.{key}" if path else str(key)
            found = _invalid_unicode(key, sub) if isinstance(key, str) else None
            found = found if found is not None else _invalid_unicode(item, sub)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _invalid_unicode(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


class StreamOptions(_Body):
    _IN = "stream_options"
    include_usage: bool = False
    continuous_usage_stats: bool = False  # extension (as vLLM): usage so far on every chunk, with include_usage


class JsonSchemaFormat(_Body):
    _IN = "response_format"
    name: str = Field(min_length=1, max_length=64)
    # Aliased: "schema" would shadow a BaseModel attribute. The schema itself is checked by the engine.
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None  # outputs always follow the schema exactly, strict or not


class ResponseFormat(_Body):
    """OpenAI's ``response_format``."""

    _IN = "response_format"
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ApiError(400, "response_format.json_schema is required with type 'json_schema', and only with it",
                           param="response_format")
        return self


class StructuredOutputs(_Body):
    """vLLM's ``structured_outputs`` extension: exactly one of these (runtime/grammar.py)."""

    _IN = "structured_outputs"
    json_: dict[str, Any] | str | None = Field(None, alias="json")  # a JSON schema, or JSON text of one
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark, llguidance's dialect


class SamplingRequest(_Request):
    """The fields completions and chat share."""

    model: str | None = None  # None: the served model
    max_tokens: int | None = Field(None, ge=1)
    # Unset: the model's generation_config.json values, else OpenAI's (as vLLM; see SamplingParams).
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)  # 0 (or < 1e-5) = greedy
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1)  # extension (as vLLM): 0 or -1 = off
    seed: int | None = Field(None, ge=0, le=MAX_SEED)  # choice i of n samples with seed + i (mod 2**63)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension (as vLLM): keep going past EOS
    user: str | None = None  # the caller's end-user id: only for the provider's records, no effect on output
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None  # extension (as vLLM)
    _constraint: StructuredOutputsParams | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _one_constraint(self) -> "SamplingRequest":
        self._constraint = structured_outputs_params(self.response_format, self.structured_outputs)
        return self

    @property
    def constraint(self) -> StructuredOutputsParams | None:
        """What the output must follow (from response_format or structured_outputs); None: free text."""
        return self._constraint

    def sampling_params(self, max_tokens: int, choice: int) -> SamplingParams:
        # One constraint for every choice: the engine compiles it once and gives each sequence
        # a matcher of its own.
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=0 if self.top_k == -1 else self.top_k,  # -1: vLLM's "off"
            seed=None if self.seed is None else (self.seed + choice) % (MAX_SEED + 1),
            stop=self.stop or [], ignore_eos=self.ignore_eos, logprobs=self.top_logprobs_wanted(),
            structured_outputs=self.constraint,
        )

    def top_logprobs_wanted(self) -> int | None:
        """Alternatives to report per token (0: only the chosen token's logprob); None: no logprobs."""
        raise NotImplementedError

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        # Speculation streams several tokens per chunk; this tells clients how many.
        return self.include_usage and self.stream_options.continuous_usage_stats


def structured_outputs_params(
    response_format: ResponseFormat | None, extension: StructuredOutputs | None
) -> StructuredOutputsParams | None:
    """The one constraint a body asks for; a 400 naming the option if its shape is wrong or it
    asks for two (a non-text response_format and structured_outputs)."""
    wanted = None if response_format is None or response_format.type == "text" else response_format
    if wanted is not None and extension is not None:
        raise ApiError(400, f"structured_outputs cannot be combined with response_format of type '{wanted.type}'; "
                       "set one of them", param="structured_outputs")
    if wanted is not None:
        if wanted.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        return StructuredOutputsParams(json=wanted.json_schema.schema_)
    if extension is None:
        return None
    try:
        return StructuredOutputsParams(
            json=extension.json_, json_object=bool(extension.json_object), regex=extension.regex,
            choice=extension.choice, grammar=extension.grammar,
        )
    except InvalidRequestError as err:  # a ValueError, which pydantic would reword
        raise ApiError(400, f"structured_outputs: {err}", param="structured_outputs") from None


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # the legacy API: alternatives per token

    def prompts(self) -> list[Prompt]:
        """One prompt (text or token ids) or a batch of them."""
        p = self.prompt
        return [p] if isinstance(p, str) or not p or isinstance(p[0], int) else list(p)

    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs


class TextPart(_Body):
    _IN = "messages"
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    _IN = "messages"
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def to_template(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": self.role, "content": content}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:  # as OpenAI
            raise ApiError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
        return self

    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def max_tokens_asked(self) -> int | None:
        """max_completion_tokens, else max_tokens; None: the server decides."""
        return self.max_completion_tokens or self.max_tokens
