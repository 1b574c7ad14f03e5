"""`specinfer-dist serve` as a user runs it: a real process that starts Ray, answers, and stops on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from serve_helpers import free_port, make_chat_checkpoint


def test_serve_command_answers_and_exits_cleanly_on_sigterm(tmp_path):
    llm = str(make_chat_checkpoint(tmp_path))
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "engine": {"llm": llm, "ssms": [llm], "tree": "1,2,1"},
        "serve": {"model_name": "tiny", "ray_actor_options": {"num_cpus": 0}},
    }))
    key_file = tmp_path / "api_key"
    key_file.write_text("k\n")
    port = free_port()
    command = [str(Path(sys.executable).with_name("specinfer-dist")), "serve", "--config", str(config),
               "--port", str(port), "--grpc-port", "0", "--api-key-file", str(key_file)]
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while f"OpenAI API at http://127.0.0.1:{port}/v1" not in log.read_text():  # says where, once ready
            assert proc.poll() is None, log.read_text()[-5000:]
            assert time.monotonic() < deadline, "not ready in time:\n" + log.read_text()[-5000:]
            time.sleep(1)
        started = log.read_text()
        assert "no gRPC; API key required" in started and "warning: --api-key" not in started  # not on the command line
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=30).json()["status"] == "ok"
        completion = requests.post(
            f"http://127.0.0.1:{port}/v1/completions", headers={"Authorization": "Bearer k"},
            json={"model": "tiny", "prompt": "hi", "max_tokens": 3, "temperature": 0}, timeout=30,
        )
        assert completion.status_code == 200 and completion.json()["choices"][0]["finish_reason"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, log.read_text()[-5000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(requests.ConnectionError):  # the cluster it started is gone with it
        requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
