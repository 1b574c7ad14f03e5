"""Head-of-line blocking under chunked prefill, side by side per step budget, in one process:
the time to first token of a 4-token request sent while a long prompt is being prefilled, and
what chunking costs the long prompt itself (its whole prefill time).

    python -m specinfer_dist.bench.chunked_prefill --chunks 128,512,2048 --out docs/bench/cpu/chunked-prefill/results.json

The default LLM, incremental decoding (drafting is not what is measured), greedy. One engine;
its step budget (``max_num_batched_tokens``) is set per row.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from typing import Any

from specinfer_dist.bench.common import report
from specinfer_dist.engine.async_engine import AsyncLLMEngine
from specinfer_dist.engine.engine import LLMEngine
from specinfer_dist.runtime.device import machine
from specinfer_dist.runtime.sampling_params import SamplingParams

SHORT_PROMPT = [1, 2, 3, 4]


def long_prompt(tokens: int) -> list[int]:
    """A fixed pseudo-random prompt (its content does not matter to the cost)."""
    return [(i * 7919) % 40000 + 100 for i in range(tokens)]


def head_of_line(served: AsyncLLMEngine, prompt: list[int], cached_at: list[int]) -> list[tuple[float | None, int]]:
    """For each count in ``cached_at``: once that many of ``prompt``'s tokens are cached, send
    a 4-token request; (its time to first token, how many of the long prompt's tokens were
    cached when it came). (None, len(prompt)) where the long prompt was done before that count.
    The long request is aborted at the end, and this returns once the engine is idle."""
    caches = served.engine.verifier.caches
    short = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    def cached() -> int:
        return max((c.length for c in list(caches.values())), default=0)

    async def once(tokens: int, long_task: asyncio.Task) -> tuple[float | None, int]:
        while cached() < tokens and not long_task.done():
            await asyncio.sleep(0.05)
        if long_task.done():
            return None, len(prompt)
        sent = time.perf_counter()
        stream = served.generate(SHORT_PROMPT, short)
        await stream.__anext__()
        ttft = time.perf_counter() - sent
        await stream.aclose()
        return ttft, cached()

    async def main() -> list[tuple[float | None, int]]:
        long_stream = served.generate(prompt, SamplingParams(temperature=0, max_tokens=1))
        long_task = asyncio.ensure_future(long_stream.__anext__())
        results = [await once(n, long_task) for n in cached_at]
        long_task.cancel()  # the generator's cleanup aborts the long request
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
            await long_task
        await long_stream.aclose()
        while served.engine.has_unfinished():  # the abort is processed by the engine's thread
            await asyncio.sleep(0.05)
        return results

    return asyncio.run(main())


def prefill_seconds(engine: LLMEngine, prompt: list[int]) -> float:
    start = time.perf_counter()
    engine.generate([prompt], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    return time.perf_counter() - start


def run(chunks: list[int | None], prompt_tokens: int, cached_at: list[int], prefill_tokens: int) -> list[dict[str, Any]]:
    # The same prompts are prefilled again and again: the cache would skip what is measured.
    engine = LLMEngine.load("default", ssms=["none"], mode="incremental", enable_prefix_caching=False)
    prefill_seconds(engine, long_prompt(64))  # warm-up
    rows = []
    for chunk in chunks:
        engine.max_num_batched_tokens = chunk
        row: dict[str, Any] = {"chunk": chunk, f"prefill_{prefill_tokens}_s": round(
            prefill_seconds(engine, long_prompt(prefill_tokens)), 2)}
        if chunk is not None:  # without chunks a short request waits for the whole prefill
            served = AsyncLLMEngine(engine)
            try:
                for n, (ttft, seen) in zip(cached_at, head_of_line(served, long_prompt(prompt_tokens), cached_at)):
                    row[f"ttft_s_at_{n}_cached"] = None if ttft is None else round(ttft, 2)
                    row[f"long_prompt_cached_at_first_token_{n}"] = seen  # = prompt_tokens: it was done before
            finally:
                served.shutdown()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", default="128,512,2048", help="step budgets; 'none': whole prompts")
    parser.add_argument("--prompt-tokens", type=int, default=8000, help="the long prompt in flight")
    parser.add_argument("--cached-at", default="1000,6000", help="send the short request once this many are cached")
    parser.add_argument("--prefill-tokens", type=int, default=2000, help="the prompt whose whole prefill is timed")
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args(argv)
    chunks = [None if c == "none" else int(c) for c in args.chunks.split(",")]
    rows = run(chunks, args.prompt_tokens, [int(n) for n in args.cached_at.split(",")], args.prefill_tokens)
    report({"machine": machine(), "prompt_tokens": args.prompt_tokens, "results": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
