"""The serving protocol without a server: what SamplingParams makes of dangerous values,
OpenAI's logprobs shapes from per-token entries, and the one constraint a body's
response_format or structured_outputs asks for (HTTP and gRPC refusals are tested end to end in
test_serve.py and test_structured_serve.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from helpers import make_tiny_tokenizer

from specinfer_dist.errors import InvalidRequestError
from specinfer_dist.runtime.grammar import StructuredOutputsParams
from specinfer_dist.runtime.sampling_params import MAX_SEED, SAMPLING_EPS, SamplingParams
from specinfer_dist.serve.api_errors import ApiError
from specinfer_dist.serve.logprobs import LogprobsFormatter, top_logprobs_requested
from specinfer_dist.serve.openai_protocol import ChatCompletionRequest, CompletionRequest


@pytest.mark.parametrize("temperature", [1e-310, 5e-324, 1e-6, SAMPLING_EPS / 2])
def test_tiny_temperatures_are_greedy(temperature):
    params = SamplingParams(temperature=temperature, top_k=5, top_p=0.5)
    assert params.greedy and params.temperature == 0.0


def test_sampling_params_limits():
    assert not SamplingParams(temperature=SAMPLING_EPS).greedy  # from the threshold up: sampled as asked
    assert SamplingParams(seed=MAX_SEED).seed == MAX_SEED and SamplingParams(seed=0).seed == 0
    for bad in ({"seed": MAX_SEED + 1}, {"seed": -1}, {"seed": 2**70}, {"top_k": -1}, {"temperature": math.nan},
                {"temperature": math.inf}, {"top_p": math.nan}):
        with pytest.raises(InvalidRequestError):
            SamplingParams(**bad)


def test_per_choice_seeds_stay_in_range_and_top_k_minus_one_is_off():
    body = CompletionRequest.model_validate({"prompt": "x", "seed": MAX_SEED, "n": 3, "top_k": -1})
    assert [body.sampling_params(4, i).seed for i in range(3)] == [MAX_SEED, 0, 1]
    assert body.sampling_params(4, 0).top_k == 0  # vLLM's "off"


def test_logprobs_are_asked_for_in_one_place():
    chat = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                                                 "top_logprobs": 3})
    completion = CompletionRequest.model_validate({"prompt": "x", "logprobs": 0})
    assert (chat.top_logprobs_wanted(), completion.top_logprobs_wanted()) == (3, 0)
    assert chat.sampling_params(4, 0).logprobs == 3 and completion.sampling_params(4, 0).logprobs == 0
    assert [top_logprobs_requested(top) for top in (None, 0, 20)] == [None, 0, 20]
    with pytest.raises(ApiError, match="between 0 and 20") as err:
        top_logprobs_requested(21, "top_logprobs")  # gRPC's field has no schema bound of its own
    assert err.value.status == 400


@dataclass
class _Entry:  # the shape the engine will report (serve.logprobs.TokenLogprob)
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def test_logprobs_shapes():
    tokenizer = make_tiny_tokenizer()
    a, b, c = (tokenizer.convert_tokens_to_ids(t) for t in ("a", "b", "Ġ"))  # "Ġ": a space, byte-level
    entries = [_Entry(a, -0.1, [(a, -0.1), (b, -2.5), (c, -3.0)]), _Entry(c, -0.7, [(b, -0.5), (c, -0.7), (a, -4.0)])]

    chat = LogprobsFormatter(tokenizer, top=2, chat=True).format(0, entries)
    assert chat == {"content": [
        {"token": "a", "logprob": -0.1, "bytes": [97],
         "top_logprobs": [{"token": "a", "logprob": -0.1, "bytes": [97]}, {"token": "b", "logprob": -2.5, "bytes": [98]}]},
        {"token": " ", "logprob": -0.7, "bytes": [32],
         "top_logprobs": [{"token": "b", "logprob": -0.5, "bytes": [98]}, {"token": " ", "logprob": -0.7, "bytes": [32]}]},
    ]}

    completions = LogprobsFormatter(tokenizer, top=1, chat=False)
    first = completions.format(0, entries)
    assert first == {"tokens": ["a", " "], "token_logprobs": [-0.1, -0.7], "top_logprobs": [{"a": -0.1}, {"b": -0.5}],
                     "text_offset": [0, 1]}
    # A stream's next chunk continues the offsets of its own choice; other choices start at 0.
    assert completions.format(0, entries[:1])["text_offset"] == [2]
    assert completions.format(1, entries[:1])["text_offset"] == [0]


def test_response_format_and_structured_outputs_are_one_constraint_on_both_endpoints():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    formats = {
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}},
        "structured_outputs": {"json": schema},
    }
    for key, value in formats.items():
        chat = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], key: value, "n": 2})
        completion = CompletionRequest.model_validate({"prompt": "x", key: value})
        assert chat.constraint == completion.constraint == StructuredOutputsParams(json=schema)
        assert chat.sampling_params(4, 1).structured_outputs is chat.constraint  # every choice: the same one
    assert CompletionRequest.model_validate({"prompt": "x", "response_format": {"type": "json_object"}}).constraint \
        == StructuredOutputsParams(json_object=True)
    for free in ({}, {"response_format": {"type": "text"}}):
        assert CompletionRequest.model_validate({"prompt": "x", **free}).sampling_params(4, 0).structured_outputs is None
    with pytest.raises(ApiError, match="cannot be combined") as err:
        CompletionRequest.model_validate({"prompt": "x", "response_format": {"type": "json_object"},
                                          "structured_outputs": {"regex": "a"}})
    assert (err.value.status, err.value.param) == (400, "structured_outputs")
