"""Throughput of the Ray runtime, side by side in one run: TP=1/2 x pipelining off/on x drafters
in draft workers or co-located in the coordinator, and the in-process engine, at several
concurrencies (generated tokens per second).

    python -m specinfer_dist.bench.ray_runtime --tp 1,3 --concurrency 1,4,16 --max-tokens 16 --repeats 2 \
        --out docs/bench/cpu/ray/results.json

The default SSMs are the ones shipped for the default LLM, with a fixed SpecInfer tree (drafting
costs something, so pipelining has work to hide). Every setup runs the same greedy requests through the same
client surface (AsyncLLMEngine or CoordinatorClient). All setups stay up and are measured in
turn, repeatedly, so a busy moment on a shared machine hits each of them; medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import ray
import torch

from specinfer_dist.bench.common import BENCH_PROMPTS, report
from specinfer_dist.config import ClusterConfig, EngineConfig
from specinfer_dist.distributed import CoordinatorClient
from specinfer_dist.engine.async_engine import AsyncLLMEngine
from specinfer_dist.engine.engine import LLMEngine
from specinfer_dist.runtime.device import machine
from specinfer_dist.runtime.sampling_params import SamplingParams
from specinfer_dist.tuning.prompts import load_prompts


async def _throughput(engine: Any, prompts: list[dict[str, Any]], concurrency: int, max_tokens: int) -> tuple[float, float]:
    """(generated tokens per second, tokens per verification step) for ``concurrency`` requests at once."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    templated = bool(engine.tokenizer.chat_template)  # tiny test models have none

    async def one(row: dict[str, Any]) -> tuple[int, int]:
        deltas = [d async for d in engine.generate(row["prompt"], params, chat=templated and bool(row.get("chat")))]
        return sum(len(d.token_ids) for d in deltas), deltas[-1].stats.steps

    start = time.perf_counter()
    done = await asyncio.gather(*(one(prompts[i % len(prompts)]) for i in range(concurrency)))
    tokens = sum(n for n, _ in done)
    return tokens / (time.perf_counter() - start), tokens / sum(s for _, s in done)


def run(config: EngineConfig, tps: list[int], concurrency: list[int], max_tokens: int, repeats: int) -> list[dict[str, Any]]:
    prompts = load_prompts(BENCH_PROMPTS)
    config = config.replace(enable_prefix_caching=False)  # repeated prompts: decoding speed is measured
    torch.set_num_threads(1)  # the local engine gets what one shard gets (cpus_per_shard: 1)
    engines: dict[str, Any] = {"local": AsyncLLMEngine(LLMEngine.from_config(config))}
    # Logical CPUs: every setup's actors stay placed at once.
    ray.init(address="local", num_cpus=8 * len(tps) * (max(tps) + 2), include_dashboard=False)
    for tp in tps:
        for pipeline in (False, True):
            for colocate in (False, True):
                name = f"ray tp={tp} pipeline={'on' if pipeline else 'off'} drafters={'colocated' if colocate else 'worker'}"
                cluster = ClusterConfig(tp=tp, pipeline=pipeline, colocate_drafters=colocate)
                engines[name] = CoordinatorClient.from_config(config, cluster)
    rows = []
    try:
        for engine in engines.values():
            asyncio.run(_throughput(engine, prompts, 1, 4))  # warm-up
        for c in concurrency:
            runs: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
            for _ in range(repeats):
                for name, engine in engines.items():
                    runs[name].append(asyncio.run(_throughput(engine, prompts, c, max_tokens)))
            for name, results in runs.items():
                rows.append({
                    "setup": name, "concurrency": c,
                    "tokens_per_s": round(statistics.median(r[0] for r in results), 2),
                    "all_tokens_per_s": [round(r[0], 2) for r in results],
                    "tokens_per_step": round(statistics.median(r[1] for r in results), 2),
                })
                print(json.dumps(rows[-1]), flush=True)
    finally:
        for engine in engines.values():
            engine.shutdown()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm", default="default")
    parser.add_argument("--ssm", default="default", help="SSM source (default: the SSMs shipped for the default LLM)")
    parser.add_argument("--tree", default="1,1,3,1,1,1,1,1")
    parser.add_argument("--tp", default="1,2", help="comma-separated TP degrees")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", help="write the JSON here (stdout also carries Ray's logs)")
    args = parser.parse_args(argv)
    config = EngineConfig(llm=args.llm, ssms=[args.ssm], tree=args.tree)
    tps = [int(t) for t in args.tp.split(",")]
    rows = run(config, tps, [int(c) for c in args.concurrency.split(",")], args.max_tokens, args.repeats)
    report({"machine": machine(), "engine": vars(config), "results": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
