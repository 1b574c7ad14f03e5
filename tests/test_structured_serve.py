"""Structured outputs over the wire, end to end: OpenAI's ``response_format`` (json_object,
json_schema) and vLLM's ``structured_outputs`` extension on /v1/chat/completions and
/v1/completions through the openai client, and GenerateRequest.structured_outputs through the
generated gRPC stubs, against one Serve app of the tiny random chat model (as test_serve.py's).

The model is random, so every constraint here bounds its output (enums, bounded integers,
``maxLength`` strings, fixed-length regexes, choices) and each constrained answer must end with
"stop" within its max_tokens. Served outputs are also compared with an in-process engine of the
same model under the same constraint: the wire changes nothing. The engine's exactness under a
constraint is test_structured_outputs.py's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import grpc
import jsonschema
import openai
import pytest
import ray
import requests
from ray import serve
from serve_helpers import free_port, make_chat_checkpoint, wait_ready

from specinfer_dist import LLMEngine, SamplingParams
from specinfer_dist.config import EngineConfig, ServeConfig
from specinfer_dist.runtime.grammar import StructuredOutputsParams
from specinfer_dist.serve import make_app
from specinfer_dist.serve.app import proxy_options
from specinfer_dist.serve.proto import specinfer_pb2 as pb
from specinfer_dist.serve.proto import specinfer_pb2_grpc as pb_grpc

APP = (("application", "structured"),)  # gRPC routing
SCHEMA = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "ok": {"type": "boolean"},
        "name": {"type": "string", "maxLength": 6},
    },
    "required": ["kind", "age", "ok", "name"],
    "additionalProperties": False,
}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}
PHONE = r"\d{3}-\d{4}"
CHOICES = ["yes", "no", "maybe"]
ROOM = 120  # max_tokens: far more than any constrained answer here needs (SCHEMA's: about 60)


@dataclass
class Server:
    http: str
    grpc: str
    reference: LLMEngine

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.http}/v1", api_key="unused", max_retries=0, timeout=60)

    def expected(self, prompt: str, chat: bool = False, max_tokens: int = ROOM, seed: int | None = None,
                 **constraint) -> str:
        """The in-process engine's text for ``prompt`` under ``constraint``: greedy, or sampled with ``seed``."""
        params = SamplingParams(max_tokens=max_tokens, temperature=0 if seed is None else 1.0, seed=seed,
                                structured_outputs=StructuredOutputsParams(**constraint))
        [out] = self.reference.generate(prompt, params, chat=chat)
        return out.text

    def stub(self) -> pb_grpc.SpecInferStub:
        return pb_grpc.SpecInferStub(grpc.insecure_channel(self.grpc))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    llm = str(make_chat_checkpoint(tmp_path_factory.mktemp("structured")))
    engine = EngineConfig(llm=llm, ssms=[llm], tree="1,2,1")
    http_port, grpc_port = free_port(), free_port()
    # "local": never join a cluster someone started here.
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="structured", log_to_driver=False)
    try:
        serve.start(**proxy_options(ServeConfig(port=http_port, grpc_port=grpc_port)))
        serve.run(make_app(engine, ServeConfig(model_name="tiny")), name="structured", route_prefix="/")
        wait_ready(f"http://127.0.0.1:{http_port}/health")
        yield Server(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", LLMEngine.from_config(engine))
    finally:
        serve.shutdown()
        ray.shutdown()


def chat(server: Server, content: str, **kwargs):
    return server.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": content}], **{"max_tokens": ROOM, "temperature": 0, **kwargs}
    )


# ---- HTTP: each kind of constraint ---------------------------------------------------------

def test_json_schema_on_chat(server):
    out = chat(server, "give me a pet", response_format=JSON_SCHEMA_FORMAT)
    [choice] = out.choices
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    assert choice.finish_reason == "stop" and out.usage.completion_tokens < ROOM
    assert choice.message.content == server.expected("give me a pet", chat=True, json=SCHEMA)


def test_json_object(server):
    # Any object is unbounded: these prompts are ones where the random model closes it at once.
    out = server.client().completions.create(model="tiny", prompt="abc", max_tokens=ROOM, temperature=0,
                                             extra_body={"response_format": {"type": "json_object"}})
    assert out.choices[0].finish_reason == "stop" and isinstance(json.loads(out.choices[0].text), dict)
    sampled = chat(server, "an object", temperature=1.0, seed=3, response_format={"type": "json_object"})
    assert sampled.choices[0].finish_reason == "stop" and isinstance(json.loads(sampled.choices[0].message.content), dict)
    assert sampled.choices[0].message.content == server.expected("an object", chat=True, seed=3, json_object=True)
    extension = chat(server, "an object", temperature=1.0, seed=3, extra_body={"structured_outputs": {"json_object": True}})
    assert extension.choices[0].message.content == sampled.choices[0].message.content  # the same constraint


def test_regex_and_choice_through_the_extension(server):
    out = chat(server, "call me", extra_body={"structured_outputs": {"regex": PHONE}})
    assert re.fullmatch(PHONE, out.choices[0].message.content) and out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.content == server.expected("call me", chat=True, regex=PHONE)
    out = server.client().completions.create(model="tiny", prompt="well?", max_tokens=ROOM, temperature=0,
                                             extra_body={"structured_outputs": {"choice": CHOICES}})
    assert out.choices[0].text in CHOICES and out.choices[0].finish_reason == "stop"


def test_completions_take_a_schema_as_an_object_or_json_text(server):
    def complete(**kwargs):
        out = server.client().completions.create(model="tiny", prompt="a pet record: ", max_tokens=ROOM, temperature=0,
                                                 **kwargs)
        assert out.choices[0].finish_reason == "stop"
        return out.choices[0].text

    text = complete(extra_body={"response_format": JSON_SCHEMA_FORMAT})  # the SDK has it for chat only
    jsonschema.validate(json.loads(text), SCHEMA)
    assert text == server.expected("a pet record: ", json=SCHEMA)
    assert complete(extra_body={"structured_outputs": {"json": SCHEMA}}) == text
    assert complete(extra_body={"structured_outputs": {"json": json.dumps(SCHEMA)}}) == text


def test_streamed_deltas_make_the_constrained_answer(server):
    stream = server.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "give me a pet"}], max_tokens=ROOM, temperature=0,
        response_format=JSON_SCHEMA_FORMAT, stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content for c in chunks[:-1])
    jsonschema.validate(json.loads(text), SCHEMA)
    assert text == server.expected("give me a pet", chat=True, json=SCHEMA)
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-1].usage.completion_tokens < ROOM
    completions = server.client().completions.create(model="tiny", prompt="call me", max_tokens=ROOM, temperature=0,
                                                     stream=True, extra_body={"structured_outputs": {"regex": PHONE}})
    assert re.fullmatch(PHONE, "".join(c.choices[0].text for c in completions))


def test_n_choices_each_follow_the_constraint_with_their_own_seed(server):
    def sample(seed: int) -> list[str]:
        out = server.client().completions.create(model="tiny", prompt="a pet record: ", max_tokens=ROOM, temperature=1.0,
                                                 seed=seed, n=2, extra_body={"response_format": JSON_SCHEMA_FORMAT})
        assert [c.finish_reason for c in out.choices] == ["stop", "stop"]
        return [c.text for c in out.choices]

    texts = sample(11)
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert texts == [server.expected("a pet record: ", seed=seed, json=SCHEMA) for seed in (11, 12)]  # choice i: seed + i
    assert texts[0] != texts[1] and sample(11) == texts


def test_max_tokens_cuts_a_constrained_answer_with_length(server):
    out = chat(server, "give me a pet", max_tokens=5, response_format=JSON_SCHEMA_FORMAT)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 5
    assert server.expected("give me a pet", chat=True, json=SCHEMA).startswith(out.choices[0].message.content)


# ---- bad input, then a correct answer ------------------------------------------------------

MESSAGES = [{"role": "user", "content": "x"}]
BAD = [  # (path, body, param): param None where the engine judged the constraint itself
    ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": "json_schema"}}, "response_format"),
    ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {
        "schema": SCHEMA}}}, "response_format"),
    ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {
        "name": "pet"}}}, "response_format"),
    ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {
        "name": "pet", "schema": "not an object"}}}, "response_format"),
    ("/v1/completions", {"prompt": "x", "response_format": {"type": "text", "json_schema": {
        "name": "pet", "schema": SCHEMA}}}, "response_format"),
    ("/v1/completions", {"prompt": "x", "response_format": {"type": "yaml"}}, "response_format"),
    ("/v1/completions", {"prompt": "x", "response_format": {"type": "json_object", "extra": 1}}, "response_format"),
    ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": "json_object"},
                              "structured_outputs": {"regex": "a"}}, "structured_outputs"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {}}, "structured_outputs"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"json_object": False}}, "structured_outputs"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"choice": []}}, "structured_outputs"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"regex": 5}}, "structured_outputs"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "a", "backend": "xgrammar"}}, "structured_outputs"),
    # compiled by the engine, refused before the request is queued (streams too: before the 200)
    ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {
        "name": "pet", "schema": {"type": "strin"}}}}, None),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"json": "{not json"}}, None),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "a(b"}}, None),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "a(b"}, "stream": True, "n": 2}, None),
    ("/v1/chat/completions", {"messages": MESSAGES, "structured_outputs": {"grammar": "start: nope"}, "stream": True}, None),
]


@pytest.mark.parametrize("path,body,param", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_constraint_is_refused_and_service_goes_on(server, path, body, param):
    response = requests.post(f"{server.http}{path}", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert (param or "invalid") in error["message"]  # it names what is wrong, or says what the engine found
    out = chat(server, "after", max_tokens=ROOM, extra_body={"structured_outputs": {"choice": CHOICES}})
    assert out.choices[0].message.content in CHOICES and out.choices[0].finish_reason == "stop"


def test_response_format_text_is_free_text(server):
    out = chat(server, "hi", max_tokens=6, response_format={"type": "text"}, extra_body={"ignore_eos": True})
    [want] = server.reference.generate("hi", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), chat=True)
    assert out.choices[0].message.content == want.text and out.choices[0].finish_reason == "length"


# ---- gRPC ----------------------------------------------------------------------------------

def test_grpc_constrained_generation(server):
    request = pb.GenerateRequest(text="a pet record: ", max_tokens=ROOM, temperature=0,
                                 structured_outputs=pb.StructuredOutputs(json_schema=json.dumps(SCHEMA)))
    [one] = server.stub().Generate(request, metadata=APP)
    jsonschema.validate(json.loads(one.text), SCHEMA)
    assert one.finish_reason == "stop" and one.text == server.expected("a pet record: ", json=SCHEMA)
    request.stream = True
    streamed = list(server.stub().Generate(request, metadata=APP))
    assert "".join(r.text for r in streamed) == one.text and streamed[-1].finish_reason == "stop"
    for constraint, check in (
        (pb.StructuredOutputs(regex=PHONE), lambda text: re.fullmatch(PHONE, text)),
        (pb.StructuredOutputs(choice=pb.ChoiceList(choices=CHOICES)), lambda text: text in CHOICES),
        (pb.StructuredOutputs(json_object=True), lambda text: isinstance(json.loads(text), dict)),
        (pb.StructuredOutputs(grammar='start: "a" | "b" "c"'), lambda text: text in ("a", "bc")),
    ):
        [one] = server.stub().Generate(pb.GenerateRequest(text="abc", max_tokens=ROOM, temperature=0,
                                                          structured_outputs=constraint), metadata=APP)
        assert one.finish_reason == "stop" and check(one.text), (constraint, one.text)


GRPC_BAD = [  # (constraint, what the details name)
    (pb.StructuredOutputs(regex="a(b"), "unclosed group"),
    (pb.StructuredOutputs(json_schema='{"type": "strin"}'), "strin"),
    (pb.StructuredOutputs(json_schema="{not json"), "invalid JSON schema"),
    (pb.StructuredOutputs(), "structured_outputs"),
    (pb.StructuredOutputs(choice=pb.ChoiceList()), "choice"),
    (pb.StructuredOutputs(json_object=False), "exactly one"),
]


@pytest.mark.parametrize("constraint,reason", GRPC_BAD, ids=[str(i) for i in range(len(GRPC_BAD))])
def test_grpc_bad_constraint_is_invalid_argument_and_service_goes_on(server, constraint, reason):
    request = pb.GenerateRequest(text="x", stream=True, structured_outputs=constraint)
    with pytest.raises(grpc.RpcError) as err:
        list(server.stub().Generate(request, metadata=APP))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and reason in err.value.details()
    assert "Traceback" not in err.value.details()
    good = pb.GenerateRequest(text="after", max_tokens=ROOM, temperature=0,
                              structured_outputs=pb.StructuredOutputs(choice=pb.ChoiceList(choices=CHOICES)))
    assert "".join(r.text for r in server.stub().Generate(good, metadata=APP)) in CHOICES


# ---- the structured bench's client mode ----------------------------------------------------

def test_structured_bench_through_the_openai_client(server, tmp_path):
    """``python -m specinfer_dist.bench.structured --url``: bounded schemas come back valid with "stop"
    (and as the engine makes them); a small max_tokens gives "length" cuts, counted apart, not failures."""
    from specinfer_dist.bench import structured

    flag = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(row) for row in [{"name": "pet", "prompt": "give me a pet", "schema": SCHEMA},
                                                              {"name": "flag", "prompt": "yes?", "schema": flag}]))
    args = ["--url", server.http, "--prompts", str(prompts), "--concurrency", "2", "--server", "tiny test server"]
    assert structured.main([*args, "--max-tokens", str(ROOM), "--out", str(tmp_path / "room")]) == 0
    result = json.loads((tmp_path / "room" / "results.json").read_text())
    assert result["model"] == "tiny" and result["server"] == "tiny test server" and result["concurrency"] == 2
    assert (result["valid"], result["valid_pct"], result["finish_reasons"]) == (2, 100.0, {"stop": 2})
    assert result["failed"] == result["length_cut"] == []
    pet, _ = result["per_prompt"]
    assert pet["name"] == "pet" and pet["text"] == server.expected("give me a pet", chat=True, json=SCHEMA)
    assert result["completion_tokens"] == sum(r["completion_tokens"] for r in result["per_prompt"]) > 0
    assert result["server_counters"]["generation_tokens"] == result["completion_tokens"]
    assert result["server_counters"]["spec_decode_num_drafts"] > 0  # tree 1,2,1: drafted and verified

    assert structured.main([*args, "--limit", "1", "--max-tokens", "5", "--out", str(tmp_path / "cut")]) == 0
    cut = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert (cut["finish_reasons"], cut["length_cut"], cut["failed"], cut["valid"]) == ({"length": 1}, ["pet"], [], 0)
    assert cut["completion_tokens"] == 5
