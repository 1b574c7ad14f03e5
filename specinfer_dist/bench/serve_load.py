"""Load benchmark of a running OpenAI-compatible server (ours, or vLLM's for comparison):
``specinfer-dist bench-serve``.

For each concurrency level C, a closed loop: C workers send streaming completions back to back
(chat completions for prompts marked ``"chat": true``) until ``num_requests`` have finished.
Prompts come from the shipped prompt set (or ``--prompts``), cycled. Greedy by default, with
``ignore_eos`` (a vLLM extension; ``--no-ignore-eos`` for servers without it) so every request
streams exactly ``max_tokens`` tokens and setups compare on the same work. The results' machine
label is the client's: the server's too only when both run on one machine.

How tokens and latencies are counted:

- A request asks for ``stream_options: {include_usage, continuous_usage_stats}`` (as vLLM), so
  every chunk carries the completion tokens so far: speculative decoding streams several tokens
  in one chunk, and the difference between chunks says how many. A server that reports usage
  only at the end (or not at all) gets its total spread evenly over the content chunks (one
  token per chunk without any usage); ``per_chunk_counts`` in the results says which happened.
- TTFT: from sending the request to the first chunk that carries a token.
- Inter-token latency (ITL): the gap between two successive content chunks, divided evenly over
  the tokens the later chunk carried (a chunk of k tokens after a gap g gives k samples of
  g / k). The first chunk's tokens give no samples: they belong to TTFT. So ITL reads as "time
  per token once streaming", whether tokens arrive one by one or in bursts.
- TPOT: per request (latency - TTFT) / (tokens - 1), averaged over requests.
- Throughput: output tokens (and requests) of successful requests over the level's wall time.
- Prefix cache hit rate: prompt tokens the server reports as cached (``usage.prompt_tokens_details
  .cached_tokens``, as OpenAI and vLLM report them) over prompt tokens, where it reports them.

Mixed lengths (``--long-fraction F --long-prompt-tokens N``): a fraction F of each level's
requests, spread evenly, are completions whose prompt is " the" repeated N times (one token
per word in BPE vocabularies such as SmolLM2's; ``prompt_tokens_long_mean`` reports what the
server counted). TTFT is then also reported for short and long requests apart: a short
request's TTFT p99 while long prompts are prefilled is the head-of-line measurement.

``--compare DIR`` turns the JSON results of several setups (``--label``) into plots and a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
import matplotlib
import numpy as np
from tqdm import tqdm

from specinfer_dist.bench.common import BENCH_PROMPTS
from specinfer_dist.errors import InvalidConfigError, SpecInferError
from specinfer_dist.runtime.device import machine
from specinfer_dist.tuning.prompts import load_prompts

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

DEFAULT_CONCURRENCY = (1, 4, 16, 64)
MAX_ERROR_SAMPLES = 5  # error bodies kept per level


class LoadError(SpecInferError):
    """The server could not be reached or answered nothing usable."""


@dataclass
class LoadConfig:
    url: str = "http://127.0.0.1:8000"  # the server's root; /v1/... is appended
    model: str | None = None  # None: the first model /v1/models lists
    api_key: str | None = None
    concurrency: list[int] = field(default_factory=lambda: list(DEFAULT_CONCURRENCY))
    num_requests: int | None = None  # per level; None: max(2 * C, 8)
    max_tokens: int = 64
    temperature: float = 0.0
    ignore_eos: bool = True
    prompts: str | None = None  # JSONL with "prompt" and optional "chat"; None: the shipped set
    warmup: int = 1  # requests sent before the first level, not counted (first-call costs)
    request_timeout_s: float = 600.0
    label: str = "serve"
    long_fraction: float = 0.0  # this share of requests has a long prompt (mixed-length mode)
    long_prompt_tokens: int = 8000


@dataclass
class _Record:
    """One request as the client saw it; times in seconds from sending it."""

    ttft: float | None = None
    latency: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[float] = field(default_factory=list)
    per_chunk_counts: bool = True  # every content chunk said how many tokens it carried
    error: str | None = None
    long: bool = False  # a long prompt (mixed-length mode)
    prompt_tokens: int | None = None  # as the server's usage counted them
    cached_tokens: int | None = None  # of them, found in the server's prefix cache (None: not reported)


def run_load(config: LoadConfig, progress: bool = False) -> dict[str, Any]:
    """Run every concurrency level against the server; the results as written to JSON."""
    if not config.concurrency or min(config.concurrency) < 1:
        raise InvalidConfigError(f"concurrency levels must be positive, got {config.concurrency}")
    for name in ("max_tokens", "num_requests", "long_prompt_tokens"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise InvalidConfigError(f"{name} must be positive, got {value}")
    if not 0 <= config.long_fraction <= 1:
        raise InvalidConfigError(f"long_fraction must be in [0, 1], got {config.long_fraction}")
    prompts = load_prompts(config.prompts or BENCH_PROMPTS)
    return asyncio.run(_run(config, prompts, progress))


async def _run(config: LoadConfig, prompts: list[dict[str, Any]], progress: bool) -> dict[str, Any]:
    base = config.url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    timeout = aiohttp.ClientTimeout(total=config.request_timeout_s)
    # No pool limit: the workers are the concurrency limit, and none should queue in the client.
    async with aiohttp.ClientSession(headers=headers, timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        model = config.model or await _served_model(session, base)
        for i in range(config.warmup):
            warm = await _request(session, base, _body(config, model, prompts[i % len(prompts)]))
            if warm.error:  # not fatal: the levels record what happens next
                print(f"bench-serve: the warm-up request failed: {warm.error}", file=sys.stderr)
        levels = []
        for concurrency in config.concurrency:
            total = config.num_requests or max(2 * concurrency, 8)
            levels.append(await _level(session, base, config, model, prompts, concurrency, total, progress))
    return {
        "label": config.label, "machine": machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "url": base, "model": model, "config": {k: v for k, v in asdict(config).items() if k not in ("api_key", "url")},
        "levels": levels,
    }


async def _served_model(session: aiohttp.ClientSession, base: str) -> str:
    try:
        async with session.get(f"{base}/v1/models") as response:
            status, text = response.status, await response.text()
    except aiohttp.ClientError as err:
        raise LoadError(f"cannot reach the server: {err}") from None
    if status != 200:
        raise LoadError(f"GET /v1/models: HTTP {status}: {text[:500]}")
    try:
        return json.loads(text)["data"][0]["id"]
    except (ValueError, LookupError, TypeError):
        raise LoadError(f"GET /v1/models lists no model ({text[:200]!r}); pass --model") from None


def _is_long(config: LoadConfig, index: int) -> bool:
    """Whether a level's request ``index`` has a long prompt: long_fraction of them, evenly
    spread, the first one long (so even a short level has one to queue behind)."""
    f = config.long_fraction
    return math.ceil((index + 1) * f) > math.ceil(index * f)


def _long_row(config: LoadConfig) -> dict[str, Any]:
    return {"prompt": " the" * config.long_prompt_tokens}


def _body(config: LoadConfig, model: str, row: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model, "max_tokens": config.max_tokens, "temperature": config.temperature, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    if config.ignore_eos:
        body["ignore_eos"] = True
    if row.get("chat"):
        body["messages"] = [{"role": "user", "content": row["prompt"]}]
    else:
        body["prompt"] = row["prompt"]
    return body


async def _level(
    session: aiohttp.ClientSession, base: str, config: LoadConfig, model: str, prompts: list[dict[str, Any]],
    concurrency: int, total: int, progress: bool,
) -> dict[str, Any]:
    records: list[_Record] = []
    issued = 0
    bar = tqdm(total=total, desc=f"concurrency {concurrency}", unit="req", disable=not progress, file=sys.stderr)

    async def worker() -> None:
        nonlocal issued
        while issued < total:  # single-threaded event loop: the check and the increment cannot interleave
            long = _is_long(config, issued)
            row = _long_row(config) if long else prompts[issued % len(prompts)]
            issued += 1
            record = await _request(session, base, _body(config, model, row))
            record.long = long
            records.append(record)
            bar.update()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    bar.close()
    return _summarize(records, concurrency, wall)


async def _request(session: aiohttp.ClientSession, base: str, body: dict[str, Any]) -> _Record:
    record = _Record()
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    usage_so_far, total_usage = 0, None
    start = time.perf_counter()
    try:
        async with session.post(base + path, json=body) as response:
            if response.status // 100 != 2:
                record.error = f"HTTP {response.status}: {(await response.text())[:500]}"
                return record
            done = False
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                now = time.perf_counter() - start
                chunk = json.loads(data)
                if "error" in chunk:  # the status line was already sent: errors come in-band
                    record.error = f"in-stream error: {json.dumps(chunk['error'])[:500]}"
                    return record
                usage = chunk.get("usage")
                if not chunk.get("choices"):  # the final usage chunk
                    total_usage = usage["completion_tokens"] if usage else total_usage
                    continue
                if usage:
                    record.prompt_tokens = usage.get("prompt_tokens")
                    record.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                    tokens = usage["completion_tokens"] - usage_so_far
                    usage_so_far = usage["completion_tokens"]
                else:
                    choice = chunk["choices"][0]
                    text = choice.get("text") or (choice.get("delta") or {}).get("content")
                    tokens, record.per_chunk_counts = (1 if text else 0), False
                if tokens > 0:
                    record.chunk_times.append(now)
                    record.chunk_tokens.append(tokens)
            record.latency = time.perf_counter() - start
    except (aiohttp.ClientError, TimeoutError, ValueError, LookupError, TypeError, AttributeError) as err:  # a bad chunk too
        record.error = f"{type(err).__name__}: {err}"
        return record
    if not done:
        record.error = "the stream ended without [DONE]"
    elif not record.chunk_times:
        record.error = "the stream carried no tokens"
    elif record.per_chunk_counts and total_usage is not None and total_usage != usage_so_far:
        record.error = f"per-chunk usage adds up to {usage_so_far} tokens, the final usage says {total_usage}"
    else:
        record.ttft = record.chunk_times[0]
        if not record.per_chunk_counts and total_usage:  # no counts per chunk: spread the total evenly
            record.chunk_tokens = [total_usage / len(record.chunk_times)] * len(record.chunk_times)
    return record


def _percentiles(values: list[float], scale: float = 1000.0) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    p50, p99 = np.percentile(values, [50, 99])
    return round(float(p50) * scale, 3), round(float(p99) * scale, 3)


def _summarize(records: list[_Record], concurrency: int, wall: float) -> dict[str, Any]:
    ok = [r for r in records if r.error is None]
    failed = [r for r in records if r.error is not None]
    itl = [
        (t - prev) / k
        for r in ok for prev, t, k in zip(r.chunk_times, r.chunk_times[1:], r.chunk_tokens[1:])
        for _ in range(max(1, round(k)))  # spread (fractional) counts give at least one sample
    ]
    tokens = [sum(r.chunk_tokens) for r in ok]
    tpot = [(r.latency - r.ttft) / (n - 1) for r, n in zip(ok, tokens) if n > 1]
    chunks = sum(len(r.chunk_times) for r in ok)
    ttft, latency, itl_p = _percentiles([r.ttft for r in ok]), _percentiles([r.latency for r in ok]), _percentiles(itl)
    short_ttft = _percentiles([r.ttft for r in ok if not r.long])
    long_ttft = _percentiles([r.ttft for r in ok if r.long])
    long_prompts = [r.prompt_tokens for r in ok if r.long and r.prompt_tokens]
    reported = [r for r in ok if r.cached_tokens is not None and r.prompt_tokens]
    return {
        "concurrency": concurrency, "requests": len(records), "errors": len(failed), "output_tokens": round(sum(tokens)),
        "ttft_ms_p50": ttft[0], "ttft_ms_p99": ttft[1], "itl_ms_p50": itl_p[0], "itl_ms_p99": itl_p[1],
        "tpot_ms_mean": round(1000 * float(np.mean(tpot)), 3) if tpot else None,
        "latency_ms_p50": latency[0], "latency_ms_p99": latency[1],
        "tokens_per_chunk_mean": round(sum(tokens) / chunks, 3) if chunks else None,
        "output_tokens_per_s": round(sum(tokens) / wall, 3), "requests_per_s": round(len(ok) / wall, 3),
        "wall_s": round(wall, 3),
        # Prompt tokens the server found cached over those it counted (OpenAI usage cached_tokens).
        "prefix_cache_hit_rate": round(sum(r.cached_tokens for r in reported) / sum(r.prompt_tokens for r in reported), 4)
        if reported else None,
        "per_chunk_counts": bool(ok) and all(r.per_chunk_counts for r in ok),
        "error_samples": [r.error for r in failed[:MAX_ERROR_SAMPLES]],
        # Mixed-length mode (all requests are short without it):
        "long_requests": sum(r.long for r in records),
        "ttft_short_ms_p50": short_ttft[0], "ttft_short_ms_p99": short_ttft[1],
        "ttft_long_ms_p50": long_ttft[0], "ttft_long_ms_p99": long_ttft[1],
        "prompt_tokens_long_mean": round(float(np.mean(long_prompts)), 1) if long_prompts else None,
    }


def write_result(result: dict[str, Any], out: str | Path) -> Path:
    path = Path(out) / f"{result['label']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


# ---- comparing setups ------------------------------------------------------------------------

def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(results: list[dict[str, Any]], baseline: str | None = None) -> str:
    """Markdown: one row per setup and concurrency; speedup = output tokens/s over the baseline's."""
    base = {lvl["concurrency"]: lvl["output_tokens_per_s"] for r in results if r["label"] == baseline for lvl in r["levels"]}
    mixed = any(lvl.get("long_requests") for r in results for lvl in r["levels"])
    rows = [
        "| setup | concurrency | requests | errors | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | TPOT (ms) "
        "| tokens/chunk | output tokens/s | requests/s | prefix cache hits |" + (" long | short TTFT p50 / p99 (ms) |" if mixed else "")
        + (f" speedup vs {baseline} |" if baseline else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if mixed else "") + ("---:|" if baseline else ""),
    ]
    for result in results:
        for lvl in result["levels"]:
            row = (
                f"| {result['label']} | {lvl['concurrency']} | {lvl['requests']} | {lvl['errors']} "
                f"| {_ms(lvl['ttft_ms_p50'])} / {_ms(lvl['ttft_ms_p99'])} | {_ms(lvl['itl_ms_p50'])} / {_ms(lvl['itl_ms_p99'])} "
                f"| {_ms(lvl['tpot_ms_mean'])} | {lvl['tokens_per_chunk_mean'] or '-'} | {lvl['output_tokens_per_s']:.1f} "
                f"| {lvl['requests_per_s']:.2f} | {_percent(lvl.get('prefix_cache_hit_rate'))} |"
            )
            if mixed:
                row += (f" {lvl.get('long_requests', 0)} | {_ms(lvl.get('ttft_short_ms_p50'))} / "
                        f"{_ms(lvl.get('ttft_short_ms_p99'))} |")
            if baseline:
                ratio = _speedup(lvl, base)
                row += f" {'-' if ratio is None else f'{ratio:.2f}x'} |"
            rows.append(row)
    return "\n".join(rows)


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def _speedup(level: dict[str, Any], base: dict[int, float]) -> float | None:
    reference = base.get(level["concurrency"])
    return level["output_tokens_per_s"] / reference if reference else None


def compare(directory: str | Path, baseline: str) -> str:
    """Plot every ``*.json`` result in ``directory`` against ``baseline``'s; the markdown table."""
    directory = Path(directory)
    results = []
    for path in sorted(directory.glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except ValueError:
            result = None
        if not isinstance(result, dict) or not {"label", "machine", "levels"} <= set(result):
            raise InvalidConfigError(f"{path} is not a bench-serve result")
        results.append(result)
    labels = [r["label"] for r in results]
    if baseline not in labels:
        raise InvalidConfigError(f"no result labelled {baseline!r} in {directory} (found: {', '.join(labels) or 'none'})")
    if len(set(labels)) < len(labels):
        raise InvalidConfigError(f"several results in {directory} share a label: {', '.join(labels)}")
    results.sort(key=lambda r: (r["label"] != baseline, r["label"]))  # the baseline first
    _plot(results, baseline, directory)
    return format_table(results, baseline)


def _plot(results: list[dict[str, Any]], baseline: str, out: Path) -> None:
    title = f"{results[0].get('model', '')} - {results[0]['machine']}"
    base = {lvl["concurrency"]: lvl["output_tokens_per_s"] for lvl in results[0]["levels"]}
    levels = sorted(base)
    fig, ax = plt.subplots(figsize=(max(5, 2 + 0.5 * len(levels) * len(results)), 3.5))
    width = 0.8 / len(results)
    for i, result in enumerate(results):
        by_level = {lvl["concurrency"]: lvl for lvl in result["levels"]}
        ratios = [_speedup(by_level[c], base) if c in by_level else None for c in levels]
        ax.bar([x + (i - (len(results) - 1) / 2) * width for x in range(len(levels))],
               [float("nan") if r is None else r for r in ratios], width, label=result["label"])
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(levels)), [str(c) for c in levels])
    ax.set_xlabel("concurrent streaming clients")
    ax.set_ylabel(f"output tokens/s vs {baseline}")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "speedup_by_concurrency.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, name in zip(axes, ("ttft_ms_p50", "itl_ms_p50"), ("TTFT p50 (ms)", "inter-token latency p50 (ms)")):
        for result in results:
            points = [(lvl["concurrency"], lvl[key]) for lvl in result["levels"] if lvl[key] is not None]
            ax.plot([c for c, _ in points], [v for _, v in points], marker="o", label=result["label"])
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent streaming clients")
        ax.set_ylabel(name)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "latency_by_concurrency.png", dpi=120)
    plt.close(fig)


# ---- command line --------------------------------------------------------------------------

def add_bench_serve_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "bench-serve", help="load-test a running OpenAI-compatible server with streaming clients",
        description="Closed-loop load test over HTTP (ours, vLLM, ...): TTFT, inter-token latency, throughput "
                    "per concurrency level; or, with --compare, plots and a table of several runs.",
    )
    parser.add_argument("--url", default=LoadConfig.url, help="the server's root URL (default %(default)s)")
    parser.add_argument("--model", help="model id to request (default: the first one /v1/models lists)")
    parser.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY' (default: $SPECINFER_API_KEY)")
    parser.add_argument("--concurrency", default=",".join(map(str, DEFAULT_CONCURRENCY)),
                        help="comma-separated levels of concurrent clients (default %(default)s)")
    parser.add_argument("--num-requests", type=int, help="requests per level (default: max(2 x concurrency, 8))")
    parser.add_argument("--max-tokens", type=int, default=LoadConfig.max_tokens)
    parser.add_argument("--temperature", type=float, default=LoadConfig.temperature, help="0 (default) = greedy")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="ask for exactly --max-tokens tokens per request (a vLLM extension; default on)")
    parser.add_argument("--prompts", help="JSONL file with 'prompt' and optional 'chat' (default: shipped set)")
    parser.add_argument("--warmup", type=int, default=LoadConfig.warmup, help="uncounted requests first (default 1)")
    parser.add_argument("--request-timeout", type=float, default=LoadConfig.request_timeout_s, help="seconds")
    parser.add_argument("--long-fraction", type=float, default=LoadConfig.long_fraction,
                        help="mixed lengths: this share of requests (e.g. 0.1) gets a long prompt; TTFT is then also "
                             "reported for short requests alone (head-of-line blocking)")
    parser.add_argument("--long-prompt-tokens", type=int, default=LoadConfig.long_prompt_tokens,
                        help="about how many tokens a long prompt has (default %(default)s)")
    parser.add_argument("--label", default=LoadConfig.label, help="name of this setup; the result is OUT/LABEL.json")
    parser.add_argument("--out", default="bench-serve-out")
    parser.add_argument("--compare", metavar="DIR",
                        help="no load: plot and tabulate every result in DIR against --baseline")
    parser.add_argument("--baseline", default="incremental", help="with --compare: the label speedups are relative to")
    parser.set_defaults(run=_bench_serve)


def _bench_serve(args: argparse.Namespace) -> int:
    if args.compare:
        print(compare(args.compare, args.baseline))
        return 0
    if not re.fullmatch(r"[\w.-]+", args.label):  # it names a file
        raise InvalidConfigError(f"--label may use letters, digits, '_', '.' and '-', got {args.label!r}")
    try:
        concurrency = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        raise InvalidConfigError(f"--concurrency takes comma-separated integers, got {args.concurrency!r}") from None
    config = LoadConfig(
        url=args.url, model=args.model, api_key=args.api_key or os.environ.get("SPECINFER_API_KEY"),
        concurrency=concurrency, num_requests=args.num_requests, max_tokens=args.max_tokens,
        temperature=args.temperature, ignore_eos=args.ignore_eos, prompts=args.prompts, warmup=args.warmup,
        request_timeout_s=args.request_timeout, label=args.label, long_fraction=args.long_fraction,
        long_prompt_tokens=args.long_prompt_tokens,
    )
    result = run_load(config, progress=True)
    path = write_result(result, args.out)
    print(format_table([result]))
    print(f"results: {path}", file=sys.stderr)
    if all(lvl["errors"] == lvl["requests"] for lvl in result["levels"]):
        raise LoadError(f"every request failed; the first errors are in {path}")
    return 0
