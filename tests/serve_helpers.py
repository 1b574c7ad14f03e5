"""Shared by the serving tests: a tiny chat-capable checkpoint and free loopback ports."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import requests

from helpers import make_tiny_checkpoint
from transformers import AutoTokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


# A server-side bug to provoke a 500 with: the template divides by zero on a "tool" message.
BROKEN_CHAT_TEMPLATE = "{% for m in messages %}{% if m['role'] == 'tool' %}{{ 1 // 0 }}{% endif %}{% endfor %}" + CHAT_TEMPLATE


def make_chat_checkpoint(tmp_path: Path, template: str = CHAT_TEMPLATE) -> Path:
    """A tiny random Llama whose tokenizer has a chat template, with room for long generations."""
    path = make_tiny_checkpoint(tmp_path, "llama", seed=1, max_position_embeddings=4096)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(health_url: str, timeout: float = 300) -> None:
    """Poll a replica's /health until it says ready (200); fail on "failed" or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        answer = requests.get(health_url, timeout=10)
        if answer.status_code == 200:
            return
        is_ours = answer.headers.get("content-type", "").startswith("application/json")  # not the proxy's own
        assert not (is_ours and answer.json().get("status") == "failed"), answer.text
        assert time.monotonic() < deadline, f"not ready after {timeout} s: {answer.text}"
        time.sleep(0.2)
