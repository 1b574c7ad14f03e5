"""A replica answers from its first second: /health and every route say "loading" (503, OpenAI's
error body, Retry-After) while the engine loads in the background, then serve; a load that fails
is reported, not hung on. The HTTP app runs under uvicorn on a real socket; clients are the openai
package and urllib; gRPC health is asked of the same Service. Loading is the real build, held at
its start by a gate so the test sees the loading state for as long as it needs."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from email.message import Message

import openai
import pytest
import uvicorn
from grpc_health.v1 import health_pb2
from serve_helpers import free_port, make_chat_checkpoint

from specinfer_dist.config import EngineConfig, ServeConfig
from specinfer_dist.serve import grpc_api
from specinfer_dist.serve import service as service_module
from specinfer_dist.serve.api_errors import ApiError
from specinfer_dist.serve.http_api import build_http_app
from specinfer_dist.serve.service import Service


class _Server:
    """The replica's FastAPI app under uvicorn on a free loopback port."""

    def __init__(self, service: Service) -> None:
        self.port = free_port()
        config = uvicorn.Config(build_http_app(service), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0)

    def health(self) -> tuple[int, dict, Message]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as response:
                return response.status, json.loads(response.read()), response.headers
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read()), err.headers

    def stop(self, service: Service) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        service.shutdown()
        service._loader.join(120)  # no load left running when the interpreter exits


@pytest.fixture
def gated_build(monkeypatch):
    """Hold every engine build at its start until the test opens the gate."""
    gate = threading.Event()
    real = service_module.build_engine

    def build(*args, **kwargs):
        assert gate.wait(120), "the test never opened the gate"
        return real(*args, **kwargs)

    monkeypatch.setattr(service_module, "build_engine", build)
    yield gate
    gate.set()


def test_loading_answers_503_then_serves(tmp_path, gated_build):
    llm = str(make_chat_checkpoint(tmp_path))
    service = Service(EngineConfig(llm=llm, mode="incremental"), ServeConfig(model_name="tiny"), progress=False)
    server = _Server(service)
    try:
        status, body, headers = server.health()
        assert status == 503 and body["status"] == "loading" and body["stage"] and headers.get("Retry-After") == "2"
        for call in (lambda: server.client.models.list(),
                     lambda: server.client.completions.create(model="tiny", prompt="hi", max_tokens=2),
                     lambda: server.client.chat.completions.create(
                         model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)):
            with pytest.raises(openai.APIStatusError) as err:
                call()
            assert err.value.status_code == 503 and err.value.body["code"] == "model_loading"
            assert "loading" in err.value.body["message"]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5).read().decode()
        assert "specinfer_api_requests_total" in metrics  # counted while loading, no engine gauges yet
        assert "specinfer_num_requests_running" not in metrics
        whole = health_pb2.HealthCheckRequest(service="")
        assert grpc_api.check_health(whole, None, service).status == health_pb2.HealthCheckResponse.NOT_SERVING
        gated_build.set()
        service.wait_ready(120)
        status, body, _ = server.health()
        assert status == 200 and body["status"] == "ready"
        assert grpc_api.check_health(whole, None, service).status == health_pb2.HealthCheckResponse.SERVING
        [model] = server.client.models.list().data
        assert model.id == "tiny"
        out = server.client.completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=0)
        assert out.usage.completion_tokens == 3
    finally:
        gated_build.set()
        server.stop(service)


def test_a_failed_load_is_reported_not_hung_on(tmp_path):
    service = Service(EngineConfig(llm=str(tmp_path / "missing")), ServeConfig(model_name="tiny"), progress=False)
    server = _Server(service)
    try:
        with pytest.raises(ApiError, match="failed to load"):
            service.wait_ready(120)
        status, body, _ = server.health()
        assert status == 503 and body["status"] == "failed" and "missing" in body["error"]
        with pytest.raises(openai.APIStatusError) as err:
            server.client.completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert err.value.status_code == 503 and err.value.body["code"] == "model_load_failed"
        whole = health_pb2.HealthCheckRequest(service="")
        assert grpc_api.check_health(whole, None, service).status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        server.stop(service)


def test_shutdown_while_loading_stops_the_engine_it_was_loading(tmp_path, gated_build):
    llm = str(make_chat_checkpoint(tmp_path))
    service = Service(EngineConfig(llm=llm, mode="incremental"), ServeConfig(model_name="tiny"), progress=False)
    service.shutdown()  # before the engine exists
    gated_build.set()
    with pytest.raises(ApiError, match="shutting down"):
        service.wait_ready(120)
    assert service.status()["status"] == "stopped"
    engine_loops = [t for t in threading.enumerate() if t.name == "specinfer-engine" and t.is_alive()]
    assert not engine_loops, "the engine built after the shutdown was stopped"
