"""Prefix caching: published blocks shared by reference, evicted least recently used leaves first;
outputs identical with caching on and off in every order, batch, pool size and mode; nothing
leaks (Ray: tests/test_distributed.py)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from eagle3_helpers import make_feature_models
from helpers import make_tiny_checkpoint
from test_engine_exact import noisy_copy
from test_mss import NEW_TOKENS, ckpts, exact_distribution, g_test  # noqa: F401 - ckpts is a fixture

from specinfer_dist import LLMEngine, SamplingParams
from specinfer_dist.runtime.block_pool import BlockPool, KVCapacity, chain_digests
from specinfer_dist.runtime.kv_cache import PagedKVCache

BLOCK = 4


def pool_of(blocks: int, growable: bool = False) -> BlockPool:
    return BlockPool(KVCapacity(blocks, BLOCK), 1, 1, 2, torch.float32, growable=growable, prefix_caching=True)


def filled(pool: BlockPool, tokens: list[int]) -> PagedKVCache:
    """A cache that computed ``tokens`` (rows written with the token id) and committed them."""
    cache = PagedKVCache(pool)
    cache.attach(tokens[:-1])
    new = tokens[cache.length :]
    first = cache.length
    cache.reserve(new)
    pool.kv[:, :, cache.slots(range(first, first + len(new)))] = torch.tensor(new, dtype=torch.float32)[:, None, None]
    cache.commit(range(len(new)))
    return cache


def test_a_digest_covers_the_whole_prefix():
    a, b = chain_digests([1, 2, 3, 4, 5, 6, 7, 8], BLOCK), chain_digests([9, 2, 3, 4, 5, 6, 7, 8], BLOCK)
    assert len(a) == 2 and a[0] != b[0] and a[1] != b[1]  # same second block, other first: another digest
    assert chain_digests([1, 2, 3, 4, 5, 6, 7], BLOCK) == a[:1]  # a partial block is never keyed


def test_blocks_are_shared_by_reference_and_never_written_by_a_sharer():
    pool = pool_of(8)
    first = filled(pool, list(range(1, 11)))  # 10 rows: blocks 0, 1 full (published), 2 partial
    assert pool.num_cached == 2 and pool.num_used == 3
    before = pool.kv.clone()
    second = PagedKVCache(pool)
    assert second.attach(list(range(1, 10)) + [99]) == 8  # both full blocks, not the partial one
    assert second.blocks == first.blocks[:2] and pool.num_used == 3
    second.reserve([9, 10, 11, 12, 13, 14])  # a tree's rows go to blocks of its own
    second.commit([0, 2, 3, 5])  # the accepted path moves down: rows 8-11, a third full block
    assert torch.equal(pool.kv[:, :, first.slots(range(10))], before[:, :, first.slots(range(10))])
    first.free()
    assert pool.num_used == 3  # the shared blocks stay held by the second, and its own
    second.free()
    assert pool.num_used == 0 and pool.num_free == 8 and pool.num_cached == 3  # second's third block too


def test_eviction_takes_the_least_recently_released_leaf_first():
    pool = pool_of(6)
    old = filled(pool, list(range(1, 10)))  # 2 published blocks + 1 partial
    new = filled(pool, list(range(50, 59)))
    old.free()
    new.free()
    assert pool.num_cached == 4 and pool.num_free == 6
    taken = pool.allocate(3)  # 2 never-published blocks are free; then old's leaf goes
    assert len(taken) == 3 and pool.num_cached == 3
    hits = [PagedKVCache(pool) for _ in range(2)]
    assert hits[0].attach(list(range(1, 10))) == BLOCK  # old's first block is still there
    assert hits[1].attach(list(range(50, 59))) == 2 * BLOCK
    pool.free(taken)
    for cache in hits:
        cache.free()
    assert pool.reset_prefix_cache() == 3 and pool.num_cached == 0 and pool.num_free == 6


def test_a_growable_pool_evicts_before_it_grows():
    pool = pool_of(4, growable=True)
    filled(pool, list(range(1, 14))).free()  # 3 published blocks + 1 partial
    PagedKVCache(pool).reserve(range(2 * BLOCK))
    assert pool.capacity.num_blocks == 4 and pool.num_cached == 2
    PagedKVCache(pool).reserve(range(4 * BLOCK))
    assert pool.capacity.num_blocks == 8  # nothing left to evict: it grows


# ---- the engine: caching on == caching off --------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prefix")
    llm = make_tiny_checkpoint(tmp, "llama", seed=1, num_hidden_layers=3)
    feature_llm, head = make_feature_models(tmp)
    return {"llm": str(llm), "near": str(noisy_copy(llm, tmp / "ssm-near", noise=0.3)),
            "feature_llm": str(feature_llm), "head": str(head)}


def stream(seed: int, vocab: int) -> list[list[int]]:
    """Prompts with overlapping prefixes: shared stems cut mid-block and at block ends, identical
    prompts, prompts that are prefixes of each other, and unrelated ones."""
    rng = random.Random(seed)
    stems = [[rng.randrange(4, vocab) for _ in range(n)] for n in (13, 24, 9)]
    prompts = []
    for _ in range(14):
        kind = rng.random()
        if kind < 0.2 and prompts:
            prompts.append(list(rng.choice(prompts)))  # identical
        elif kind < 0.35 and prompts:
            base = rng.choice(prompts)
            prompts.append(base[: rng.randrange(1, len(base) + 1)])  # a prefix of an earlier one
        elif kind < 0.9:
            stem = rng.choice(stems)
            prompts.append(stem[: rng.randrange(len(stem) // 2, len(stem) + 1)]
                           + [rng.randrange(4, vocab) for _ in range(rng.randrange(0, 7))])
        else:
            prompts.append([rng.randrange(4, vocab) for _ in range(rng.randrange(2, 12))])
    return prompts


SETUPS = {  # mode -> engine options
    "incremental": lambda m: dict(llm=m["llm"], mode="incremental"),
    "tree": lambda m: dict(llm=m["llm"], ssms=[m["near"]], tree="1,1,3,1"),
    "dynamic": lambda m: dict(llm=m["llm"], ssms=[m["near"]], tree="dynamic:2,3", tree_budget=8),
    "feature": lambda m: dict(llm=m["feature_llm"], ssms=["none"], feature_drafter=m["head"], tree="2,1,1"),
}


def run(engine: LLMEngine, prompts: list[list[int]], order: str) -> list[list[int]]:
    """Greedy outputs of ``prompts`` in their order: all at once, or one after another (each
    finds what the earlier ones published), or submitted over steps with one aborted mid-prefill."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    if order == "together":
        outs = [o.token_ids for o in engine.generate(prompts, params)]
    elif order == "one by one":
        outs = [engine.generate(p, params)[0].token_ids for p in prompts]
    else:  # staggered: two new requests per step; a long one aborted while its prompt is in chunks
        seqs, victim = [], engine.add_request((prompts[0] * 4)[:40], params)
        for i in range(0, len(prompts), 2):
            seqs += [engine.add_request(p, params) for p in prompts[i : i + 2]]
            engine.step()
            if victim is not None and victim.prefilling and victim.num_cached:
                assert engine.abort(victim.request_id)
                victim = None
        assert victim is None, "the long prompt was not caught mid-prefill"
        while engine.has_unfinished():
            engine.step()
        outs = [engine.output(seq).token_ids for seq in seqs]
    assert_released(engine)
    return outs


def assert_released(engine: LLMEngine) -> None:
    """Every reference went back: no cache, no held block, in the LLM's pool and each drafter's."""
    assert not engine.has_unfinished() and not engine.verifier.caches
    assert engine.verifier.pool.num_used == 0
    for drafter in engine.drafters:
        assert not drafter.caches and drafter.runner.pool.num_used == 0


@pytest.mark.parametrize("mode", SETUPS)
def test_greedy_outputs_are_the_same_with_caching_on_and_off(models, mode):
    """Random streams with overlapping prefixes, in three submission orders, with a roomy pool
    and one so small it evicts and preempts, with chunked prefill: the same tokens with and
    without caching, and the cache is really used."""
    options = SETUPS[mode](models)
    vocab = 24 if mode == "feature" else 200
    preempted = 0
    for seed, (order, small) in enumerate([("together", False), ("one by one", True), ("staggered", True)]):
        prompts = stream(seed, vocab)
        pool = dict(kv_blocks=20, kv_block_size=BLOCK) if small else dict(kv_block_size=BLOCK)
        budget = dict(max_num_batched_tokens=12, max_num_seqs=8)
        want = run(LLMEngine.load(**options, **pool, **budget, enable_prefix_caching=False), prompts, order)
        engine = LLMEngine.load(**options, **pool, **budget)
        assert run(engine, prompts, order) == want, (order, small)
        # Admitted together, a feature drafter's requests all start before any head row is cached,
        # and the LLM reuses no more than the head holds (test_feature_drafter_... below).
        assert engine.prefix_cache_hits > 0 or (mode, order) == ("feature", "together"), (order, small)
        if small:
            assert engine.verifier.pool.evictions > 0, order
        preempted += engine.scheduler.num_preemptions
    assert preempted > 0  # a preempted request came back to its own cached prefix


def test_hits_are_counted_per_request_and_skip_the_llm(models):
    """A request whose prompt is cached computes only what is not: counted in LLM rows."""
    engine = LLMEngine.load(models["llm"], mode="incremental", kv_block_size=BLOCK)
    rows = []
    real = engine.verifier.logits
    engine.verifier.logits = lambda items: rows.append(sum(len(i.tokens) for i in items)) or real(items)
    prompt = list(range(10, 31))  # 21 tokens: 5 full blocks of the 20 before the last
    params = SamplingParams(temperature=0, max_tokens=1)
    first, second = (engine.generate(prompt, params)[0] for _ in range(2))
    assert (first.cached_tokens, second.cached_tokens) == (0, 20)
    assert rows == [21, 1]  # the second computes its last token only
    assert (engine.prefix_cache_queries, engine.prefix_cache_hits) == (42, 20)
    assert engine.reset_prefix_cache() == 5
    assert engine.generate(prompt, params)[0].cached_tokens == 0


def test_feature_drafter_keeps_drafting_on_a_cached_prefix(models):
    """The LLM reuses no more than the head holds, so the head gets hidden states for every row
    after it and drafts as it would without caching."""
    options = SETUPS["feature"](models)
    prompt = list(range(2, 20)) + [5, 6]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    off = LLMEngine.load(**options, kv_block_size=BLOCK, enable_prefix_caching=False).generate(prompt, params)[0]
    engine = LLMEngine.load(**options, kv_block_size=BLOCK)
    engine.generate(prompt, params)
    again = engine.generate(prompt, params)[0]
    assert again.cached_tokens > 0 and again.token_ids == off.token_ids
    assert again.stats.drafted_tokens == off.stats.drafted_tokens  # drafted from the first step, as without


def test_seeded_sampling_is_the_same_with_caching_on_and_off(models):
    prompts = stream(7, 200)
    params = [SamplingParams(temperature=0.9, top_k=20, max_tokens=6, ignore_eos=True, seed=i) for i in range(len(prompts))]
    options = SETUPS["tree"](models)

    def one_by_one(engine: LLMEngine) -> list[list[int]]:
        return [engine.generate(p, sp)[0].token_ids for p, sp in zip(prompts, params)]

    engine = LLMEngine.load(**options, kv_block_size=BLOCK)
    assert one_by_one(engine) == one_by_one(LLMEngine.load(**options, kv_block_size=BLOCK, enable_prefix_caching=False))
    assert engine.prefix_cache_hits > 0


def test_mss_keeps_the_llm_distribution_on_cached_prefixes(ckpts):  # noqa: F811 - the fixture
    """Batches of the same prompt one after another: all but the first batch start on cached
    blocks, and the samples still follow the LLM's distribution (G-test)."""
    prompt = [4, 5, 6, 7, 5, 6, 4, 4, 7, 6]  # two full blocks of 4 before the last token
    engine = LLMEngine.load(ckpts["llm"], ssms=[ckpts["near"]], tree="2,2", max_num_seqs=256, kv_block_size=BLOCK)
    counts: Counter = Counter()
    for batch in range(8):
        params = [SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, seed=batch * 1000 + i, temperature=1.0)
                  for i in range(250)]
        counts.update(tuple(o.token_ids) for o in engine.generate([prompt] * 250, params))
    assert engine.prefix_cache_hits >= 7 * 250 * 8
    p_value = g_test(counts, exact_distribution(ckpts["hf"], prompt, NEW_TOKENS, 1.0))
    print(f"G-test p={p_value:.3g}")
    assert p_value > 1e-3


def test_requests_admitted_together_share_a_prefix_prefilled_in_chunks(models):
    """Three prompts with one 30-token stem, sent at once under a 10-row step budget: the first
    computes the stem in chunks; the others, waiting for their chunks (which end on block
    boundaries), take its blocks as they are published and compute little more than their own tails."""
    stem = list(range(10, 40))
    prompts = [stem + [50, 51, 52], stem + [60, 61, 62], stem + [70, 71]]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    options = dict(mode="incremental", kv_block_size=BLOCK, max_num_batched_tokens=10)
    want = [o.token_ids for o in LLMEngine.load(models["llm"], **options, enable_prefix_caching=False).generate(prompts, params)]
    engine = LLMEngine.load(models["llm"], **options)
    rows: Counter = Counter()
    real = engine.verifier.logits

    def logits(items):
        for item in items:
            rows[item.request_id] += len(item.tokens) - len(item.logit_rows)  # prompt rows, not roots
        return real(items)

    engine.verifier.logits = logits
    outs = engine.generate(prompts, params)
    assert [o.token_ids for o in outs] == want
    assert rows[outs[0].request_id] == 32 and all(rows[o.request_id] <= BLOCK for o in outs[1:])
    assert [o.cached_tokens for o in outs][1:] == [len(p) - 1 - rows[o.request_id] for p, o in zip(prompts[1:], outs[1:])]
