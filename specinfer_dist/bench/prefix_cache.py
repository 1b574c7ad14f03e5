"""Automatic prefix caching, on vs off, side by side in one process on one loaded LLM:

1. multi-turn chat: users sharing a long system prompt talk to one ``AsyncLLMEngine`` at once,
   each turn sent with the whole conversation so far (the previous answer and a new question);
   TTFT of the first turn and of later turns, throughput, hit rate;
2. a shared-prefix batch: requests sharing a long prefix, differing in a short suffix, all sent
   at once to ``LLMEngine.generate``; prompt rows the LLM actually computed (counted in its forwards);
3. memory: the chat again with a KV pool too small to keep every conversation cached (evictions,
   preemptions), which must still give the same answers.

    python -m specinfer_dist.bench.prefix_cache --out docs/bench/cpu/prefix-cache

``--drafting feature`` runs the chat with the shipped EAGLE-3 head drafting dynamic trees: its
own KV cache reuses prefixes too, and the LLM reuses no more of a prompt than the head holds
(it needs the LLM's hidden states for every row after that), which is what that run measures.

The default LLM, incremental decoding (drafting is not what is measured), greedy, the engine's
defaults otherwise (on a CPU: chunked prefill, 128 rows per step). Every scenario gets two fresh
engines built on the same loaded weights: ``enable_prefix_caching`` on and off; outputs must be
the same token ids (``outputs_equal``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from specinfer_dist.config import EngineConfig
from specinfer_dist.engine.async_engine import AsyncLLMEngine
from specinfer_dist.engine.builder import Target, load_target, scheduling_options
from specinfer_dist.engine.engine import LLMEngine
from specinfer_dist.runtime.block_pool import chain_digests
from specinfer_dist.runtime.device import machine
from specinfer_dist.runtime.sampling_params import SamplingParams

# The system prompt: written for this benchmark (no third-party text), repeated in numbered
# sections until it is as long as asked. Its content only has to look like a real one.
SYSTEM_SENTENCES = (
    "You are the support assistant of Northwind Gardens, a small nursery that sells seeds, young plants and tools.",
    "Answer in plain English, in short paragraphs, and be friendly without being chatty.",
    "If a customer asks about an order, ask for the order number before you say anything about its status.",
    "Never promise a delivery date; say that the warehouse confirms dates by email within two working days.",
    "Seeds can be returned unopened within thirty days; opened packets are refunded only if they did not germinate.",
    "Live plants are guaranteed for ninety days when they were planted according to the care card in the box.",
    "Tools carry a two-year warranty against defects, but not against wear from normal use.",
    "When a customer describes a sick plant, ask about light, watering, soil and recent weather before guessing.",
    "Recommend organic treatments first, and mention that chemical ones must be used exactly as the label says.",
    "Do not give medical advice, even about plants that are known to be edible or poisonous.",
    "If a question is not about gardening or the shop, say politely that you can only help with those topics.",
    "Prices are in euros and include tax; shipping is free above fifty euros within the country.",
    "Gift cards never expire and can be combined with one discount code per order.",
    "Customers with a loyalty account collect one point per euro and can redeem one hundred points for five euros.",
    "The shop is open from Tuesday to Saturday, nine to six, and closed on public holidays.",
    "Workshops on pruning, composting and seed saving take place on the first Saturday of each month.",
    "When you recommend a plant, mention its hardiness zone, its mature size and whether it likes sun or shade.",
    "If you are not sure of an answer, say so and offer to pass the question to a human gardener.",
    "Keep personal data private: never repeat a customer's address, phone number or payment details.",
    "End every answer by asking whether there is anything else you can help with.",
)

QUESTIONS = (
    "What should I plant in a shady corner of my garden?",
    "How often should I water tomato seedlings?",
    "My basil leaves are turning yellow. What is wrong?",
    "Can I return a packet of seeds that I opened?",
    "Which tools do I need to start a vegetable patch?",
    "When is the best time to prune apple trees?",
    "How do I make compost from kitchen scraps?",
    "Is lavender hard to grow in clay soil?",
    "What is your warranty on pruning shears?",
    "How do I keep slugs away from my lettuce?",
    "Do you ship plants in winter?",
    "Which flowers attract bees and butterflies?",
    "How deep should I sow carrot seeds?",
    "Can I grow strawberries on a balcony?",
    "What does hardiness zone mean?",
    "How do loyalty points work?",
    "My rose has black spots on its leaves. What can I do?",
    "Should I mulch my flower beds in autumn?",
    "Which herbs grow well together in one pot?",
    "When is the next composting workshop?",
    "How much sun does a lemon tree need?",
    "Can I use a gift card together with a discount code?",
    "Why are my cucumbers bitter?",
    "How do I save seeds from my own beans?",
)


def system_prompt(tokenizer: Any, tokens: int) -> tuple[str, int]:
    """A system prompt of at least ``tokens`` tokens (as the tokenizer counts them, alone) and
    its exact count: the sentences above, cycled in numbered sections."""
    parts: list[str] = []
    count, i = 0, 0
    while count < tokens:
        section, sentence = divmod(i, len(SYSTEM_SENTENCES))
        if sentence == 0:
            parts.append(f"\n\nSection {section + 1}.")
        parts.append(" " + SYSTEM_SENTENCES[sentence])
        i += 1
        text = "".join(parts).strip()
        count = len(tokenizer(text, add_special_tokens=False).input_ids)
    return text, count


def question(user: int, turn: int, turns: int) -> str:
    return QUESTIONS[(user * turns + turn) % len(QUESTIONS)]


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The prompt's token ids: the chat template rendered as text, then encoded (what a server does)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


class Busy:
    """How busy the machine was while the block ran: the 1-minute load average (sampled every
    2 s: its peak) and the CPU seconds this process got (threads together) per wall second."""

    def __enter__(self) -> "Busy":
        self.peak_load = os.getloadavg()[0]
        self._cpu, self._wall = time.process_time(), time.perf_counter()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(2.0):
            self.peak_load = max(self.peak_load, os.getloadavg()[0])

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.cpu_per_wall = (time.process_time() - self._cpu) / max(time.perf_counter() - self._wall, 1e-9)

    def as_dict(self) -> dict[str, float]:
        return {"load_avg_1min_peak": round(self.peak_load, 2), "cpu_s_per_wall_s": round(self.cpu_per_wall, 2)}


# ---- engines ------------------------------------------------------------------------------


def engine_pair(config: EngineConfig, target: Target, **options: Any) -> dict[str, LLMEngine]:
    """Two warmed-up engines on ``target``'s weights: prefix caching on and off (each with its
    own KV pool, empty; counters start at 0)."""
    engines = {}
    for name, caching in (("off", False), ("on", True)):
        engine = LLMEngine.from_config(config.replace(enable_prefix_caching=caching, **options), target=target)
        engine.generate([list(range(100, 132))], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        engine.reset_prefix_cache()
        engine.prefix_cache_queries = engine.prefix_cache_hits = 0
        engines[name] = engine
    return engines


def pool_state(engine: LLMEngine) -> dict[str, int]:
    pool = engine.verifier.pool
    return {"kv_blocks": pool.capacity.num_blocks, "num_used": pool.num_used, "num_free": pool.num_free,
            "num_cached": pool.num_cached, "caches_left": len(engine.verifier.caches)}


def cache_counters(engine: LLMEngine) -> dict[str, Any]:
    queries, hits = engine.prefix_cache_queries, engine.prefix_cache_hits
    return {"prefix_cache_queries": queries, "prefix_cache_hits": hits,
            "hit_rate": round(hits / queries, 4) if queries else 0.0}


# ---- 1 and 3: multi-turn chat ---------------------------------------------------------------


def multi_turn(engine: LLMEngine, system: str, users: int, turns: int, max_tokens: int) -> dict[str, Any]:
    """``users`` conversations at once against one AsyncLLMEngine over ``engine``; each turn waits
    for the previous answer. Per request: TTFT (sent to first token), prompt/cached/generated
    tokens and the answer's token ids."""
    tokenizer = engine.tokenizer
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    served = AsyncLLMEngine(engine)
    records: list[dict[str, Any]] = []

    async def user(u: int) -> None:
        messages = [{"role": "system", "content": system}]
        for t in range(turns):
            messages.append({"role": "user", "content": question(u, t, turns)})
            ids = chat_ids(tokenizer, messages)
            sent = time.perf_counter()
            ttft, out, cached = None, [], 0
            async for delta in served.generate(ids, params):
                if ttft is None and delta.token_ids:
                    ttft = time.perf_counter() - sent
                out += delta.token_ids
                cached = delta.cached_tokens
            records.append({"user": u, "turn": t + 1, "prompt_tokens": len(ids), "cached_tokens": cached,
                            "generated_tokens": len(out), "ttft_s": round(ttft, 4),
                            "latency_s": round(time.perf_counter() - sent, 4), "prompt_ids": ids, "output_ids": out})
            messages.append({"role": "assistant", "content": tokenizer.decode(out, skip_special_tokens=True)})

    async def main() -> None:
        await asyncio.gather(*(user(u) for u in range(users)))

    start = time.perf_counter()
    try:
        with Busy() as busy:
            asyncio.run(main())
    finally:
        served.shutdown()
    wall = time.perf_counter() - start
    records.sort(key=lambda r: (r["user"], r["turn"]))
    first = [r["ttft_s"] for r in records if r["turn"] == 1]
    later = [r["ttft_s"] for r in records if r["turn"] > 1]
    prompt = sum(r["prompt_tokens"] for r in records)
    generated = sum(r["generated_tokens"] for r in records)
    return {
        "wall_s": round(wall, 2),
        "ttft_turn1_p50_s": percentile(first, 50), "ttft_turn1_p99_s": percentile(first, 99),
        "ttft_later_turns_p50_s": percentile(later, 50), "ttft_later_turns_p99_s": percentile(later, 99),
        "prompt_tokens": prompt, "generated_tokens": generated,
        "total_tokens_per_s": round((prompt + generated) / wall, 1),  # prompt + generated
        "generated_tokens_per_s": round(generated / wall, 2),
        "cached_tokens": sum(r["cached_tokens"] for r in records),
        **cache_counters(engine),
        "num_preemptions": engine.scheduler.num_preemptions,
        "pool_at_end": pool_state(engine),
        **busy.as_dict(),
        "requests": records,
    }


def distinct_blocks(records: list[dict[str, Any]], block_size: int) -> int:
    """Full KV blocks it would take to keep every request's committed rows cached (its prompt and
    every answer token but the last, which never went through the LLM), shared prefixes once."""
    digests: set[bytes] = set()
    for r in records:
        digests.update(chain_digests(r["prompt_ids"] + r["output_ids"][:-1], block_size))
    return len(digests)


def compare_chat(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    on, off = results["on"], results["off"]
    same = [a["output_ids"] == b["output_ids"] for a, b in zip(on["requests"], off["requests"])]
    ratio = lambda a, b: round(a / b, 3) if a is not None and b else None  # noqa: E731
    return {
        "outputs_equal": len(on["requests"]) == len(off["requests"]) and all(same),
        "requests_equal": f"{sum(same)}/{len(same)}",
        "ttft_later_turns_p50_on_over_off": ratio(on["ttft_later_turns_p50_s"], off["ttft_later_turns_p50_s"]),
        "ttft_later_turns_p99_on_over_off": ratio(on["ttft_later_turns_p99_s"], off["ttft_later_turns_p99_s"]),
        "ttft_turn1_p50_on_over_off": ratio(on["ttft_turn1_p50_s"], off["ttft_turn1_p50_s"]),
        "total_tokens_per_s_on_over_off": ratio(on["total_tokens_per_s"], off["total_tokens_per_s"]),
        "generated_tokens_per_s_on_over_off": ratio(on["generated_tokens_per_s"], off["generated_tokens_per_s"]),
    }


def strip_ids(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` for the JSON: requests without their prompt ids (they are long), answers kept."""
    return {**result, "requests": [{k: v for k, v in r.items() if k != "prompt_ids"} for r in result["requests"]]}


def chat_scenario(config: EngineConfig, target: Target, system: str, users: int, turns: int, max_tokens: int,
                  **options: Any) -> dict[str, Any]:
    engines = engine_pair(config, target, **options)
    results = {name: multi_turn(engine, system, users, turns, max_tokens) for name, engine in engines.items()}
    block_size = engines["on"].verifier.pool.block_size
    needed = distinct_blocks(results["on"]["requests"], block_size)
    out: dict[str, Any] = {"users": users, "turns": turns, "max_tokens": max_tokens, **compare_chat(results),
                           "blocks_to_cache_every_history": needed}
    on_end = results["on"]["pool_at_end"]
    # Each distinct block was published at least once; those no longer cached were evicted.
    out["evicted_blocks_at_least"] = max(0, needed - on_end["num_cached"])
    out.update({name: strip_ids(r) for name, r in results.items()})
    return out


# ---- 2: shared-prefix batch -------------------------------------------------------------------


class PromptRows:
    """Counts the prompt rows each LLM forward computes: every chain row (a prompt chunk, or the
    uncached part of a prompt before its first tree) plus each request's first root (its last
    prompt token). In incremental decoding every later row is a generated token's root."""

    def __init__(self, engine: LLMEngine) -> None:
        self.rows = self.prompt_rows = 0
        self.roots_seen: set[int] = set()
        self.engine, self.real = engine, engine.verifier.logits

        def logits(items):
            for item in items:
                self.rows += len(item.tokens)
                self.prompt_rows += len(item.tokens) - len(item.logit_rows)
                if item.logit_rows and item.request_id not in self.roots_seen:
                    self.roots_seen.add(item.request_id)
                    self.prompt_rows += 1
            return self.real(items)

        engine.verifier.logits = logits

    def remove(self) -> None:
        self.engine.verifier.logits = self.real


def shared_prefix(config: EngineConfig, target: Target, prefix: list[int], suffixes: list[list[int]],
                  max_tokens: int) -> dict[str, Any]:
    prompts = [prefix + s for s in suffixes]
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    results, outputs = {}, {}
    for name, engine in engine_pair(config, target).items():
        log = PromptRows(engine)
        start = time.perf_counter()
        with Busy() as busy:
            done = engine.generate(prompts, params)
        wall = time.perf_counter() - start
        log.remove()
        outputs[name] = [o.token_ids for o in done]
        prompt = sum(len(p) for p in prompts)
        cached = sum(o.cached_tokens for o in done)
        results[name] = {
            "wall_s": round(wall, 2), "prompt_tokens": prompt, "cached_tokens": cached,
            "prompt_rows_computed": log.prompt_rows, "prompt_tokens_minus_cached": prompt - cached,
            "llm_rows_computed": log.rows, "generated_tokens": sum(len(o) for o in outputs[name]),
            **cache_counters(engine), "num_preemptions": engine.scheduler.num_preemptions,
            "pool_at_end": pool_state(engine), **busy.as_dict(), "outputs": outputs[name],
        }
    on, off = results["on"], results["off"]
    return {
        "requests": len(prompts), "prefix_tokens": len(prefix), "suffix_tokens": len(suffixes[0]),
        "max_tokens": max_tokens, "outputs_equal": outputs["on"] == outputs["off"],
        "prompt_rows_on_over_off": round(on["prompt_rows_computed"] / off["prompt_rows_computed"], 4),
        "wall_on_over_off": round(on["wall_s"] / off["wall_s"], 3),
        **results,
    }


def make_suffixes(tokenizer: Any, count: int, tokens: int) -> list[list[int]]:
    """``count`` distinct suffixes of exactly ``tokens`` tokens: a question, padded with others."""
    out = []
    for i in range(count):
        ids: list[int] = []
        j = i
        while len(ids) < tokens:
            ids += tokenizer(" " + QUESTIONS[j % len(QUESTIONS)], add_special_tokens=False).input_ids
            j += 7
        out.append(ids[:tokens])
    assert len({tuple(s) for s in out}) == count, "suffixes must differ"
    return out


# ---- all of it ----------------------------------------------------------------------------------


def memory_kv_blocks(tokenizer: Any, system_tokens: int, turns: int, max_tokens: int, block_size: int) -> int:
    """A pool with room for the longest conversation's last turn (with a few blocks to spare):
    enough for the running batch, too small for every user's history beside it."""
    template = 16  # role markers and newlines per message, generously
    longest_q = max(len(tokenizer(q, add_special_tokens=False).input_ids) for q in QUESTIONS)
    longest = system_tokens + template + turns * (longest_q + template) + (turns - 1) * (max_tokens + template)
    return math.ceil((longest + max_tokens) / block_size) + 4


def run(llm: str = "default", users: int = 8, turns: int = 6, max_tokens: int = 16, system_tokens: int = 1500,
        batch: int = 16, prefix_tokens: int = 1000, suffix_tokens: int = 20, memory_users: int = 4,
        memory_turns: int = 3, memory_blocks: int | None = None, scenarios: str = "chat,prefix,memory",
        drafting: str = "incremental", **options: Any) -> dict[str, Any]:
    if drafting == "feature":
        options = {"mode": "tree", "tree": "dynamic", "feature_drafter": "default", **options}
    config = EngineConfig(llm=llm, ssms=["none"], **{"mode": "incremental", **options})
    target = load_target(config)
    tokenizer = target.tokenizer
    system, system_count = system_prompt(tokenizer, system_tokens)
    budget = scheduling_options(config)["max_num_batched_tokens"]
    result: dict[str, Any] = {
        "machine": machine(), "llm": llm, "dtype": str(target.model.model.norm.weight.dtype).removeprefix("torch."),
        "mode": config.mode, "drafting": drafting, "greedy": True, "max_num_batched_tokens": budget,
        "kv_block_size": config.kv_block_size, "system_prompt_tokens": system_count,
    }
    todo = scenarios.split(",")
    start = time.perf_counter()
    if "chat" in todo:
        result["multi_turn"] = chat_scenario(config, target, system, users, turns, max_tokens)
        print(table(result, "multi_turn"), flush=True)
    if "prefix" in todo:
        body = tokenizer(system, add_special_tokens=False).input_ids
        assert len(body) >= prefix_tokens, "the system prompt is the shared prefix: make it at least as long"
        result["shared_prefix"] = shared_prefix(config, target, body[:prefix_tokens],
                                                make_suffixes(tokenizer, batch, suffix_tokens), max_tokens)
        print(table(result, "shared_prefix"), flush=True)
    if "memory" in todo:
        blocks = memory_blocks or memory_kv_blocks(tokenizer, system_count, memory_turns, max_tokens,
                                               config.kv_block_size)
        result["memory"] = chat_scenario(config, target, system, memory_users, memory_turns, max_tokens,
                                         kv_blocks=blocks)
        result["memory"]["kv_blocks"] = blocks
        result["memory"]["pool_smaller_than_histories"] = blocks < result["memory"]["blocks_to_cache_every_history"]
        print(table(result, "memory"), flush=True)
    result["bench_wall_s"] = round(time.perf_counter() - start, 1)
    result["targets"] = targets(result)
    return result


def targets(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "multi_turn" in result:
        m = result["multi_turn"]
        out["ttft_later_turns_p50_ratio_le_0.25"] = _met(m["ttft_later_turns_p50_on_over_off"], lambda r: r <= 0.25)
        out["throughput_ratio_ge_1.5"] = _met(m["total_tokens_per_s_on_over_off"], lambda r: r >= 1.5)
    if "shared_prefix" in result:
        out["prompt_rows_ratio_le_0.125"] = _met(result["shared_prefix"]["prompt_rows_on_over_off"],
                                                 lambda r: r <= 1 / 8)
    names = [n for n in ("multi_turn", "shared_prefix", "memory") if n in result]
    out["outputs_equal"] = all(result[n]["outputs_equal"] for n in names)
    return out


def _met(value: float | None, ok) -> dict[str, Any]:
    return {"value": value, "met": value is not None and bool(ok(value))}


def table(result: dict[str, Any], name: str) -> str:
    r = result[name]
    if name == "shared_prefix":
        rows = [("prompt rows computed by the LLM", "prompt_rows_computed"), ("prompt - cached tokens",
                "prompt_tokens_minus_cached"), ("wall s", "wall_s"), ("hit rate", "hit_rate")]
        head = (f"\n{name}: {r['requests']} requests, {r['prefix_tokens']}-token prefix + {r['suffix_tokens']}-token "
                f"suffix; rows on/off {r['prompt_rows_on_over_off']}; outputs equal {r['outputs_equal']}")
    else:
        rows = [("TTFT turn 1 p50 / p99 s", ("ttft_turn1_p50_s", "ttft_turn1_p99_s")),
                ("TTFT turns 2+ p50 / p99 s", ("ttft_later_turns_p50_s", "ttft_later_turns_p99_s")),
                ("tokens/s prompt+generated", "total_tokens_per_s"), ("tokens/s generated", "generated_tokens_per_s"),
                ("hit rate", "hit_rate"), ("wall s", "wall_s"), ("preemptions", "num_preemptions")]
        head = (f"\n{name}: {r['users']} users x {r['turns']} turns, max_tokens {r['max_tokens']}; TTFT turns 2+ p50 "
                f"on/off {r['ttft_later_turns_p50_on_over_off']}, tokens/s on/off {r['total_tokens_per_s_on_over_off']}"
                f"; outputs equal {r['outputs_equal']}")
    if "kv_blocks" in r:
        head += (f"; pool {r['kv_blocks']} blocks, every history needs {r['blocks_to_cache_every_history']}, "
                 f"evicted at least {r['evicted_blocks_at_least']}")
    lines = [head, "| | caching off | caching on |", "|---|---|---|"]
    for label, key in rows:
        keys = key if isinstance(key, tuple) else (key,)
        lines.append(f"| {label} | " + " | ".join(" / ".join(str(r[s][k]) for k in keys) for s in ("off", "on")) + " |")
    return "\n".join(lines)


def write(result: dict[str, Any], path: Path) -> None:
    """The JSON, indented, with each list of token ids on one line."""
    text = json.dumps(result, indent=1)
    text = re.sub(r"\[\s+([-\d,\s]+?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm", default="default")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=16, help="per answer (greedy; EOS ends it earlier)")
    parser.add_argument("--system-tokens", type=int, default=1500, help="shared system prompt, at least this long")
    parser.add_argument("--batch", type=int, default=16, help="shared-prefix requests")
    parser.add_argument("--prefix-tokens", type=int, default=1000)
    parser.add_argument("--suffix-tokens", type=int, default=20)
    parser.add_argument("--memory-users", type=int, default=4)
    parser.add_argument("--memory-turns", type=int, default=3)
    parser.add_argument("--memory-kv-blocks", type=int, help="default: the longest conversation's last turn + 4")
    parser.add_argument("--scenarios", default="chat,prefix,memory")
    parser.add_argument("--drafting", choices=("incremental", "feature"), default="incremental",
                        help="feature: the shipped EAGLE-3 head drafts dynamic trees (see the module docstring)")
    parser.add_argument("--out", help="directory for results.json")
    args = parser.parse_args(argv)
    result = run(args.llm, args.users, args.turns, args.max_tokens, args.system_tokens, args.batch, args.prefix_tokens,
                 args.suffix_tokens, args.memory_users, args.memory_turns, args.memory_kv_blocks, args.scenarios,
                 args.drafting)
    if args.out:
        write(result, Path(args.out) / "results.json")
    for name in ("multi_turn", "shared_prefix", "memory"):
        if name in result:
            print(table(result, name))
    print("targets:", result["targets"])
    return 0 if result["targets"]["outputs_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
