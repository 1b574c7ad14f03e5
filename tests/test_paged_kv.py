"""Paged KV cache and admission control: same rows as the contiguous cache, bounded memory,
every request completes with the output it has without a pool, no block leaks."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_checkpoint
from test_engine_exact import noisy_copy, prompts

from specinfer_dist import (
    InvalidConfigError,
    InvalidRequestError,
    LLMEngine,
    SamplingParams,
)
from specinfer_dist.runtime.block_pool import (
    DEFAULT_CPU_KV_BYTES,
    BlockPool,
    KVCapacity,
    auto_capacity,
    block_bytes,
)
from specinfer_dist.runtime.kv_cache import PagedKVCache

LAYERS, HEADS, HEAD_DIM, BLOCK = 2, 2, 8, 4


def test_paged_cache_ops_keep_the_right_rows():
    """Rows written through slots, then commits (scattered keeps across block boundaries,
    nothing, everything): the committed K/V are exactly the kept rows, in order, and the
    cache holds exactly the blocks they need."""
    pool = BlockPool(KVCapacity(12, BLOCK), LAYERS, HEADS, HEAD_DIM, torch.float32)
    cache = PagedKVCache(pool)
    gen = torch.Generator().manual_seed(0)
    want = torch.empty(LAYERS, 2, 0, HEADS, HEAD_DIM)
    for sizes, keep in [
        ([5], [0, 1, 2, 3, 4]),
        ([7], [0, 2, 5, 6]),
        ([3, 6], [1, 3, 4, 8]),
        ([9], []),
        ([2], [0, 1]),
        ([11], [0, 1, 2, 6, 7, 10]),
    ]:
        pending = []
        for n in sizes:  # one forward each: write the new rows where the runner would
            first = cache.length + cache.pending
            cache.reserve(range(n))
            rows = torch.randn(LAYERS, 2, n, HEADS, HEAD_DIM, generator=gen)
            pool.kv[:, :, cache.slots(range(first, first + n))] = rows
            pending.append(rows)
        assert pool.num_used == -(-(cache.length + cache.pending) // BLOCK)
        cache.commit(keep)
        want = torch.cat((want, torch.cat(pending, dim=2)[:, :, keep]), dim=2)
        torch.testing.assert_close(cache.committed(), want, rtol=0, atol=0)
        assert len(cache.blocks) == pool.num_used == -(-cache.length // BLOCK)

    cache.reserve(range(6))
    cache.rollback()
    assert len(cache.blocks) == -(-cache.length // BLOCK)
    cache.free()
    assert pool.num_free == 12 and not cache.blocks
    with pytest.raises(RuntimeError, match="exhausted"):
        cache.reserve(range(12 * BLOCK + 1))


def test_growable_pool_keeps_rows_when_it_grows():
    pool = BlockPool(KVCapacity(2, BLOCK), LAYERS, HEADS, HEAD_DIM, torch.float32, growable=True)
    a, b = PagedKVCache(pool), PagedKVCache(pool)
    a.reserve(range(7))
    pool.kv[:, :, a.slots(range(7))] = rows = torch.randn(LAYERS, 2, 7, HEADS, HEAD_DIM)
    a.commit(range(7))
    b.reserve(range(3 * BLOCK))  # needs 3 more blocks than the 2 there are
    assert pool.capacity.num_blocks >= 5 and pool.num_used == 5
    torch.testing.assert_close(a.committed(), rows, rtol=0, atol=0)


def test_stale_pool_memory_never_reaches_attention():
    """The pool is not zeroed up front: garbage (here NaN) in blocks must not leak into logits
    through masked rows or padded block tables."""
    from test_model import pair

    from specinfer_dist.runtime.model_runner import ModelRunner, RunItem, chain_parents

    _, model = pair("llama")
    runner = ModelRunner(model, KVCapacity(16, BLOCK))
    want = [runner.forward([RunItem(runner.new_cache(), ids, chain_parents(len(ids)), [len(ids) - 1])])[0]
            for ids in ([5, 6, 7], list(range(20, 33)))]
    runner = ModelRunner(model, KVCapacity(16, BLOCK))
    runner.pool.kv.fill_(float("nan"))
    items = [RunItem(runner.new_cache(), ids, chain_parents(len(ids)), [len(ids) - 1])
             for ids in ([5, 6, 7], list(range(20, 33)))]
    for got, ref in zip(runner.forward(items), want):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_auto_capacity_fits_the_cpu_budget_and_the_requests():
    cap = auto_capacity(2, 2, 8, torch.float32, torch.device("cpu"), BLOCK, max_rows=1000)
    assert cap == KVCapacity(250, BLOCK)  # 1000 rows is far below 1 GiB
    big = auto_capacity(32, 8, 128, torch.float32, torch.device("cpu"), 16, max_rows=10**9)
    assert big.num_blocks * block_bytes(32, 8, 128, torch.float32, 16) <= DEFAULT_CPU_KV_BYTES


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paged")
    llm = make_tiny_checkpoint(tmp, "llama", seed=1, num_hidden_layers=3)
    return str(llm), str(noisy_copy(llm, tmp / "ssm-near", noise=0.3))


TREE = "1,1,3,1,1"  # 9 drafted tokens at most


def run_checked(engine: LLMEngine, batch, params) -> list:
    """generate(), checking after every step that the pool holds exactly the blocks of the
    running requests' cached tokens: the scheduler's accounting is the pool's."""
    seqs = [engine.add_request(p, sp) for p, sp in zip(batch, params)]
    verifier, cap = engine.verifier, engine.verifier.kv_capacity
    while engine.scheduler.has_unfinished():
        engine.step()
        assert verifier.pool.num_used == sum(cap.blocks_for(s.num_cached) for s in engine.scheduler.running)
    assert verifier.kv_usage() == 0.0 and not verifier.caches
    return [engine.output(seq) for seq in seqs]


@pytest.mark.parametrize("mode", ["tree", "incremental"])
def test_small_pool_completes_every_request_with_unconstrained_output(models, mode):
    llm, near = models
    ssms = [near] if mode == "tree" else []
    batch = prompts(6, seed=3)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (30, 12, 24, 5, 20, 16)]
    free = LLMEngine.load(llm, ssms=ssms, tree=TREE, mode=mode).generate(batch, params)
    # 24 blocks of 4 tokens: the largest request needs 17 at most, the six 40 to start, 66 to end.
    engine = LLMEngine.load(llm, ssms=ssms, tree=TREE, mode=mode, kv_blocks=24, kv_block_size=BLOCK)
    outs = run_checked(engine, batch, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in free]
    assert engine.scheduler.num_preemptions > 0


def test_preemption_keeps_seeded_sampling_reproducible(models):
    llm, near = models
    batch = [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15]]
    params = [SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True, seed=s) for s in (1, 2, 3)]
    free = LLMEngine.load(llm, ssms=[near], tree=TREE).generate(batch, params)
    # All three start (4 blocks each); growing to ~14 blocks each forces preemptions.
    engine = LLMEngine.load(llm, ssms=[near], tree=TREE, kv_blocks=20, kv_block_size=BLOCK)
    outs = run_checked(engine, batch, params)
    assert engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in free]


def test_impossible_request_is_rejected_and_aborts_free_blocks(models):
    llm, near = models
    engine = LLMEngine.load(llm, ssms=[near], tree=TREE, kv_blocks=8, kv_block_size=BLOCK)
    # 20 + 5 - 1 + 9 = 33 rows need 9 blocks.
    with pytest.raises(InvalidRequestError, match="needs 9 KV blocks of 4 tokens; the pool has 8"):
        engine.add_request(list(range(4, 24)), SamplingParams(max_tokens=5))
    with pytest.raises(InvalidRequestError):  # a bad prompt in a batch queues nothing
        engine.generate([[5, 6], list(range(4, 24))], SamplingParams(max_tokens=5))
    assert not engine.scheduler.has_unfinished()
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    seqs = [engine.add_request([5 + i, 6, 7], params) for i in range(3)]
    engine.step()
    assert engine.verifier.kv_usage() > 0 and engine.scheduler.waiting  # not all fit
    for seq in seqs:
        engine.abort(seq.request_id)
    assert engine.verifier.kv_usage() == 0.0 and not engine.scheduler.has_unfinished()
    with pytest.raises(InvalidConfigError):
        KVCapacity(0)
