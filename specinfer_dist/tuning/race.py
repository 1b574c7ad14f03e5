"""``tree: auto`` across setups the cost model cannot rank: EAGLE-2 dynamic trees and feature
drafters. Their acceptance depends on the drafters' own confidence and falls with depth,
which the coverage model of tree_cost.py does not capture, so these setups are raced: each
decodes the calibration prompts end to end (greedy, one request at a time), and the most
tokens per second wins. Candidates: incremental decoding, the cost model's static tree
(``auto``, tune.py) and a dynamic tree, each with and without the feature drafter when one is
configured. Only candidates whose outputs equal incremental decoding's can win (greedy
speculation is exact; a numerical near-tie may still flip a token, and such a run is
recorded, not chosen). The result is cached per (setup, machine, drafter files), like tune.py's.

The caller builds the engines (``make_engine``), so this module needs no engine import.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from importlib import resources
from typing import Any, Callable, Protocol

from specinfer_dist.config import EngineConfig
from specinfer_dist.models.cache import cache_root
from specinfer_dist.models.default import ssm_sources
from specinfer_dist.runtime.device import machine
from specinfer_dist.runtime.sampling_params import SamplingParams
from specinfer_dist.tuning.prompts import load_prompts

RACE_TOKENS = 32  # generated per calibration prompt and candidate
# The options a race's outcome depends on (batching and memory options do not change it).
RACE_KEY_FIELDS = ("llm", "ssms", "drafters", "tree_budget", "mode", "draft_temperature", "draft_vocab", "dtype",
                   "device", "feature_drafter", "enforce_eager")


class Engine(Protocol):
    tokenizer: Any
    max_positions: int

    def encode(self, prompt: str, chat: bool = False) -> list[int]: ...

    def generate(self, prompts: Any, params: Any = None) -> list[Any]: ...


def race_candidates(config: EngineConfig) -> dict[str, EngineConfig]:
    """The setups ``tree: auto`` races for ``config`` (its tree is ``auto``); without the feature
    drafter only where other drafters are left."""
    setups = {"incremental": config.replace(mode="incremental", feature_drafter=None),
              "tuned": config, "dynamic": config.replace(tree="dynamic")}
    if config.feature_drafter is not None and (ssm_sources(config.llm, config.ssms) or config.drafters):
        setups["tuned-no-feature"] = config.replace(feature_drafter=None)
        setups["dynamic-no-feature"] = config.replace(tree="dynamic", feature_drafter=None)
    return setups


def race(candidates: dict[str, EngineConfig], make_engine: Callable[[EngineConfig], Engine],
         max_tokens: int = RACE_TOKENS) -> dict[str, Any]:
    """Decode the calibration prompts with every candidate; {"best": name, "setups": {name: stats}}."""
    rows = load_prompts(str(resources.files(__package__).joinpath("calibration.jsonl")))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    setups: dict[str, dict[str, Any]] = {}
    reference: list[list[int]] | None = None
    prompts: list[list[int]] = []
    for name, config in candidates.items():
        engine = make_engine(config)
        if not prompts:  # base models get the plain text; every prompt fits the context
            chat = bool(getattr(engine.tokenizer, "chat_template", None))
            keep = max(1, engine.max_positions - max_tokens)
            prompts = [engine.encode(r["prompt"], chat and bool(r.get("chat")))[-keep:] for r in rows]
        engine.generate(prompts[0], SamplingParams(max_tokens=2, temperature=0.0))  # warm up
        start, tokens, steps, outputs = time.perf_counter(), 0, 0, []
        for prompt in prompts:  # one at a time: the setup's latency, not the batch's throughput
            [out] = engine.generate(prompt, params)
            outputs.append(list(out.token_ids))
            tokens, steps = tokens + len(out.token_ids), steps + out.stats.steps
        seconds = time.perf_counter() - start
        reference = reference if reference is not None else outputs  # the first candidate: incremental
        setups[name] = {"tokens_per_s": tokens / seconds, "tokens_per_step": tokens / steps, "seconds": seconds,
                        "outputs_equal_incremental": outputs == reference}
        del engine
    exact = [n for n, s in setups.items() if s["outputs_equal_incremental"]]
    return {"best": max(exact, key=lambda n: setups[n]["tokens_per_s"]), "setups": setups}


def raced_setup(config: EngineConfig, make_engine: Callable[[EngineConfig], Engine], drafters: bytes,
                progress: bool = False) -> EngineConfig:
    """The fastest of ``race_candidates(config)`` on this machine (raced once, cached).
    ``drafters``: a digest of the drafters' files (a retrained drafter is raced again)."""
    candidates = race_candidates(config)
    setup = {name: getattr(config, name) for name in RACE_KEY_FIELDS}
    key_parts = [setup, machine(), drafters.hex()]
    key = hashlib.sha256(json.dumps(["race-v1", key_parts], default=str).encode()).hexdigest()[:16]
    path = cache_root() / "tree-race" / f"{key}.json"
    if path.is_file():
        result = json.loads(path.read_text())
    else:
        if progress:
            print(f"tree auto: racing {', '.join(candidates)} once on this machine (cached in {path})", file=sys.stderr)
        result = race(candidates, make_engine)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        if progress:
            print("tree auto: " + ", ".join(f"{n} {s['tokens_per_s']:.1f} tokens/s" for n, s in result["setups"].items())
                  + f"; chose {result['best']}", file=sys.stderr)
    return candidates[result["best"]]
