"""A newcomer's first minutes, measured as they live them: the README's one-off ``generate`` on
an empty tuning cache, then ``specinfer-dist serve`` polled on ``/health`` from its first second
until it is ready, then ``generate`` again (it must reuse what ``serve`` raced, not race again).

The commands run as subprocesses with the project's own entry point, each on a cache holding the
converted model but no tuning results (unless reuse is what is measured), so the numbers are what
a user sees: end-to-end seconds, every stderr line with the second it arrived, every health poll.

``python -m specinfer_dist.bench.first_minutes [--llm default] [--out DIR]`` prints a summary and
writes ``first_minutes.json`` (lines and polls included) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from specinfer_dist.models.cache import cache_root
from specinfer_dist.models.loader import resolve_model_dir
from specinfer_dist.runtime.device import machine

README_PROMPT = "Explain speculative decoding in two sentences."
TUNING_DIRS = ("tree-auto", "tree-race")  # the tuning results in the cache (tuning/)
POLL_S = 0.5
POLL_TIMEOUT_S = 2.0  # a health poll slower than this counts as timed out
RACE_LINE = "racing"  # what tuning/race.py says when it races (absent when it reuses a result)


def _entry_point() -> str:
    return str(Path(sys.executable).with_name("specinfer-dist"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fresh_cache(llm: str, work: Path) -> Path:
    """A cache dir with the converted LLM (and nothing tuned): what a user has after the first
    download, before any tuning. Hub ids and local paths need nothing copied."""
    cache = work / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    if llm == "default":
        source = resolve_model_dir("default", progress=True)
        link = cache / source.name
        if not link.exists():
            link.symlink_to(source, target_is_directory=True)
    return cache


def clear_tuning(cache: Path) -> None:
    for name in TUNING_DIRS:
        shutil.rmtree(cache / name, ignore_errors=True)


class _Lines:
    """A process's merged stdout/stderr, each line stamped with seconds since ``start``."""

    def __init__(self, proc: subprocess.Popen, start: float) -> None:
        self.lines: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._read, args=(proc, start), daemon=True)
        self.thread.start()

    def _read(self, proc: subprocess.Popen, start: float) -> None:
        for line in proc.stdout:
            self.lines.append((round(time.perf_counter() - start, 2), line.rstrip("\n")))

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def run_generate(llm: str, env: dict[str, str], extra: list[str]) -> dict[str, Any]:
    """The README's one-off command; seconds end to end and its output lines."""
    command = [_entry_point(), "generate", "--llm", llm, "--chat", "--prompt", README_PROMPT, *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = _Lines(proc, start)
    code = proc.wait()
    lines.thread.join()
    return {"seconds": round(time.perf_counter() - start, 2), "exit_code": code, "lines": lines.lines,
            "raced": any(RACE_LINE in line for _, line in lines.lines)}


def _poll(url: str) -> tuple[int | str, str]:
    try:
        with urllib.request.urlopen(url, timeout=POLL_TIMEOUT_S) as answer:
            return answer.status, json.loads(answer.read()).get("status", "")
    except urllib.error.HTTPError as err:  # ours is JSON; Serve's proxy answers plain text before a replica exists
        body = err.read()
        return err.code, json.loads(body).get("status", "") if body.startswith(b"{") else "proxy"
    except (TimeoutError, socket.timeout):
        return "timeout", ""
    except (urllib.error.URLError, ConnectionError):
        return "refused", ""  # the proxy is not listening yet


def run_serve(llm: str, env: dict[str, str], extra: list[str], tuned_within_s: float) -> dict[str, Any]:
    """``serve`` from its first second: every /health poll until ready, then (while it keeps
    serving) until tree auto has finished in the background, then Ctrl-C (SIGINT to its group)."""
    port = _free_port()
    command = [_entry_point(), "serve", "--llm", llm, "--port", str(port), "--grpc-port", str(_free_port()), *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = _Lines(proc, start)
    polls: list[tuple[float, int | str, str]] = []
    ready_s = None
    try:
        while proc.poll() is None and time.perf_counter() - start < 600:
            code, status = _poll(f"http://127.0.0.1:{port}/health")
            polls.append((round(time.perf_counter() - start, 2), code, status))
            if code == 200:
                ready_s = polls[-1][0]
                break
            time.sleep(POLL_S)
        deadline = time.perf_counter() + tuned_within_s  # let the background race finish and cache its result
        while proc.poll() is None and time.perf_counter() < deadline and not _tuned(lines):
            time.sleep(1)
        tuned_s = round(time.perf_counter() - start, 2) if _tuned(lines) else None
    finally:
        stopped = time.perf_counter()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
        lines.thread.join(10)
    return {"ready_s": ready_s, "tuned_s": tuned_s, "stop_s": round(time.perf_counter() - stopped, 2),
            "exit_code": code, "polls": polls, "lines": lines.lines,
            "polls_answered": sum(isinstance(c, int) for _, c, _ in polls),
            "polls_timed_out": sum(c == "timeout" for _, c, _ in polls)}


def _tuned(lines: _Lines) -> bool:
    text = lines.text()
    return any(mark in text for mark in ("switched to", "tree auto chose", "tree auto failed", "using cached"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm", default="default")
    parser.add_argument("--out", default="docs/bench/cpu/first-minutes")
    parser.add_argument("--tuned-within-s", type=float, default=300, help="how long serve may take to finish tuning")
    parser.add_argument("--engine-args", default="", help="extra engine flags for every command (e.g. --ssm PATH)")
    args = parser.parse_args(argv)
    extra = args.engine_args.split()
    with tempfile.TemporaryDirectory(prefix="first-minutes-") as tmp:
        cache = fresh_cache(args.llm, Path(tmp))
        env = {**os.environ, "SPECINFER_DIST_CACHE": str(cache)}
        clear_tuning(cache)
        first = run_generate(args.llm, env, extra)
        clear_tuning(cache)
        served = run_serve(args.llm, env, extra, args.tuned_within_s)
        again = run_generate(args.llm, env, extra)  # on what serve tuned
    result = {"machine": machine(), "llm": args.llm, "generate_empty_cache": first, "serve": served,
              "generate_after_serve": again}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "first_minutes.json").write_text(json.dumps(result, indent=2))
    print(summary(result))
    return 0 if first["exit_code"] == 0 and served["ready_s"] is not None and again["exit_code"] == 0 else 1


def summary(result: dict[str, Any]) -> str:
    first, served, again = result["generate_empty_cache"], result["serve"], result["generate_after_serve"]
    ours = [line for _, line in served["lines"] if "specinfer-dist:" in line]
    return "\n".join([
        f"first minutes on {result['machine']} ({result['llm']})",
        f"  generate, empty tuning cache: {first['seconds']:.1f} s end to end (exit {first['exit_code']}, "
        f"raced: {first['raced']})",
        f"  serve: ready after {served['ready_s']} s; /health polls answered {served['polls_answered']}/"
        f"{len(served['polls'])}, timed out {served['polls_timed_out']}; statuses "
        f"{sorted({str(c) for _, c, _ in served['polls']})}; tuning done after {served['tuned_s']} s; "
        f"Ctrl-C stop {served['stop_s']:.1f} s, exit {served['exit_code']}; {len(ours)} progress lines in its console",
        f"  generate after serve: {again['seconds']:.1f} s end to end (raced again: {again['raced']})",
    ])


if __name__ == "__main__":
    sys.exit(main())
