"""Choosing a tree from measured costs and coverage; --tree auto end to end on a tiny model."""

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from helpers import make_tiny_checkpoint

from specinfer_dist import LLMEngine, SamplingParams
from specinfer_dist.config import EngineConfig
from specinfer_dist.models.loader import load_model
from specinfer_dist.tree.spec import TreeSpec
from specinfer_dist.tuning import race as race_module
from specinfer_dist.tuning import tune
from specinfer_dist.tuning.cache import race_path
from specinfer_dist.tuning.race import RACE_TOKENS, cached_setup, race, race_candidates, race_kv_blocks, raced_setup
from specinfer_dist.tuning.tree_cost import (
    TreeChoice,
    choose_tree,
    evaluate,
    forward_cost,
    interpolate,
    topk_coverage,
)

FLAT = {1: 1.0, 64: 1.0, 128: 1.0}  # a device where verifying 128 tokens costs what 1 does
FREE = {1: 0.0, 64: 0.0}


def test_expected_tokens_formula():
    choice = evaluate((1, 2), [0.5, 0.7], FLAT, FREE)
    # depth 1: top-1 covers 0.5; depth 2: top-2 covers 0.7 -> 0.5 + 0.5 * 0.7 accepted, plus the bonus.
    assert choice.tokens_per_step == pytest.approx(1 + 0.5 + 0.35)
    assert choice.step_s == pytest.approx(1.0)


def test_merged_ssms_cost_their_union_and_cover_it():
    linear = {1: 1.0, 64: 64.0}  # verify cost grows with every tree token
    one, two = evaluate((1, 2), [0.5, 0.7], linear, FREE), evaluate((1, 2), [0.5, 0.7], linear, FREE, num_ssms=2)
    assert one.step_s == pytest.approx(1 + 1 + 2) and two.step_s == pytest.approx(1 + 2 * (1 + 2))
    # ranks of the LLM's token under two SSMs: each guesses a different half first.
    a, b = torch.tensor([0, 0, 3, 1]), torch.tensor([2, 5, 0, 0])
    assert topk_coverage([a], max_k=2) == [0.5, 0.75]
    assert topk_coverage([a, b], max_k=2) == [1.0, 1.0]
    # Where a second verified token is free but a third is not, a second SSM that adds no
    # coverage (the same numbers) only costs.
    knee = {1: 1.0, 2: 1.0, 3: 1.5, 64: 32.0}
    single, merged = choose_tree([0.5, 0.6], knee, FREE), choose_tree([0.5, 0.6], knee, FREE, num_ssms=2)
    assert single.widths == (1,) and merged.tokens_per_s < single.tokens_per_s


def test_interpolation_and_extrapolation():
    costs = {1: 1.0, 3: 2.0}
    assert interpolate(costs, 2) == pytest.approx(1.5)
    assert interpolate(costs, 5) == pytest.approx(3.0)
    assert interpolate(costs, 0) == 1.0


def test_choice_follows_the_measurements():
    # A useless drafter on a costly verifier: do not speculate.
    assert choose_tree([0.0, 0.0], {1: 1.0, 64: 64.0}, FREE).widths == ()
    # A perfect drafter whose forwards are free on a flat verifier: go as deep as allowed, widths 1.
    assert choose_tree([1.0, 1.0], FLAT, FREE, max_depth=5).widths == (1,) * 5
    # A so-so top-1 but a much better top-2, and flat costs: branching pays.
    assert 2 in choose_tree([0.3, 0.9], FLAT, FREE, max_depth=3).widths


def test_forward_cost_sweep_measures_every_size(tmp_path):
    llm = make_tiny_checkpoint(tmp_path, "llama", seed=1)
    model, _, _ = load_model(str(llm))
    costs = forward_cost(model, [1, 4, 16], context=32, repeats=2)
    assert set(costs) == {1, 4, 16} and all(c > 0 for c in costs.values())


def test_tree_auto_picks_a_tree_and_stays_exact(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECINFER_DIST_CACHE", str(tmp_path / "cache"))
    # A shared core may stall a race's turn, and a race that sees the load change is not cached
    # (test_a_load_change_within_a_turn_neither_ends_the_race_early_nor_is_cached); here the choice
    # and its cache are tested.
    monkeypatch.setattr(race_module, "STEADY", float("inf"))
    llm = str(make_tiny_checkpoint(tmp_path, "llama", seed=1))
    auto = LLMEngine.load(llm, ssms=[llm], tree="auto")  # the LLM drafting for itself: full coverage
    [cached] = (tmp_path / "cache" / "tree-auto").glob("*.json")  # measured once, reused next start
    tuned = json.loads(cached.read_text())
    assert tuned["coverage_topk"][0] == pytest.approx(1.0)
    # The cost model's tree races incremental decoding and a dynamic tree end to end (with a
    # model drafting, tuning/race.py); every setup's greedy output is the LLM's.
    [raced] = (tmp_path / "cache" / "tree-race").glob("*.json")
    race = json.loads(raced.read_text())
    assert set(race["setups"]) == {"incremental", "tuned", "dynamic"}
    run = {n: s for n, s in race["setups"].items() if "same_as" not in s}  # a tuned empty tree is incremental
    assert all(s["outputs_equal_incremental"] and s["tokens_per_s"] > 0 for s in run.values())
    assert race["setups"]["dynamic"]["tokens_per_step"] > 1.5  # a perfect drafter: many tokens per step
    assert race["best"] == max(run, key=lambda n: run[n]["tokens_per_s"])
    # Whether drafting with a model as costly as the LLM pays depends on this machine's costs;
    # the engine must do what the measurements chose.
    if race["best"] == "dynamic":
        assert auto.mode == "tree" and auto.spec.dynamic
    elif race["best"] == "tuned" and tuned["tree"]:
        assert auto.mode == "tree" and list(auto.spec.widths) == tuned["tree"] and not auto.spec.dynamic
    else:
        assert auto.mode == "incremental"
    plain = LLMEngine.load(llm, mode="incremental")
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    assert auto.generate("hello there", params)[0].token_ids == plain.generate("hello there", params)[0].token_ids
    # Retrained weights at the same path are measured again, not served from the old result.
    LLMEngine.load(llm, ssms=[llm], tree="auto")
    assert len(list((tmp_path / "cache" / "tree-auto").glob("*.json"))) == 1
    assert len(list((tmp_path / "cache" / "tree-race").glob("*.json"))) == 1
    ssm_dir = make_tiny_checkpoint(tmp_path, "llama", seed=1)
    LLMEngine.load(llm, ssms=[str(ssm_dir)], tree="auto")
    first = len(list((tmp_path / "cache" / "tree-auto").glob("*.json")))
    make_tiny_checkpoint(tmp_path, "llama", seed=2).replace(tmp_path / "retrained")
    shutil.rmtree(ssm_dir)
    (tmp_path / "retrained").replace(ssm_dir)
    LLMEngine.load(llm, ssms=[str(ssm_dir)], tree="auto")
    assert len(list((tmp_path / "cache" / "tree-auto").glob("*.json"))) == first + 1
    assert len(list((tmp_path / "cache" / "tree-race").glob("*.json"))) == first + 1


# ---- the race's rules, on fake engines that spend time on a fake clock ---------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeEngine:
    """Decodes ``seconds_per_token`` fake seconds per token (times ``stalls[i]`` for its i-th
    decode, warm-up included), the same tokens for every setup."""

    tokenizer = SimpleNamespace(chat_template=None)
    max_positions = 256

    def __init__(self, setup: tuple, seconds_per_token: float, clock: FakeClock, prompts: list) -> None:
        self.mode, self.spec, names = setup if len(setup) == 3 else (*setup, None, ())
        self.drafters = [SimpleNamespace(name=n) for n in names]
        self.seconds_per_token, self.clock, self.prompts = seconds_per_token, clock, prompts
        self.stalls: dict[int, float] = {}
        self.calls = 0

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        return [ord(c) % 100 for c in prompt]

    def generate(self, prompt: list[int], params: SamplingParams) -> list:
        self.clock.now += self.seconds_per_token * params.max_tokens * self.stalls.get(self.calls, 1.0)
        self.calls += 1
        if params.max_tokens == RACE_TOKENS:  # not the warm-up
            self.prompts.append(prompt)
        tokens = list(range(params.max_tokens))
        return [SimpleNamespace(token_ids=tokens, stats=SimpleNamespace(steps=params.max_tokens))]


TREE = ("tree", TreeSpec((1, 1)), ("ssm0",))
DYNAMIC = ("tree", TreeSpec.parse("dynamic"), ("ssm0",))


def fake_race(speeds: dict[str, float], tuned: tuple = TREE, stalls: dict[int, float] | None = None):
    """(make_engine, clock, prompts decoded per candidate, configs built) for race_candidates'
    configs; ``speeds``: seconds per token per candidate name; the tuned candidate runs
    ``tuned``; ``stalls``: the incremental engine's."""
    clock, decoded, built = FakeClock(), {}, []

    def make_engine(config: EngineConfig) -> FakeEngine:
        name = "incremental" if config.mode == "incremental" else "dynamic" if config.tree == "dynamic" else "tuned"
        setup = {"incremental": ("incremental",), "dynamic": DYNAMIC, "tuned": tuned}[name]
        built.append(config)
        engine = FakeEngine(setup, speeds[name], clock, decoded.setdefault(name, []))
        engine.stalls = (stalls or {}) if name == "incremental" else {}
        return engine

    return make_engine, clock, decoded, built


def test_race_budget_of_zero_decodes_one_prompt_per_candidate():
    make_engine, clock, decoded, _ = fake_race({"incremental": 0.10, "tuned": 0.09, "dynamic": 0.08})
    result = race(race_candidates(EngineConfig()), make_engine, 0, clock=clock)
    # The reference decodes each turn's prompt twice (the second checks the machine stayed steady).
    assert {n: len(p) for n, p in decoded.items()} == {"incremental": 2, "tuned": 1, "dynamic": 1}
    assert all(s["prompts"] == 1 for s in result["setups"].values())
    assert len({tuple(p[0]) for p in decoded.values()}) == 1  # the same prompt: like with like
    assert result["stopped"] == "time budget spent" and result["best"] == "dynamic"


def test_race_takes_turns_until_the_next_would_overrun_the_budget():
    # A turn (each candidate one prompt, the reference twice) costs (0.10 * 2 + 0.09 + 0.08) * 32
    # = 11.84 fake s, the warm-ups 0.54: after two turns (24.22 s) a third would end past 25 s.
    make_engine, clock, decoded, _ = fake_race({"incremental": 0.10, "tuned": 0.09, "dynamic": 0.08})
    result = race(race_candidates(EngineConfig()), make_engine, 25, clock=clock)
    assert {n: len(p) for n, p in decoded.items()} == {"incremental": 4, "tuned": 2, "dynamic": 2}
    assert all(s["prompts"] == 2 for s in result["setups"].values())
    assert result["best"] == "dynamic" and result["seconds"] == pytest.approx(24.22)
    assert result["stopped"] == "time budget spent" and result["steady"]


def test_race_stops_when_a_candidate_is_clearly_ahead():
    make_engine, clock, decoded, _ = fake_race({"incremental": 0.10, "tuned": 0.09, "dynamic": 0.03})
    result = race(race_candidates(EngineConfig()), make_engine, None, clock=clock)
    assert all(s["prompts"] == 1 for s in result["setups"].values())
    assert result["best"] == "dynamic" and result["stopped"] == "dynamic clearly ahead"
    # Within the lead, every prompt is decoded when the budget allows.
    make_engine, clock, decoded, _ = fake_race({"incremental": 0.10, "tuned": 0.09, "dynamic": 0.08})
    result = race(race_candidates(EngineConfig()), make_engine, None, clock=clock)
    assert {s["prompts"] for s in result["setups"].values()} == {6} and result["stopped"] == "every prompt decoded"


def test_the_same_setup_is_raced_once():
    # The cost model's tree is empty: "tuned" is incremental decoding, not a speculative candidate.
    make_engine, clock, decoded, _ = fake_race({"incremental": 0.10, "tuned": 0.10, "dynamic": 0.08},
                                              tuned=("incremental",))
    result = race(race_candidates(EngineConfig()), make_engine, 0, clock=clock)
    assert result["setups"]["tuned"] == {"setup": "incremental decoding", "same_as": "incremental",
                                         "outputs_equal_incremental": True}
    assert {n: len(p) for n, p in decoded.items()} == {"incremental": 2, "tuned": 0, "dynamic": 1}
    # Two candidates that resolve to one tree: the first is raced, the second points to it.
    make_engine, clock, decoded, _ = fake_race({"incremental": 0.10, "tuned": 0.08, "dynamic": 0.08}, tuned=DYNAMIC)
    result = race(race_candidates(EngineConfig()), make_engine, 0, clock=clock)
    assert result["setups"]["dynamic"]["same_as"] == "tuned" and decoded["dynamic"] == []


def test_a_load_change_within_a_turn_neither_ends_the_race_early_nor_is_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPECINFER_DIST_CACHE", str(tmp_path))
    speeds = {"incremental": 0.20, "tuned": 0.20, "dynamic": 0.08}  # dynamic clearly ahead (2.5x)
    make_engine, clock, _, _ = fake_race(speeds)
    assert race(race_candidates(EngineConfig()), make_engine, None, clock=clock)["stopped"] == "dynamic clearly ahead"
    # The incremental engine's decodes: 0 warm-up, 1 the first prompt, 2 the same prompt again. A
    # stall made the second 3x slower: that turn ends nothing, the next (steady) one does.
    make_engine, clock, _, _ = fake_race(speeds, stalls={2: 3.0})
    result = race(race_candidates(EngineConfig()), make_engine, None, clock=clock)
    assert result["stopped"] == "dynamic clearly ahead" and result["setups"]["dynamic"]["prompts"] == 2
    assert not result["steady"]
    config = EngineConfig(device="cpu", tuning_budget_s=0)
    make_engine, clock, _, _ = fake_race(speeds, stalls={2: 3.0})
    assert raced_setup(config, make_engine, progress=True, clock=clock) == race_candidates(config)["dynamic"]
    assert cached_setup(config) is None and "not caching it" in capsys.readouterr().err


def test_cached_setup_is_the_race_winner_and_none_before(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPECINFER_DIST_CACHE", str(tmp_path))
    config = EngineConfig(device="cpu", tuning_budget_s=0)
    assert cached_setup(config) is None
    make_engine, clock, _, built = fake_race({"incremental": 0.10, "tuned": 0.09, "dynamic": 0.08})
    chosen = raced_setup(config, make_engine, progress=True, clock=clock)
    assert chosen == race_candidates(config)["dynamic"] and chosen.kv_blocks is None
    # The race's engines hold one request: a KV pool just big enough for it.
    assert all(c.max_num_seqs == 1 and c.kv_blocks == race_kv_blocks(config) for c in built)
    assert cached_setup(config) == chosen
    err = capsys.readouterr().err
    assert "racing incremental, tuned, dynamic within a 0 s budget" in err and "chose dynamic" in err
    # Once raced, the next start builds nothing to race and says where the result came from.
    assert raced_setup(config, lambda c: pytest.fail("raced again"), progress=True) == chosen
    assert f"using cached tuning result from {race_path(config)}" in capsys.readouterr().err


def test_race_key_is_shared_across_threads_and_budgets_but_not_drafter_files(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECINFER_DIST_CACHE", str(tmp_path))
    ssm = tmp_path / "ssm"
    ssm.mkdir()
    (ssm / "model.safetensors").write_bytes(b"weights")
    config = EngineConfig(ssms=[str(ssm)], device="cpu")
    key = race_path(config)
    # Not in the key: the thread count (it did not change the ranking, tuning/cache.py), the
    # time budget, batching and memory options, nor how the device was named.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        assert race_path(config) == key
    finally:
        torch.set_num_threads(threads)
    for other in (config.replace(tuning_budget_s=3), config.replace(max_num_seqs=2, kv_blocks=10)):
        assert race_path(other) == key
    if not torch.cuda.is_available():
        assert race_path(config.replace(device="auto")) == key
    # In the key: the options the race depends on, and the drafters' files.
    assert race_path(config.replace(draft_vocab=False)) != key and race_path(config.replace(tree_budget=8)) != key
    (ssm / "model.safetensors").write_bytes(b"retrain")
    os.utime(ssm / "model.safetensors", ns=(1, 1))
    assert race_path(config) != key


def test_an_empty_tuned_tree_is_not_raced(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECINFER_DIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tune, "choose_tree", lambda *a, **k: TreeChoice((), 1.0, 1.0))  # "don't speculate"
    llm = str(make_tiny_checkpoint(tmp_path, "llama", seed=1))
    LLMEngine.load(llm, ssms=[llm], tree="auto", tuning_budget_s=0)
    [raced] = (tmp_path / "cache" / "tree-race").glob("*.json")
    setups = json.loads(raced.read_text())["setups"]
    assert setups["tuned"]["same_as"] == "incremental" and "tokens_per_s" not in setups["tuned"]
    assert setups["incremental"]["prompts"] == setups["dynamic"]["prompts"] >= 1
