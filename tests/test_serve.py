"""The Ray Serve app end to end over loopback: the openai client on HTTP, the generated stubs on
gRPC. One Ray cluster and three apps for the module: "open", "secured" (API key) and "distributed"
(runtime ray: each replica drives a Coordinator with verifier-shard and draft-worker actors)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import grpc
import openai
import pytest
import ray
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.serve.api import RunTarget
from serve_helpers import free_port, make_chat_checkpoint

from specinfer_dist import LLMEngine, SamplingParams
from specinfer_dist.cli import main as cli_main
from specinfer_dist.config import ClusterConfig, EngineConfig, ServeConfig
from specinfer_dist.serve import make_app
from specinfer_dist.serve.grpc_api import GRPC_SERVICER_FUNCTIONS
from specinfer_dist.serve.proto import specinfer_pb2 as pb
from specinfer_dist.serve.proto import specinfer_pb2_grpc as pb_grpc

KEY = "sk-test-0123456789"
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
    llm = str(make_chat_checkpoint(tmp_path_factory.mktemp("serve")))
    engine = EngineConfig(llm=llm, ssms=[llm], tree="1,2,1")
    http_port, grpc_port = free_port(), free_port()
    # "local": never join a cluster someone started here. Logical CPUs: 3 replicas + the Ray runtime's actors.
    ray.init(address="local", num_cpus=8, include_dashboard=False, namespace="serve", log_to_driver=False)
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": http_port},
            grpc_options={"port": grpc_port, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS},
        )
        serve.run_many([
            RunTarget(make_app(engine, ServeConfig(model_name="tiny", max_request_bytes=MAX_BODY)), "open", "/"),
            RunTarget(make_app(engine, ServeConfig(model_name="tiny", api_key=KEY)), "secured", "/secured"),
            RunTarget(make_app(engine, ServeConfig(model_name="tiny", runtime="ray"), ClusterConfig(step_timeout_s=60)),
                      "distributed", "/ray"),
        ])
        yield Server(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", LLMEngine.from_config(engine))
    finally:
        serve.shutdown()
        ray.shutdown()


IGNORE_EOS = {"ignore_eos": True}  # random tiny models may say EOS anywhere


# ---- HTTP, OpenAI client -------------------------------------------------------------------

def test_models_and_health(server):
    assert [m.id for m in server.client().models.list().data] == ["tiny"]
    health = requests.get(f"{server.http}/health", timeout=10).json()
    assert health["status"] == "ok" and health["running"] == 0


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
]


@pytest.mark.parametrize("path,body,status,param", BAD_REQUESTS, ids=[str(i) for i in range(len(BAD_REQUESTS))])
def test_bad_request_is_refused_and_service_goes_on(server, path, body, status, param):
    kwargs = {"data": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    response = requests.post(f"{server.http}{path}", timeout=30, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["param"] == param
    out = server.client().completions.create(model="tiny", prompt="after", max_tokens=4, temperature=0, extra_body=IGNORE_EOS)
    assert out.choices[0].text == server.greedy("after", 4).text


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
    request = pb.GenerateRequest(request_id="r-1", text="hello world", max_tokens=12, temperature=0, ignore_eos=True)
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
    by_ids = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), max_tokens=5, temperature=0, ignore_eos=True)
    responses = list(server.stub().Generate(by_ids, metadata=OPEN))
    assert responses[0].request_id and "".join(r.text for r in responses) == server.greedy(ids, 5).text


def test_grpc_health(server):
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.grpc))
    for service in ("", "specinfer.v1.SpecInfer"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), metadata=OPEN)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), metadata=OPEN)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


GRPC_BAD = [  # (request, metadata, code)
    (pb.GenerateRequest(max_tokens=4), OPEN, grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(text=""), OPEN, grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 10**6])), OPEN, grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(text="hi", max_tokens=0), OPEN, grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(text="hi", max_tokens=10**6), OPEN, grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(text="hi", temperature=-1), OPEN, grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(text="hi", top_p=1.5), OPEN, grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateRequest(text="hi"), SECURED, grpc.StatusCode.UNAUTHENTICATED),
    (pb.GenerateRequest(text="hi"), SECURED + (("authorization", "Bearer wrong"),), grpc.StatusCode.UNAUTHENTICATED),
]


@pytest.mark.parametrize("request_,metadata,code", GRPC_BAD, ids=[str(i) for i in range(len(GRPC_BAD))])
def test_grpc_errors_are_status_codes_and_service_goes_on(server, request_, metadata, code):
    with pytest.raises(grpc.RpcError) as err:
        list(server.stub().Generate(request_, metadata=metadata))
    assert err.value.code() == code and err.value.details()
    good = pb.GenerateRequest(text="after", max_tokens=4, temperature=0, ignore_eos=True)
    metadata = SECURED + (("authorization", f"Bearer {KEY}"),) if metadata[0] == SECURED[0] else OPEN
    assert "".join(r.text for r in server.stub().Generate(good, metadata=metadata)) == server.greedy("after", 4).text


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
    "requests_per_s", "wall_s", "per_chunk_counts", "error_samples",
}


def test_bench_serve_measures_levels_and_compares_setups(server, tmp_path, capsys):
    def generated(prefix: str) -> float:
        return server.metrics(prefix)["specinfer_generation_tokens"].samples[0].value

    before = {prefix: generated(prefix) for prefix in ("", "/secured")}
    load = ["bench-serve", "--concurrency", "1,4", "--num-requests", "6", "--max-tokens", "5", "--warmup", "0"]
    out = tmp_path / "runs"
    assert cli_main([*load, "--url", server.http, "--label", "open", "--out", str(out)]) == 0
    assert cli_main([*load, "--url", f"{server.http}/secured/v1", "--api-key", KEY, "--label", "secured", "--out", str(out)]) == 0
    for label, prefix in (("open", ""), ("secured", "/secured")):
        result = json.loads((out / f"{label}.json").read_text())
        assert result["model"] == "tiny" and result["machine"] and KEY not in json.dumps(result)
        assert [lvl["concurrency"] for lvl in result["levels"]] == [1, 4]
        for lvl in result["levels"]:
            assert set(lvl) == LEVEL_FIELDS and None not in lvl.values(), lvl
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
    for png in ("speedup_by_concurrency.png", "latency_by_concurrency.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG"), png
    assert cli_main(["bench-serve", "--compare", str(out), "--baseline", "missing"]) == 2
