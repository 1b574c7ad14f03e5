"""The bucketed static-buffer step (what a CUDA graph replays) against the plain eager step:
same tokens, greedy and sampled, with trees, mixed batches, GQA, sliding windows, soft-capping
and feature drafters. On a CPU nothing is captured (``static_steps``: the same layout, padding
and buffers, run eagerly); scripts/gpu_check.sh runs the captured graphs on a GPU."""

from __future__ import annotations

import pytest
import torch
from eagle3_helpers import make_eagle3_head
from helpers import make_tiny_checkpoint
from test_engine_exact import noisy_copy, prompts

from specinfer_dist import LLMEngine, SamplingParams
from specinfer_dist.config import EngineConfig
from specinfer_dist.engine.builder import build_parts
from specinfer_dist.runtime.kv_cache import PagedKVCache
from specinfer_dist.runtime.step_graphs import StepGraphs
from specinfer_dist.runtime.step_layout import RunItem, StepShape, chain_parents
from specinfer_dist.runtime.verifier import LocalVerifier


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def models(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    llm = make_tiny_checkpoint(tmp, request.param, seed=1, num_hidden_layers=3)
    return llm, noisy_copy(llm, tmp / "ssm", noise=0.3)


def engines(config: EngineConfig) -> tuple[LLMEngine, LLMEngine]:
    """(plain, static) engines on the same weights."""
    parts = build_parts(config)
    plain = LLMEngine(**vars(parts))
    parts.verifier = LocalVerifier(parts.verifier.runner.model, kv_blocks=256, static_steps=True)
    return plain, LLMEngine(**vars(parts))


@pytest.mark.parametrize("tree", ["2,2,1,1", "1,1,3,1,1,1,1,1", "dynamic"])
def test_static_steps_equal_plain_steps(models, tree):
    llm, ssm = models
    plain, static = engines(EngineConfig(llm=str(llm), ssms=[str(ssm)], tree=tree, kv_blocks=256))
    batch = prompts(5)  # 5 requests of different lengths: padded to a bucket of 8
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    sampled = [SamplingParams(temperature=0.9, top_p=0.9, max_tokens=20, seed=s, ignore_eos=True) for s in range(5)]
    for params in (greedy, sampled):
        want = [o.token_ids for o in plain.generate(batch, params)]
        got = static.generate(batch, params)
        assert [o.token_ids for o in got] == want
        assert sum(o.stats.steps for o in got) < sum(len(o.token_ids) for o in got)  # it speculated
    graphs: StepGraphs = static.verifier.runner.graphs
    shapes = {key[0] for key in graphs._graphs}
    assert any(s.batch == 8 and s.tokens > 8 for s in shapes)  # padded batches with trees went through it


def test_static_steps_feed_feature_drafters(models, tmp_path):
    llm, _ = models
    head = make_eagle3_head(tmp_path, llm, logit_scale=3.0)
    plain, static = engines(EngineConfig(llm=str(llm), ssms=["none"], feature_drafter=str(head), tree="dynamic",
                                         kv_blocks=256))
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    assert [o.token_ids for o in static.generate(prompts(3), greedy)] == \
        [o.token_ids for o in plain.generate(prompts(3), greedy)]
    assert any(key[1] for key in static.verifier.runner.graphs._graphs)  # with the aux layers captured


def test_buckets_and_scratch_block(models):
    llm, _ = models
    engine = LLMEngine.load(str(llm), ssms=["none"], mode="incremental", kv_blocks=16)
    verifier = LocalVerifier(engine.verifier.runner.model, kv_blocks=16, static_steps=True)
    pool, graphs = verifier.runner.pool, verifier.runner.graphs
    assert pool.capacity.num_blocks == 17 and verifier.kv_capacity.num_blocks == 16  # the scratch block is extra
    assert graphs.scratch_block not in pool._free
    caches = [verifier.runner.new_cache() for _ in range(3)]
    for cache, n in zip(caches, (1, 3, 20)):
        cache.reserve(range(n))
    items = [RunItem(c, [5] * n, chain_parents(n), [n - 1]) for c, n in zip(caches, (1, 3, 20))]
    assert graphs.bucket(items, ()) == StepShape(batch=4, queries=32, tree_rows=0, blocks=2)
    too_big = [RunItem(caches[2], [5] * 2000, chain_parents(2000), [0])]
    assert graphs.bucket(too_big, ()) is None  # a long prompt chunk runs eagerly


def test_steps_replay_a_larger_captured_bucket(models):
    """A step replays the smallest captured graph that holds it within the padding limits;
    only a step no graph holds gets its own bucket."""
    llm, _ = models
    engine = LLMEngine.load(str(llm), ssms=["none"], mode="incremental", kv_blocks=64)
    runner = LocalVerifier(engine.verifier.runner.model, kv_blocks=64, static_steps=True).runner
    graphs = runner.graphs

    def step(batch: int, tokens: int, context: int) -> StepShape:
        items = []
        for _ in range(batch):
            cache = runner.new_cache()
            cache.reserve(range(context))
            cache.commit(range(context))
            cache.reserve(range(tokens))  # as ModelRunner.run does before it picks the bucket
            items.append(RunItem(cache, [5] * tokens, chain_parents(tokens), [tokens - 1]))
        shape = graphs.bucket(items, ())
        graphs.run(items, shape, (), runner._to_device)  # captures (records) its bucket if it is new
        for item in items:
            item.cache.free()
        return shape

    assert step(4, 16, 20) == StepShape(batch=4, queries=16, tree_rows=0, blocks=4)
    assert step(2, 9, 20) == StepShape(batch=4, queries=16, tree_rows=0, blocks=4)  # 64 rows for 32: held
    assert step(1, 1, 20) == StepShape(batch=1, queries=1, tree_rows=0, blocks=2)  # 64 rows for 1: its own
    assert step(1, 1, 40) == StepShape(batch=1, queries=1, tree_rows=0, blocks=4)  # twice the blocks: its own
    assert step(1, 1, 20) == StepShape(batch=1, queries=1, tree_rows=0, blocks=2)  # the smallest that holds it
    assert step(4, 16, 20) == StepShape(batch=4, queries=16, tree_rows=0, blocks=4)


def test_folded_gqa_equals_sdpa_gqa(models, monkeypatch):
    """The CUDA path for grouped queries (each KV head's group folded into the query rows, no K/V
    repeated) run on a CPU: the same tokens as SDPA's own enable_gqa, trees and batches included."""
    from specinfer_dist.models import attention

    llm, ssm = models
    config = EngineConfig(llm=str(llm), ssms=[str(ssm)], tree="2,2,1,1", kv_blocks=256)
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want = [o.token_ids for o in LLMEngine(**vars(build_parts(config))).generate(prompts(4), greedy)]
    monkeypatch.setattr(attention, "fold_gqa", lambda device: True)
    assert [o.token_ids for o in LLMEngine(**vars(build_parts(config))).generate(prompts(4), greedy)] == want
