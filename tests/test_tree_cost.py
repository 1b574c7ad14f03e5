"""Choosing a tree from measured costs and coverage; --tree auto end to end on a tiny model."""

import json
import shutil

import pytest
import torch
from helpers import make_tiny_checkpoint

from specinfer_dist import LLMEngine, SamplingParams
from specinfer_dist.models.loader import load_model
from specinfer_dist.tuning.tree_cost import (
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
    assert all(s["outputs_equal_incremental"] and s["tokens_per_s"] > 0 for s in race["setups"].values())
    assert race["setups"]["dynamic"]["tokens_per_step"] > 1.5  # a perfect drafter: many tokens per step
    assert race["best"] == max(race["setups"], key=lambda n: race["setups"][n]["tokens_per_s"])
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
