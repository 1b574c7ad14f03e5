"""Throughput of the Ray runtime, side by side in one run: the in-process engine, then Ray with
TP=1/2 and pipelining off/on, each at several concurrencies (generated tokens per second).

    python -m specinfer_dist.bench.ray_runtime --concurrency 1,4,16 --max-tokens 32

The default SSM is the 2-layer truncation of the default LLM (drafting costs something, so
pipelining has work to hide). Every configuration runs the same greedy requests through the
same client surface (AsyncLLMEngine or CoordinatorClient), one configuration at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import torch

from specinfer_dist.bench.common import load_prompts, machine
from specinfer_dist.config import ClusterConfig, EngineConfig
from specinfer_dist.distributed import CoordinatorClient
from specinfer_dist.engine.async_engine import AsyncLLMEngine
from specinfer_dist.engine.engine import LLMEngine
from specinfer_dist.engine.sampling_params import SamplingParams
from specinfer_dist.models.default import default_ssm_dir


async def _throughput(engine: Any, prompts: list[dict[str, Any]], concurrency: int, max_tokens: int) -> dict[str, float]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    templated = bool(engine.tokenizer.chat_template)  # tiny test models have none

    async def one(row: dict[str, Any]) -> tuple[int, int]:
        deltas = [d async for d in engine.generate(row["prompt"], params, chat=templated and bool(row.get("chat")))]
        return sum(len(d.token_ids) for d in deltas), deltas[-1].stats.steps

    start = time.perf_counter()
    done = await asyncio.gather(*(one(prompts[i % len(prompts)]) for i in range(concurrency)))
    elapsed = time.perf_counter() - start
    tokens = sum(n for n, _ in done)
    return {"tokens_per_s": round(tokens / elapsed, 2), "tokens_per_step": round(tokens / sum(s for _, s in done), 2)}


def run(engine_config: EngineConfig, tps: list[int], concurrency: list[int], max_tokens: int) -> list[dict[str, Any]]:
    prompts = load_prompts(None)
    setups: list[tuple[str, Any]] = [("local", None)]
    setups += [(f"ray tp={tp} pipeline={'on' if p else 'off'}", ClusterConfig(tp=tp, pipeline=p)) for tp in tps for p in (False, True)]
    rows = []
    for name, cluster in setups:
        if cluster is None:
            torch.set_num_threads(1)  # as one shard (cpus_per_shard: 1); a busy CPU stalls thread pools
            engine = AsyncLLMEngine(LLMEngine.from_config(engine_config))
        else:
            engine = CoordinatorClient.from_config(engine_config, cluster)
        try:
            asyncio.run(_throughput(engine, prompts, 1, 4))  # warm-up
            for c in concurrency:
                rows.append({"setup": name, "concurrency": c, **asyncio.run(_throughput(engine, prompts, c, max_tokens))})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            engine.shutdown()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm", default="default")
    parser.add_argument("--ssm", help="SSM source (default: the default LLM's first 2 layers)")
    parser.add_argument("--tree", default="1,1,3,1,1,1,1,1")
    parser.add_argument("--tp", default="1,2", help="comma-separated TP degrees")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    ssm = args.ssm or str(default_ssm_dir(progress=False))
    config = EngineConfig(llm=args.llm, ssms=[ssm], tree=args.tree)
    rows = run(config, [int(t) for t in args.tp.split(",")], [int(c) for c in args.concurrency.split(",")], args.max_tokens)
    print(json.dumps({"machine": machine(), "engine": vars(config), "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
