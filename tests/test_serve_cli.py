"""`specinfer-dist serve` as a user runs it: a real process that starts Ray, says when it is ready,
answers, and stops cleanly on Ctrl-C or SIGTERM to its process group; its readiness wait alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import yaml
from serve_helpers import free_port, make_chat_checkpoint

from specinfer_dist.serve.cli import wait_ready

# Ray's lines from a shutdown that is not in order (its processes killed under it).
RAY_SHUTDOWN_NOISE = ("Failed to push error", "controller has died", "will be retried", "failed to shut down",
                      "Traceback")


def start_serve(tmp_path: Path, llm: str, *flags: str) -> tuple[subprocess.Popen, Path, int]:
    """`specinfer-dist serve` in a session of its own (its process group is the terminal's job)."""
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "engine": {"llm": llm, "ssms": [llm], "tree": "1,2,1"},
        "serve": {"model_name": "tiny", "ray_actor_options": {"num_cpus": 0}},
    }))
    port = free_port()
    command = [str(Path(sys.executable).with_name("specinfer-dist")), "serve", "--config", str(config),
               "--port", str(port), "--grpc-port", "0", *flags]
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log, port


def wait_for_line(proc: subprocess.Popen, log: Path, line: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while line not in log.read_text():
        assert proc.poll() is None, log.read_text()[-5000:]
        assert time.monotonic() < deadline, "not ready in time:\n" + log.read_text()[-5000:]
        time.sleep(0.5)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_serve_command_answers_and_stops_cleanly_on_a_signal_to_its_group(tmp_path, sig):
    llm = str(make_chat_checkpoint(tmp_path))
    key_file = tmp_path / "api_key"
    key_file.write_text("k\n")
    proc, log, port = start_serve(tmp_path, llm, "--api-key-file", str(key_file))
    try:
        wait_for_line(proc, log, f"OpenAI API at http://127.0.0.1:{port}/v1")  # said once ready
        started = log.read_text()
        assert "no gRPC; API key required" in started and "warning: --api-key" not in started  # not on the command line
        assert "Ready after " in started
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=30).json()["status"] == "ready"
        completion = requests.post(
            f"http://127.0.0.1:{port}/v1/completions", headers={"Authorization": "Bearer k"},
            json={"model": "tiny", "prompt": "hi", "max_tokens": 3, "temperature": 0}, timeout=30,
        )
        assert completion.status_code == 200 and completion.json()["choices"][0]["finish_reason"]
        os.killpg(proc.pid, sig)  # what Ctrl-C in a terminal, or kill -TERM -PGID, does
        assert proc.wait(timeout=60) == 0, log.read_text()[-5000:]  # Serve's 30 s wait for a dead controller: no more
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stopping = log.read_text().split("specinfer-dist: shutting down", 1)[1]
    assert not [noise for noise in RAY_SHUTDOWN_NOISE if noise in stopping], stopping
    with pytest.raises(requests.ConnectionError):  # the cluster it started is gone with it
        requests.get(f"http://127.0.0.1:{port}/health", timeout=5)


def test_serve_command_exits_non_zero_when_the_model_fails_to_load(tmp_path):
    llm = make_chat_checkpoint(tmp_path)
    (llm / "model.safetensors").write_bytes(b"not a safetensors file")
    proc, log, port = start_serve(tmp_path, str(llm))
    try:
        assert proc.wait(timeout=240) == 1, log.read_text()[-5000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = log.read_text()
    assert "specinfer-dist: the model failed to load: could not load model" in out, out[-5000:]
    assert "OpenAI API at" not in out and "specinfer-dist: shutting down" in out
    assert not [noise for noise in RAY_SHUTDOWN_NOISE if noise in out], out[-5000:]


class Health(BaseHTTPRequestHandler):
    answers: list[tuple[int, str]] = []  # served in turn; the last one from then on

    def do_GET(self) -> None:  # noqa: N802
        status, body = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args) -> None:
        pass


def serve_health(answers: list[tuple[int, object]]) -> tuple[ThreadingHTTPServer, str]:
    Health.answers = [(status, body if isinstance(body, str) else json.dumps(body)) for status, body in answers]
    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/health"


def loading(stage: str) -> tuple[int, dict]:
    return 503, {"status": "loading", "stage": stage}


def test_wait_ready_says_each_stage_once_and_returns_on_ready(capsys):
    server, url = serve_health([(404, "Path '/health' not found."), loading("loading the LLM"),
                                loading("loading the LLM"), loading("tuning"), (200, {"status": "ready", "running": 0})])
    try:
        assert wait_ready(url, threading.Event(), interval=0.01) is None
    finally:
        server.shutdown()
    assert capsys.readouterr().err.splitlines() == [
        "specinfer-dist: still loading: loading the LLM", "specinfer-dist: still loading: tuning"]


def test_wait_ready_returns_the_error_of_a_failed_load_and_stops_when_asked(capsys):
    server, url = serve_health([loading("loading the LLM"), (503, {"status": "failed", "error": "no weights"})])
    try:
        assert wait_ready(url, threading.Event(), interval=0.01) == "no weights"
    finally:
        server.shutdown()
    stop = threading.Event()
    stop.set()
    assert wait_ready(f"http://127.0.0.1:{free_port()}/health", stop) is None  # Ctrl-C while nothing answers
    server, url = serve_health([(200, {"status": "ok"})])  # a replica from before loading in the background
    try:
        assert wait_ready(url, threading.Event(), interval=0.01) is None
    finally:
        server.shutdown()
