"""``tree: auto`` across setups the cost model cannot rank: EAGLE-2 dynamic trees and feature
drafters. Their acceptance depends on the drafters' own confidence and falls with depth, which
the coverage model of tree_cost.py does not capture, so these setups are raced: each decodes the
calibration prompts end to end (greedy, one request at a time), and the most tokens per second
wins. Candidates: incremental decoding (the reference), the cost model's static tree (``auto``,
tune.py) and a dynamic tree, each with and without the feature drafter when one is configured.

Invariants:
- Like is compared with like: candidates take the prompts in turns (each candidate one prompt,
  then the next prompt), and the race stops only between turns, so every candidate has decoded
  the same prompts, at least one.
- The whole of it (the cost model's measurement inside the tuned candidate's build included)
  keeps to ``tuning_budget_s``: a turn starts only if one more like the last fits (budget.py).
- No setup is raced twice: each candidate is resolved to the setup its engine really runs
  (mode, tree, drafters); a candidate equal to an earlier one is recorded as ``same_as`` it and
  not raced. So a tuned tree the cost model left empty (incremental decoding) is never raced as
  a speculative candidate.
- Only candidates whose outputs equal the reference's can win (greedy speculation is exact; a
  numerical near-tie may still flip a token: such a run is recorded, not chosen, and stops).
- Results are cached (cache.py: device, torch, dtype, model files, the options marked ``race``).

The caller builds the engines (``make_engine``), so this module needs no engine import.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from specinfer_dist.config import EngineConfig
from specinfer_dist.models.default import ssm_sources
from specinfer_dist.progress import say
from specinfer_dist.runtime.device import resolve_device
from specinfer_dist.runtime.sampling_params import SamplingParams
from specinfer_dist.tuning.budget import Deadline, budget_seconds
from specinfer_dist.tuning.cache import race_path, read_result, write_result
from specinfer_dist.tuning.prompts import calibration_prompts

REFERENCE = "incremental"  # the candidate whose outputs every other must equal
RACE_TOKENS = 32  # generated per calibration prompt and candidate
RACE_PROMPT_TOKENS = 256  # calibration prompts are cut to their last this many (they are shorter)
# Stop early when one candidate is at least this much faster than every other on every prompt so
# far. Why 2x: measured on the 2-core CPU (default LLM, 1 torch thread, every prompt decoded, two
# races), one setup on one prompt differed by up to 1.24x between the races (timing noise on a
# shared CPU), and the dynamic tree's tokens/s by up to 1.44x between prompts (how well it
# drafts each). A lead beyond both together (1.8x) on every prompt so far is not undone by the
# prompts left; the real gap there, incremental decoding over the dynamic tree, was 2.3-3.2x on
# every prompt, so that race stops after one turn. Below 2x the race goes on to its budget.
CLEAR_LEAD = 2.0
# The reference decodes each turn's prompt again after the others: if its two times differ more
# than this, the machine's load changed within the turn (another process took a core; with 2
# torch threads that stalls our steps up to 30x, DESIGN.md). Quietly they differed by at most
# 1.24x (above). Such a turn cannot end the race early, and its result is used, not cached.
STEADY = 1.5


class Engine(Protocol):
    tokenizer: Any
    max_positions: int
    mode: str
    spec: Any
    drafters: list[Any]

    def encode(self, prompt: str, chat: bool = False) -> list[int]: ...

    def generate(self, prompts: Any, params: Any = None) -> list[Any]: ...


def race_candidates(config: EngineConfig) -> dict[str, EngineConfig]:
    """The setups ``tree: auto`` races for ``config`` (its tree is ``auto``), the reference
    first; without the feature drafter only where other drafters are left."""
    setups = {REFERENCE: config.replace(mode="incremental", feature_drafter=None),
              "tuned": config, "dynamic": config.replace(tree="dynamic")}
    if config.feature_drafter is not None and (ssm_sources(config.llm, config.ssms) or config.drafters):
        setups["tuned-no-feature"] = config.replace(feature_drafter=None)
        setups["dynamic-no-feature"] = config.replace(tree="dynamic", feature_drafter=None)
    return setups


def race_kv_blocks(config: EngineConfig) -> int:
    """KV blocks for one race request: the longest calibration prompt, its tokens and a full
    tree. A race needs no more, so beside a serving engine it never competes for its memory."""
    return -(-(RACE_PROMPT_TOKENS + RACE_TOKENS + config.tree_budget) // config.kv_block_size)


def effective_setup(engine: Engine) -> tuple[Any, ...]:
    """What ``engine`` really runs: two engines with equal setups decode alike."""
    if engine.mode == "incremental":
        return ("incremental",)
    return (engine.mode, engine.spec, tuple(d.name for d in engine.drafters))


def describe(engine: Engine) -> str:
    if engine.mode == "incremental":
        return "incremental decoding"
    return f"{engine.mode} {engine.spec} drafted by {', '.join(d.name for d in engine.drafters)}"


@dataclass
class _Run:
    """One candidate's race so far: per prompt, its tokens, steps, seconds and output."""

    engine: Engine
    setup: str
    tokens: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)
    exact: bool = True

    def decode(self, prompt: list[int], params: SamplingParams, clock: Callable[[], float]) -> None:
        start = clock()
        [out] = self.engine.generate(prompt, params)
        self.seconds.append(clock() - start)
        self.outputs.append(list(out.token_ids))
        self.tokens.append(len(out.token_ids))
        self.steps.append(out.stats.steps)

    def rates(self) -> list[float]:
        return [t / max(s, 1e-9) for t, s in zip(self.tokens, self.seconds)]

    def stats(self) -> dict[str, Any]:
        return {"setup": self.setup, "tokens_per_s": sum(self.tokens) / max(sum(self.seconds), 1e-9),
                "tokens_per_step": sum(self.tokens) / max(sum(self.steps), 1), "seconds": sum(self.seconds),
                "prompts": len(self.tokens), "outputs_equal_incremental": self.exact,
                "tokens_per_s_by_prompt": self.rates()}


def clear_leader(runs: dict[str, _Run]) -> str | None:
    """The candidate CLEAR_LEAD times faster than every other on every prompt so far, if any."""
    rates = {name: run.rates() for name, run in runs.items()}
    best = max(runs, key=lambda n: runs[n].stats()["tokens_per_s"])
    ahead = all(mine >= CLEAR_LEAD * theirs for other, r in rates.items() if other != best
                for mine, theirs in zip(rates[best], r))
    return best if ahead else None


def race(candidates: dict[str, EngineConfig], make_engine: Callable[[EngineConfig], Engine],
         seconds: float | None = None, *, reference: str = REFERENCE, max_tokens: int = RACE_TOKENS,
         clock: Callable[[], float] = time.perf_counter, progress: bool = False) -> dict[str, Any]:
    """Race ``candidates`` (``reference`` among them) within ``seconds`` (None: every prompt),
    builds included; {"best": name, "chosen": its setup, "setups": {name: stats or same_as}}."""
    deadline, start = Deadline(seconds, clock), clock()
    runs, same = _resolve(candidates, make_engine, reference, progress)
    first = runs[reference].engine
    chat = bool(getattr(first.tokenizer, "chat_template", None))
    prompts = calibration_prompts(first.encode, chat, max(1, min(RACE_PROMPT_TOKENS, first.max_positions - max_tokens)))
    for run in runs.values():
        run.engine.generate(prompts[0], SamplingParams(max_tokens=2, temperature=0.0))  # warm up
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    stopped, steady = _take_turns(runs, prompts, reference, params, deadline, clock)
    for name, twin in same.items():  # a duplicate decodes as its twin
        same[name] = {"setup": runs[twin].setup, "same_as": twin, "outputs_equal_incremental": runs[twin].exact}
    setups = {name: same[name] if name in same else runs[name].stats() for name in candidates}
    best = max((n for n in runs if runs[n].exact), key=lambda n: setups[n]["tokens_per_s"])  # ties: the reference
    for name, stats in setups.items():
        if "same_as" not in stats:
            equal = ("outputs equal incremental's" if stats["outputs_equal_incremental"]
                     else "outputs differ from incremental's (cannot win)")
            say(f"tree auto: {name} ({stats['setup']}): {stats['tokens_per_s']:.1f} tokens/s, "
                f"{stats['tokens_per_step']:.2f} tokens/step over {stats['prompts']} prompt(s); {equal}", "tuning",
                progress)
    elapsed = clock() - start
    say(f"tree auto: chose {best} ({setups[best]['setup']}) after {elapsed:.1f} s ({stopped})", "tuning", progress)
    return {"best": best, "chosen": setups[best]["setup"], "reference": reference, "budget_s": seconds,
            "seconds": elapsed, "stopped": stopped, "steady": steady, "setups": setups}


def _resolve(candidates: dict[str, EngineConfig], make_engine: Callable[[EngineConfig], Engine], reference: str,
             progress: bool) -> tuple[dict[str, _Run], dict[str, Any]]:
    """Build every candidate (the reference first); the distinct setups' runs, and for each
    candidate whose setup an earlier one has, that one's name."""
    runs: dict[str, _Run] = {}
    same: dict[str, Any] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name in [reference, *(n for n in candidates if n != reference)]:
        # Prompts repeat across turns: a cached prefix would make the candidate run later faster.
        engine = make_engine(candidates[name].replace(enable_prefix_caching=False))
        setup = effective_setup(engine)
        if setup in seen:  # e.g. the cost model's tree is empty: "tuned" is incremental decoding
            same[name] = seen[setup]
            say(f"tree auto: {name} is {describe(engine)}, the same as {seen[setup]}: not raced", "tuning", progress)
        else:
            seen[setup] = name
            runs[name] = _Run(engine, describe(engine))
    return runs, same


def _take_turns(runs: dict[str, _Run], prompts: list[list[int]], reference: str, params: SamplingParams,
                deadline: Deadline, clock: Callable[[], float]) -> tuple[str, bool]:
    """Each candidate decodes a prompt, then the next prompt, until the prompts run out, a
    candidate is clearly ahead, or the next turn would end past ``deadline``: why it stopped, and
    whether every turn was steady (STEADY). One request at a time: the setup's latency, not a
    batch's throughput."""
    racing, steady = list(runs), True
    for i, prompt in enumerate(prompts):
        turn = clock()
        others = [name for name in racing if name != reference]
        for name in [reference, *(others if i % 2 == 0 else others[::-1])]:  # alternate: no one always follows it
            runs[name].decode(prompt, params, clock)
        again = clock()
        runs[reference].engine.generate(prompt, params)
        again, first = clock() - again, runs[reference].seconds[-1]
        turn = clock() - turn
        steady_turn = max(again, first) <= STEADY * min(again, first)
        steady = steady and steady_turn
        for name in racing:
            runs[name].exact = runs[name].outputs[i] == runs[reference].outputs[i]
        racing = [name for name in racing if runs[name].exact]  # an inexact candidate cannot win: stop it
        if len(racing) == 1:
            return "no other candidate left", steady
        leader = clear_leader({name: runs[name] for name in racing}) if steady_turn else None
        if leader is not None:
            return f"{leader} clearly ahead", steady
        if i + 1 < len(prompts) and not deadline.fits(turn):
            return "time budget spent", steady
    return "every prompt decoded", steady


def cached_setup(config: EngineConfig) -> EngineConfig | None:
    """The race's cached winner for ``config`` on this machine, or None (not raced here yet)."""
    result = read_result(race_path(config))
    return race_candidates(config).get(result.get("best", "")) if result else None


def raced_setup(config: EngineConfig, make_engine: Callable[[EngineConfig], Engine], progress: bool = False, *,
                clock: Callable[[], float] = time.perf_counter) -> EngineConfig:
    """The fastest of ``race_candidates(config)`` on this machine (raced once, cached; a
    retrained drafter changes the key, cache.py), raced within ``config.tuning_budget_s`` on
    engines with a one-request KV pool."""
    candidates = race_candidates(config)
    path = race_path(config)
    result = read_result(path)
    if result is not None and result.get("best") in candidates:
        say(f"tree auto: using cached tuning result from {path}: {result['best']} ({result.get('chosen')})",
            "tuning", progress)
        return candidates[result["best"]]
    seconds = budget_seconds(config.tuning_budget_s, resolve_device(config.device))
    say(f"tree auto: racing {', '.join(candidates)} within a {seconds:g} s budget, cost measurement included "
        f"(once on this machine; cached in {path})", "tuning", progress)
    small = {name: setup.replace(max_num_seqs=1, kv_blocks=race_kv_blocks(setup)) for name, setup in candidates.items()}
    result = race(small, make_engine, seconds, clock=clock, progress=progress)
    if result["steady"]:
        write_result(path, result)
    else:  # a busy machine's numbers: good for this start, not for every later one
        say("tree auto: the machine's load changed while racing: using the choice for this start, not caching it",
            "tuning", progress)
    return candidates[result["best"]]
