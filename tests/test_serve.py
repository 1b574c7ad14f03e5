"""The Ray Serve app end to end over loopback: the openai client on HTTP, the generated stubs on
gRPC. One Ray cluster and three apps for the module: "open", "secured" (API key; its chat
template has a server-side bug, for 500s; chat max_tokens capped at 3) and "distributed"
(runtime ray: each replica drives a Coordinator with verifier-shard and draft-worker actors).
Serve starts with the proxy options `specinfer-dist serve` uses (gRPC reflection off)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
import pytest
import ray
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.serve.api import RunTarget
from ray.serve.exceptions import gRPCStatusError
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from serve_helpers import BROKEN_CHAT_TEMPLATE, CHAT_TEMPLATE, free_port, make_chat_checkpoint, wait_ready

from specinfer_dist import LLMEngine, SamplingParams
from specinfer_dist.cli import main as cli_main
from specinfer_dist.config import DEFAULT_BLOCK_SIZE, ClusterConfig, EngineConfig, ServeConfig
from specinfer_dist.engine.async_engine import EngineStepError
from specinfer_dist.errors import InvalidRequestError
from specinfer_dist.runtime.sampling_params import MAX_SEED
from specinfer_dist.serve import grpc_api, grpc_status, make_app
from specinfer_dist.serve.api_errors import ApiError
from specinfer_dist.serve.app import proxy_options
from specinfer_dist.serve.proto import specinfer_pb2 as pb
from specinfer_dist.serve.proto import specinfer_pb2_grpc as pb_grpc

KEY = "sk-test-0123456789"
SECURED_SAMPLING = {"do_sample": True, "temperature": 0.0, "top_k": 7}
MAX_BODY = 16 * 1024
OPEN, SECURED, DISTRIBUTED = ((("application", app),) for app in ("open", "secured", "distributed"))  # gRPC routing


@dataclass
class Server:
    http: str
    grpc: str
    reference: LLMEngine

    def client(self, prefix: str = "", key: str = "unused", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.http}{prefix}/v1", api_key=key, max_retries=0, timeout=60, **kwargs)

    def greedy(self, prompt, max_tokens: int, chat: bool = False):
        [out] = self.reference.generate(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), chat=chat)
        return out

    def metrics(self, prefix: str = "") -> dict:
        text = requests.get(f"{self.http}{prefix}/metrics", timeout=10).text
        return {f.name: f for f in text_string_to_metric_families(text)}

    def stub(self) -> pb_grpc.SpecInferStub:
        return pb_grpc.SpecInferStub(grpc.insecure_channel(self.grpc))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    llm, broken = (str(make_chat_checkpoint(tmp, template)) for template in (CHAT_TEMPLATE, BROKEN_CHAT_TEMPLATE))
    # The secured app's model asks for greedy decoding in its generation_config.json (same weights).
    generation = Path(broken) / "generation_config.json"
    generation.write_text(json.dumps({**json.loads(generation.read_text()), **SECURED_SAMPLING}))
    engine = EngineConfig(llm=llm, ssms=[llm], tree="1,2,1")
    http_port, grpc_port = free_port(), free_port()
    # "local": never join a cluster someone started here. Logical CPUs: 3 replicas + the Ray runtime's actors.
    ray.init(address="local", num_cpus=8, include_dashboard=False, namespace="serve", log_to_driver=False)
    try:
        serve.start(**proxy_options(ServeConfig(port=http_port, grpc_port=grpc_port)))
        secured = ServeConfig(model_name="tiny", api_key=KEY, default_max_tokens=3)
        serve.run_many([
            RunTarget(make_app(engine, ServeConfig(model_name="tiny", max_request_bytes=MAX_BODY)), "open", "/"),
            RunTarget(make_app(EngineConfig(llm=broken, ssms=[broken], tree="1,2,1"), secured), "secured", "/secured"),
            RunTarget(make_app(engine, ServeConfig(model_name="tiny", runtime="ray"), ClusterConfig(step_timeout_s=60)),
                      "distributed", "/ray"),
        ])
        for prefix in ("", "/secured", "/ray"):  # replicas answer at once and load their engines in the background
            wait_ready(f"http://127.0.0.1:{http_port}{prefix}/health")
        yield Server(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", LLMEngine.from_config(engine))
    finally:
        serve.shutdown()
        ray.shutdown()


IGNORE_EOS = {"ignore_eos": True}  # random tiny models may say EOS anywhere


# ---- HTTP, OpenAI client -------------------------------------------------------------------

def test_models_and_health(server):
    [card] = server.client().models.list().data
    assert card.id == "tiny" and card.sampling_defaults == {} and card.max_model_len == 4096
    health = requests.get(f"{server.http}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ready" and health.json()["running"] == 0


def test_greedy_completion_equals_engine_with_usage(server):
    out = server.client().completions.create(
        model="tiny", prompt="hello world", max_tokens=12, temperature=0, extra_body=IGNORE_EOS
    )
    want = server.greedy("hello world", 12)
    assert out.choices[0].text == want.text and out.choices[0].finish_reason == "length"
    usage = out.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(want.prompt_token_ids), 12)
    details = usage.completion_tokens_details
    assert details.accepted_prediction_tokens == want.stats.accepted_tokens > 0
    assert details.rejected_prediction_tokens == want.stats.drafted_tokens - want.stats.accepted_tokens


def test_token_id_and_batched_prompts_with_n(server):
    ids = server.reference.encode("abc")
    out = server.client().completions.create(
        model="tiny", prompt=[ids, ids[:2]], max_tokens=5, temperature=0, n=2, extra_body=IGNORE_EOS
    )
    want = [server.greedy(ids, 5).text] * 2 + [server.greedy(ids[:2], 5).text] * 2
    assert [c.index for c in out.choices] == [0, 1, 2, 3] and [c.text for c in out.choices] == want
    assert out.usage.prompt_tokens == len(ids) + 2 and out.usage.completion_tokens == 20  # a prompt counts once


def test_chat_renders_the_template(server):
    client = server.client()
    out = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi there"}], max_completion_tokens=10, temperature=0,
        extra_body=IGNORE_EOS,
    )
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == server.greedy("hi there", 10, chat=True).text
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "and now?"}]
    tokenizer = server.reference.tokenizer
    ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False).input_ids
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=7, temperature=0, extra_body=IGNORE_EOS)
    assert out.choices[0].message.content == server.greedy(ids, 7).text and out.usage.prompt_tokens == len(ids)


def test_streaming_with_usage(server):
    client = server.client()
    chunks = list(client.completions.create(
        model="tiny", prompt="stream me", max_tokens=14, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=IGNORE_EOS,
    ))
    assert "".join(c.choices[0].text for c in chunks[:-1]) == server.greedy("stream me", 14).text
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 14
    assert chunks[-1].usage.completion_tokens_details.accepted_prediction_tokens > 0

    chat = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "stream me"}], max_tokens=9, temperature=0, stream=True,
        extra_body=IGNORE_EOS,
    ))
    assert chat[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content for c in chat) == server.greedy("stream me", 9, chat=True).text

    raw = requests.post(f"{server.http}/v1/completions", json={"prompt": "x", "max_tokens": 3, "stream": True}, timeout=30)
    assert raw.headers["content-type"].startswith("text/event-stream") and raw.text.endswith("data: [DONE]\n\n")


def test_streaming_continuous_usage_counts_tokens_per_chunk(server):
    chunks = list(server.client().completions.create(
        model="tiny", prompt="count my chunks", max_tokens=14, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body=IGNORE_EOS,
    ))
    so_far = [c.usage.completion_tokens for c in chunks[:-1]]  # every chunk: the tokens streamed so far
    assert so_far == sorted(so_far) and so_far[-1] == chunks[-1].usage.completion_tokens == 14
    per_chunk = [b - a for a, b in zip([0, *so_far], so_far)]
    assert min(per_chunk) >= 1 and max(per_chunk) > 1  # speculation delivers several tokens in one chunk
    assert "".join(c.choices[0].text for c in chunks[:-1]) == server.greedy("count my chunks", 14).text
    assert {c.usage.prompt_tokens for c in chunks} == {chunks[-1].usage.prompt_tokens} != {0}  # from the first chunk


def test_seeded_sampling_is_reproducible(server):
    client = server.client()

    def sample(seed: int) -> str:
        return client.completions.create(
            model="tiny", prompt="once upon", max_tokens=16, temperature=1.0, seed=seed, extra_body=IGNORE_EOS
        ).choices[0].text

    first = sample(1234)
    assert sample(1234) == first and sample(4321) != first


# ---- bad input, then a correct answer ------------------------------------------------------

BAD_REQUESTS = [  # (path, JSON body or raw bytes, status, param)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"", 400, None),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, None),
    ("/v1/completions", {"prompt": []}, 400, None),
    ("/v1/completions", {"prompt": "", "stream": True}, 400, None),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 10**6]}, 400, None),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**6}, 400, None),  # beyond the context
    ("/v1/completions", {"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, None),
    ("/v1/completions", {"prompt": "hi", "n": 1000}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "x" * MAX_BODY}, 413, None),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("/v1/no/such/route", {}, 404, None),
    # seeds must fit the per-choice generator (seed + i), invalid Unicode, non-finite numbers
    ("/v1/completions", {"prompt": "hi", "seed": 2**70}, 400, "seed"),
    ("/v1/completions", {"prompt": "hi", "seed": 2**64 - 1, "n": 2}, 400, "seed"),
    ("/v1/completions", {"prompt": "hi", "seed": -1}, 400, "seed"),
    ("/v1/completions", b'{"prompt": "\\ud800"}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": ["ok", "\\udfff"], "max_tokens": 2}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": "hi", "stop": "\\ud800"}', 400, "stop"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', 400, "messages"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("/v1/completions", b'{"prompt": "hi", "top_p": Infinity}', 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_k": -2}, 400, "top_k"),
    # options we do not implement are refused by name, never ignored
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/completions", {"prompt": "hi", "echo": True}, 400, "echo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     400, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}, 400, "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],  # structured outputs: test_structured_serve.py
                              "response_format": {"type": "structural_tag"}}, 400, "response_format"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 3}, 400, "min_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "name": "bob"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 5000}]}, 400, None),  # fills the context
]


@pytest.mark.parametrize("path,body,status,param", BAD_REQUESTS, ids=[str(i) for i in range(len(BAD_REQUESTS))])
def test_bad_request_is_refused_and_service_goes_on(server, path, body, status, param):
    kwargs = {"data": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    response = requests.post(f"{server.http}{path}", timeout=30, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["param"] == param
    assert param is None or param in error["message"]  # it names what is wrong
    out = server.client().completions.create(model="tiny", prompt="after", max_tokens=4, temperature=0, extra_body=IGNORE_EOS)
    assert out.choices[0].text == server.greedy("after", 4).text


def test_options_at_their_off_values_are_accepted(server):
    body = {"prompt": "hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True, "echo": False, "logprobs": None,
            "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "best_of": 1, "user": "u-1"}
    response = requests.post(f"{server.http}/v1/completions", json=body, timeout=30)
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == server.greedy("hello", 4).text
    out = server.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0, logprobs=False,
        response_format={"type": "text"}, tool_choice="none", extra_body=IGNORE_EOS,
    )
    assert out.choices[0].message.content == server.greedy("hi", 4, chat=True).text and out.choices[0].logprobs is None


def test_tiny_temperature_is_greedy_top_k_minus_one_is_off_and_seeds_wrap(server):
    def texts(top_k: int | None = None, **kwargs) -> list[str]:
        extra = {**IGNORE_EOS, **({} if top_k is None else {"top_k": top_k})}
        out = server.client().completions.create(model="tiny", prompt="once upon", max_tokens=8, extra_body=extra, **kwargs)
        return [c.text for c in out.choices]

    assert texts(temperature=1e-310) == texts(temperature=1e-6) == [server.greedy("once upon", 8).text]
    assert texts(temperature=1.0, seed=7, top_k=-1) == texts(temperature=1.0, seed=7)
    assert texts(temperature=1.0, seed=MAX_SEED, n=2)[1] == texts(temperature=1.0, seed=0)[0]  # choice i: seed + i mod 2**63


def test_chat_without_max_tokens_gets_the_context_left(server):
    tokenizer = server.reference.tokenizer
    context = server.reference.max_positions

    def prompt_tokens(content: str) -> int:
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    content = "a" * (context - 5 - prompt_tokens(""))  # one byte-level token per "a"
    assert prompt_tokens(content) == context - 5
    messages = [{"role": "user", "content": content}]
    out = server.client().chat.completions.create(model="tiny", messages=messages, temperature=0, extra_body=IGNORE_EOS)
    assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"  # 256 would not fit
    capped = server.client("/secured", key=KEY).chat.completions.create(  # default_max_tokens: 3
        model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=0, extra_body=IGNORE_EOS
    )
    assert capped.usage.completion_tokens == 3


def test_chunked_body_without_content_length(server):
    def chunks(body: bytes, size: int = 7):
        yield from (body[i:i + size] for i in range(0, len(body), size))

    body = json.dumps({"prompt": "hello world", "max_tokens": 6, "temperature": 0, "ignore_eos": True}).encode()
    response = requests.post(f"{server.http}/v1/completions", data=chunks(body), timeout=30,
                             headers={"content-type": "application/json"})
    assert response.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in response.request.headers
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == server.greedy("hello world", 6).text
    big = json.dumps({"prompt": "x" * MAX_BODY}).encode()
    response = requests.post(f"{server.http}/v1/completions", data=chunks(big, 4096), timeout=30,
                             headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_unhandled_error_is_a_counted_openai_500(server):
    def served(status: str) -> float:
        samples = server.metrics("/secured")["specinfer_api_requests"].samples
        return sum(s.value for s in samples if s.labels == {"protocol": "http", "status": status})

    before = served("500")
    body = {"messages": [{"role": "tool", "content": "x"}], "max_tokens": 2}  # the template divides by zero
    response = requests.post(f"{server.http}/secured/v1/chat/completions", json=body, timeout=30,
                             headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 500, response.text
    assert response.json()["error"] == {"message": "internal error: ZeroDivisionError", "type": "server_error",
                                        "param": None, "code": None}
    assert served("500") == before + 1
    out = server.client("/secured", key=KEY).completions.create(model="tiny", prompt="after", max_tokens=3, temperature=0,
                                                                 extra_body=IGNORE_EOS)
    assert out.choices[0].text == server.greedy("after", 3).text


def test_api_key(server):
    url = f"{server.http}/secured/v1/models"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = requests.get(url, headers=headers, timeout=10)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client("/secured", key="wrong").completions.create(model="tiny", prompt="hi", max_tokens=2)
    out = server.client("/secured", key=KEY).completions.create(
        model="tiny", prompt="hello world", max_tokens=6, temperature=0, extra_body=IGNORE_EOS
    )
    assert out.choices[0].text == server.greedy("hello world", 6).text
    assert requests.get(f"{server.http}/secured/health", timeout=10).status_code == 200  # probes need no key
    reset = f"{server.http}/secured/reset_prefix_cache"
    denied = requests.post(reset, timeout=10)
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    assert requests.post(reset, headers={"Authorization": f"Bearer {KEY}"}, timeout=60).json()["reset"] is True


def test_requests_without_sampling_fields_get_the_models_defaults(server):
    client = server.client("/secured", key=KEY)
    [card] = client.models.list().data
    assert card.sampling_defaults == {"temperature": 0.0, "top_k": 7}  # what /v1/models says is in force
    for _ in range(2):  # the model's temperature 0: greedy, every time
        out = client.completions.create(model="tiny", prompt="hello world", max_tokens=6, extra_body=IGNORE_EOS)
        assert out.choices[0].text == server.greedy("hello world", 6).text


# ---- metrics, disconnects, load ------------------------------------------------------------

SPEC_COUNTERS = ("spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens")


def test_metrics_move_after_a_request(server):
    def value(families, name):
        return sum(s.value for s in families[f"specinfer_{name}"].samples if s.name.endswith(("_total", "_count")))

    before = server.metrics()
    server.client().completions.create(model="tiny", prompt="count me", max_tokens=10, temperature=0, extra_body=IGNORE_EOS)
    after = server.metrics()
    for name in (*SPEC_COUNTERS, "spec_decode_num_accepted_tokens_per_pos", "generation_tokens", "prompt_tokens",
                 "request_success", "time_to_first_token_seconds", "inter_token_latency_seconds"):
        assert value(after, name) > value(before, name), name
    positions = after["specinfer_spec_decode_num_accepted_tokens_per_pos"].samples
    assert positions[0].labels["position"] == "0" and positions[0].value > 0
    assert {"specinfer_num_requests_running", "specinfer_num_requests_waiting"} <= set(after)
    assert any(s.labels == {"protocol": "http", "status": "200"} for s in after["specinfer_api_requests"].samples)


@pytest.mark.parametrize("prefix, grpc_app", [("", OPEN), ("/ray", DISTRIBUTED)])
def test_prefix_cache_reports_cached_tokens_and_resets(server, prefix, grpc_app):
    """A repeated prompt takes its full blocks from the prefix cache: usage (HTTP and gRPC) says
    how many, /metrics counts them, and POST /reset_prefix_cache forgets them. Sequential
    requests: only blocks an earlier step computed are found."""
    client = server.client(prefix)
    prompt = f"cache probe {prefix or 'local'}: " + "a shared system prompt. " * 3  # unique first block
    prompt_tokens = len(server.reference.encode(prompt))
    cacheable = (prompt_tokens - 1) // DEFAULT_BLOCK_SIZE * DEFAULT_BLOCK_SIZE  # full blocks before the last token

    def complete():
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, extra_body=IGNORE_EOS)

    def value(families, name):
        return sum(s.value for s in families[f"specinfer_{name}"].samples if s.name.endswith("_total"))

    before = server.metrics(prefix)
    first = complete()
    assert (first.usage.prompt_tokens, first.usage.prompt_tokens_details.cached_tokens) == (prompt_tokens, 0)
    assert cacheable >= 2 * DEFAULT_BLOCK_SIZE and complete().usage.prompt_tokens_details.cached_tokens == cacheable
    after = server.metrics(prefix)
    assert value(after, "prefix_cache_queries") - value(before, "prefix_cache_queries") == 2 * prompt_tokens
    assert value(after, "prefix_cache_hits") - value(before, "prefix_cache_hits") == cacheable
    request = pb.GenerateRequest(text=prompt, max_tokens=4, temperature=0, ignore_eos=True)
    [response] = server.stub().Generate(request, metadata=grpc_app)
    assert (response.usage.prompt_tokens, response.usage.cached_tokens) == (prompt_tokens, cacheable)

    messages = [{"role": "user", "content": f"chat probe {prefix or 'local'}: " + "tell me more. " * 4}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0, extra_body=IGNORE_EOS)
    assert chat.usage.prompt_tokens_details.cached_tokens == 0
    *_, last = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0, stream=True,
                                              stream_options={"include_usage": True}, extra_body=IGNORE_EOS)
    streamed = last.usage.prompt_tokens_details.cached_tokens
    assert last.choices == [] and 0 < streamed < last.usage.prompt_tokens and streamed % DEFAULT_BLOCK_SIZE == 0

    answered = value(server.metrics(prefix), "api_requests")
    reset = requests.post(f"{server.http}{prefix}/reset_prefix_cache", timeout=60)
    assert reset.status_code == 200, reset.text
    assert reset.json() == {"reset": True, "blocks": reset.json()["blocks"]}
    assert reset.json()["blocks"] >= (cacheable + streamed) // DEFAULT_BLOCK_SIZE  # at least this test's two prompts
    assert value(server.metrics(prefix), "api_requests") == answered  # not a generation request
    assert complete().usage.prompt_tokens_details.cached_tokens == 0


@pytest.mark.parametrize("prefix", ["", "/ray"])
def test_disconnected_stream_frees_its_request(server, prefix):
    aborted = server.metrics(prefix)["specinfer_request_aborted"].samples[0].value
    body = {"prompt": "a long one", "max_tokens": 4000, "temperature": 0, "ignore_eos": True, "stream": True}
    with requests.post(f"{server.http}{prefix}/v1/completions", json=body, stream=True, timeout=30) as response:
        first = next(line for line in response.iter_lines() if line)
        assert first.startswith(b"data: {")
    deadline = time.monotonic() + 30  # the request would run for far longer than this
    while time.monotonic() < deadline:
        health = requests.get(f"{server.http}{prefix}/health", timeout=10).json()
        if health["running"] == 0 and server.metrics(prefix)["specinfer_request_aborted"].samples[0].value > aborted:
            return
        time.sleep(0.2)
    pytest.fail(f"request still running after the client left: {health}")


def test_load_concurrent_streaming_clients_get_exact_greedy_output(server):
    prompts = [f"load test {i}: " + "ab" * (i % 5) for i in range(32)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = [out.text for out in server.reference.generate(prompts, params)]

    async def client_session(prompt: str, want: str) -> None:
        async with openai.AsyncOpenAI(base_url=f"{server.http}/v1", api_key="unused", max_retries=0, timeout=120) as client:
            for _ in range(3):
                stream = await client.completions.create(
                    model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True, extra_body=IGNORE_EOS
                )
                assert "".join([chunk.choices[0].text async for chunk in stream]) == want

    async def main() -> None:
        await asyncio.wait_for(asyncio.gather(*map(client_session, prompts, expected)), timeout=240)

    asyncio.run(main())


# ---- gRPC ----------------------------------------------------------------------------------

def test_grpc_generate_streams_the_engine_output(server):
    request = pb.GenerateRequest(request_id="r-1", text="hello world", max_tokens=12, temperature=0, ignore_eos=True,
                                 stream=True)
    responses = list(server.stub().Generate(request, metadata=OPEN))
    want = server.greedy("hello world", 12)
    assert len(responses) > 1 and {r.request_id for r in responses} == {"r-1"}
    assert [t for r in responses for t in r.token_ids] == want.token_ids
    assert "".join(r.text for r in responses) == want.text
    assert [r.finish_reason for r in responses] == [""] * (len(responses) - 1) + ["length"]
    assert not any(r.HasField("usage") for r in responses[:-1])
    usage = responses[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(want.prompt_token_ids), 12)
    assert usage.accepted_prediction_tokens == want.stats.accepted_tokens and list(usage.accepted_at_depth) == want.stats.accepted_at_depth

    ids = server.reference.encode("abc")
    by_ids = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), max_tokens=5, temperature=0, ignore_eos=True, stream=True)
    responses = list(server.stub().Generate(by_ids, metadata=OPEN))
    assert responses[0].request_id and "".join(r.text for r in responses) == server.greedy(ids, 5).text


def test_logprobs_are_the_engines_on_http_and_grpc(server):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
    [want] = server.reference.generate("hello world", params)
    out = server.client().completions.create(model="tiny", prompt="hello world", max_tokens=6, temperature=0,
                                             logprobs=2, extra_body=IGNORE_EOS)
    got = out.choices[0].logprobs
    assert got.token_logprobs == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-5)
    assert all(len(top) == 2 for top in got.top_logprobs) and len(got.tokens) == 6
    chat = server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=4, temperature=0, logprobs=True, top_logprobs=1,
                                                   extra_body=IGNORE_EOS)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 1 and c.logprob <= 0 for c in content)
    request = pb.GenerateRequest(text="hello world", max_tokens=6, temperature=0, ignore_eos=True, top_logprobs=2)
    [response] = server.stub().Generate(request, metadata=OPEN)
    assert [e.token_id for e in response.logprobs] == want.token_ids
    assert [e.logprob for e in response.logprobs] == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-5)
    assert all(len(e.top) == 2 for e in response.logprobs)


def test_grpc_without_stream_answers_in_one_message_even_a_unary_call(server):
    request = pb.GenerateRequest(text="hello world", max_tokens=12, temperature=0, ignore_eos=True)
    want = server.greedy("hello world", 12)
    [one] = list(server.stub().Generate(request, metadata=OPEN))
    assert (list(one.token_ids), one.text, one.finish_reason) == (want.token_ids, want.text, "length")
    assert one.usage.completion_tokens == 12 and one.usage.accepted_prediction_tokens == want.stats.accepted_tokens
    unary = grpc.insecure_channel(server.grpc).unary_unary(  # a client that took Generate for a unary RPC
        "/specinfer.v1.SpecInfer/Generate", request_serializer=pb.GenerateRequest.SerializeToString,
        response_deserializer=pb.GenerateResponse.FromString,
    )
    assert unary(request, metadata=OPEN, timeout=60).text == want.text


def test_grpc_cancelled_call_is_counted_and_aborted(server):
    def count(status: str) -> float:
        samples = server.metrics()["specinfer_api_requests"].samples
        return sum(s.value for s in samples if s.labels == {"protocol": "grpc", "status": status})

    # The tiny model may finish its 4,000 tokens before a cancellation crosses the Serve proxy on a
    # busy machine: such a call ends OK, and then we try again (a cancelled one must be seen).
    for _ in range(3):
        before, finished = count("CANCELLED"), count("OK")
        aborted = server.metrics()["specinfer_request_aborted"].samples[0].value
        request = pb.GenerateRequest(text="a long one", max_tokens=4000, temperature=0, ignore_eos=True, stream=True)
        call = server.stub().Generate(request, metadata=OPEN)
        assert next(call).token_ids
        call.cancel()
        deadline = time.monotonic() + 60  # the request would run for far longer than this
        while time.monotonic() < deadline:
            health = requests.get(f"{server.http}/health", timeout=10).json()
            if count("CANCELLED") > before and health["running"] == 0:
                assert server.metrics()["specinfer_request_aborted"].samples[0].value > aborted
                return
            if count("OK") > finished and health["running"] == 0:
                break  # it completed before the cancellation arrived
            time.sleep(0.2)
    pytest.fail(f"cancelled calls counted: {count('CANCELLED')} (before: {before}); {health}; aborted "
                f"{server.metrics()['specinfer_request_aborted'].samples[0].value} (before: {aborted})")


def test_grpc_health(server):
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.grpc))
    for service in ("", "specinfer.v1.SpecInfer"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), metadata=OPEN)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), metadata=OPEN)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:  # refused as the health protocol allows, without internals
        list(health.Watch(health_pb2.HealthCheckRequest(service=""), metadata=OPEN, timeout=30))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert err.value.details() == "grpc.health.v1.Health/Watch is not supported; poll Check"


def test_grpc_reflection_only_when_asked_for(server):
    stub = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(server.grpc))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert proxy_options(ServeConfig(grpc_reflection=True))["grpc_options"]["enable_reflection"] is True


GRPC_BAD = [  # (request, metadata, code)
    (pb.GenerateRequest(max_tokens=4), OPEN, grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(text=""), OPEN, grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 10**6])), OPEN, grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(text="hi", max_tokens=0), OPEN, grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(text="hi", max_tokens=10**6), OPEN, grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(text="hi", temperature=-1), OPEN, grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(text="hi", top_p=1.5), OPEN, grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(text="hi", temperature=float("nan")), OPEN, grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(text="hi", seed=-1), OPEN, grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(text="hi", top_logprobs=21, stream=True), OPEN, grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(text="hi"), SECURED, grpc.StatusCode.UNAUTHENTICATED),
    (pb.GenerateRequest(text="hi"), SECURED + (("authorization", "Bearer wrong"),), grpc.StatusCode.UNAUTHENTICATED),
]


@pytest.mark.parametrize("request_,metadata,code", GRPC_BAD, ids=[str(i) for i in range(len(GRPC_BAD))])
def test_grpc_errors_are_status_codes_and_service_goes_on(server, request_, metadata, code):
    with pytest.raises(grpc.RpcError) as err:
        list(server.stub().Generate(request_, metadata=metadata))
    assert err.value.code() == code and err.value.details() and "Traceback" not in err.value.details()
    good = pb.GenerateRequest(text="after", max_tokens=4, temperature=0, ignore_eos=True)
    metadata = SECURED + (("authorization", f"Bearer {KEY}"),) if metadata[0] == SECURED[0] else OPEN
    assert "".join(r.text for r in server.stub().Generate(good, metadata=metadata)) == server.greedy("after", 4).text


def test_grpc_client_error_is_one_log_line_without_traceback(server):
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    files = [*logs.glob("proxy_*.log"), *logs.glob("replica_open_*.log")]
    assert len(files) >= 2, sorted(p.name for p in logs.iterdir())
    start = {path: path.stat().st_size for path in files}

    def written() -> str:
        return "".join(path.read_bytes()[start[path]:].decode(errors="replace") for path in files)

    request_id = f"bad-temperature-{time.monotonic_ns()}"  # Serve's request id: on the proxy's and the replica's lines
    bad = pb.GenerateRequest(text="hi", temperature=-1)
    with pytest.raises(grpc.RpcError) as err:
        list(server.stub().Generate(bad, metadata=OPEN + (("request_id", request_id),)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in err.value.details()
    deadline = time.monotonic() + 30
    while f"{request_id} -- /specinfer.v1.SpecInfer/Generate open INVALID_ARGUMENT" not in written():  # the proxy's last line
        assert time.monotonic() < deadline, written()
        time.sleep(0.2)
    ours = [line for line in written().splitlines() if f"{request_id} -- gRPC request" in line]
    assert len(ours) == 1 and "refused: INVALID_ARGUMENT temperature" in ours[0], written()
    assert "Traceback" not in written() and "Request failed" not in written(), written()


def test_grpc_failure_log_lines():
    records, level = [], grpc_api.logger.level
    handler = logging.Handler()
    handler.emit = records.append
    grpc_api.logger.addHandler(handler)
    grpc_api.logger.setLevel(logging.INFO)
    try:
        for request_id, err in (("r-1", InvalidRequestError("top_p must be in (0, 1]")),
                                ("r-2", EngineStepError("the step failed")), ("r-3", ZeroDivisionError("oops")),
                                ("r-4", ApiError(503, "the model is loading (loading); retry shortly"))):
            grpc_api._log_failure(request_id, err, ApiError.of(err))
    finally:
        grpc_api.logger.removeHandler(handler)
        grpc_api.logger.setLevel(level)
    assert [(r.levelname, r.getMessage(), r.exc_info is not None) for r in records] == [
        ("INFO", "gRPC request r-1 refused: INVALID_ARGUMENT top_p must be in (0, 1]", False),
        ("ERROR", "gRPC request r-2 failed: the step failed", False),
        ("ERROR", "gRPC request r-3 failed: oops", True),  # unexpected: the one traceback
        ("INFO", "gRPC request r-4 refused: UNAVAILABLE the model is loading (loading); retry shortly", False),
    ]
    status_set = gRPCStatusError(grpc_status.StatusSet("x"), grpc.StatusCode.INVALID_ARGUMENT, "x")
    other = gRPCStatusError(ValueError("x"), grpc.StatusCode.INTERNAL, "x")

    def kept(err: BaseException) -> bool:
        record = logging.LogRecord("ray.serve", logging.ERROR, __file__, 1, "Request failed.", None,
                                   (type(err), err, None))
        return grpc_status._DropStatusSet().filter(record)

    assert not kept(status_set) and kept(other) and kept(ValueError("x"))


# ---- runtime ray -------------------------------------------------------------------------

def test_ray_runtime_serves_the_engine_output(server):
    client = server.client("/ray")
    out = client.completions.create(model="tiny", prompt="hello world", max_tokens=12, temperature=0, extra_body=IGNORE_EOS)
    want = server.greedy("hello world", 12)
    assert out.choices[0].text == want.text
    assert out.usage.completion_tokens_details.accepted_prediction_tokens == want.stats.accepted_tokens
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi there"}], max_tokens=8, temperature=0, stream=True,
        extra_body=IGNORE_EOS,
    ))
    assert "".join(c.choices[0].delta.content for c in chunks) == server.greedy("hi there", 8, chat=True).text
    request = pb.GenerateRequest(text="abc", max_tokens=6, temperature=0, ignore_eos=True)
    assert "".join(r.text for r in server.stub().Generate(request, metadata=DISTRIBUTED)) == server.greedy("abc", 6).text
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="", max_tokens=3)


# ---- bench-serve: the load client against the running app ----------------------------------

LEVEL_FIELDS = {
    "concurrency", "requests", "errors", "output_tokens", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99",
    "tpot_ms_mean", "latency_ms_p50", "latency_ms_p99", "tokens_per_chunk_mean", "output_tokens_per_s",
    "requests_per_s", "wall_s", "prefix_cache_hit_rate", "per_chunk_counts", "error_samples",
    "long_requests", "ttft_short_ms_p50", "ttft_short_ms_p99", "ttft_long_ms_p50", "ttft_long_ms_p99", "prompt_tokens_long_mean",
}
LONG_FIELDS = {"ttft_long_ms_p50", "ttft_long_ms_p99", "prompt_tokens_long_mean"}  # None without long prompts


def test_bench_serve_measures_levels_and_compares_setups(server, tmp_path, capsys):
    def generated(prefix: str) -> float:
        return server.metrics(prefix)["specinfer_generation_tokens"].samples[0].value

    before = {prefix: generated(prefix) for prefix in ("", "/secured")}
    load = ["bench-serve", "--concurrency", "1,4", "--num-requests", "6", "--max-tokens", "5", "--warmup", "0"]
    out = tmp_path / "runs"
    mixed = ["--long-fraction", "0.5", "--long-prompt-tokens", "300"]  # every other request: " the" x 300
    assert cli_main([*load, *mixed, "--url", server.http, "--label", "open", "--out", str(out)]) == 0
    assert cli_main([*load, "--url", f"{server.http}/secured/v1", "--api-key", KEY, "--label", "secured", "--out", str(out)]) == 0
    for label, prefix in (("open", ""), ("secured", "/secured")):
        result = json.loads((out / f"{label}.json").read_text())
        assert result["model"] == "tiny" and result["machine"] and KEY not in json.dumps(result)
        assert [lvl["concurrency"] for lvl in result["levels"]] == [1, 4]
        for lvl in result["levels"]:
            assert set(lvl) == LEVEL_FIELDS, lvl
            assert None not in [v for k, v in lvl.items() if k not in LONG_FIELDS or label == "open"], lvl
            if label == "open":  # 1200 byte-level tokens (+ BOS) in the long prompts
                assert lvl["long_requests"] == 3 and lvl["prompt_tokens_long_mean"] >= 1200
                assert lvl["ttft_short_ms_p50"] <= lvl["ttft_short_ms_p99"] and lvl["ttft_long_ms_p50"] > 0
                assert 0 < lvl["prefix_cache_hit_rate"] < 1  # the long prompt repeats: found cached after the first
            else:
                assert lvl["long_requests"] == 0 and lvl["ttft_short_ms_p50"] == lvl["ttft_ms_p50"]
            assert (lvl["requests"], lvl["errors"], lvl["output_tokens"]) == (6, 0, 6 * 5) and lvl["per_chunk_counts"]
            assert lvl["tokens_per_chunk_mean"] > 1  # counted from usage, not one per chunk
            assert lvl["ttft_ms_p50"] <= lvl["latency_ms_p50"] and lvl["ttft_ms_p99"] <= lvl["latency_ms_p99"]
            for name in ("ttft_ms", "itl_ms", "latency_ms"):
                assert 0 < lvl[f"{name}_p50"] <= lvl[f"{name}_p99"], (name, lvl)
            assert lvl["output_tokens_per_s"] > 0 and lvl["requests_per_s"] > 0 and lvl["tpot_ms_mean"] > 0
        # What the client counted is what the server generated.
        assert generated(prefix) - before[prefix] == sum(lvl["output_tokens"] for lvl in result["levels"])

    denied = tmp_path / "denied"  # every request refused: the bodies are kept, the command fails
    assert cli_main([*load, "--url", f"{server.http}/secured", "--api-key", "wrong", "--model", "tiny",
                     "--label", "denied", "--out", str(denied)]) == 2
    levels = json.loads((denied / "denied.json").read_text())["levels"]
    assert all(lvl["errors"] == lvl["requests"] and "invalid_api_key" in lvl["error_samples"][0] for lvl in levels)

    capsys.readouterr()
    assert cli_main(["bench-serve", "--compare", str(out), "--baseline", "open"]) == 0
    table = capsys.readouterr().out
    assert "| open | 4 |" in table and "| secured | 1 |" in table and table.count(" 1.00x |") >= 2
    assert "short TTFT p50 / p99 (ms)" in table and "prefix cache hits" in table
    for png in ("speedup_by_concurrency.png", "latency_by_concurrency.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG"), png
    assert cli_main(["bench-serve", "--compare", str(out), "--baseline", "missing"]) == 2
