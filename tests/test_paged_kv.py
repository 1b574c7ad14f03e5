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
from specinfer_dist.runtime.block_pool import BlockPool, KVCapacity
from specinfer_dist.runtime.kv_cache import KVCache, PagedKVCache

LAYERS, HEADS, HEAD_DIM, BLOCK = 2, 2, 8, 4


def test_paged_cache_ops_equal_contiguous_cache():
    pool = BlockPool(KVCapacity(12, BLOCK), LAYERS, HEADS, HEAD_DIM, torch.float32)
    paged, plain = PagedKVCache(pool), KVCache(LAYERS, HEADS, HEAD_DIM, torch.float32, capacity=2)
    gen = torch.Generator().manual_seed(0)

    @torch.inference_mode()  # like ModelRunner.forward; commits happen outside it
    def forward(n: int) -> None:
        for cache in (paged, plain):
            cache.reserve(n)
        for layer in range(LAYERS):
            k, v = torch.randn(2, HEADS, n, HEAD_DIM, generator=gen)
            for got, want in zip(paged.append(layer, k, v), plain.append(layer, k, v)):
                torch.testing.assert_close(got, want, rtol=0, atol=0)

    # (rows per forward, kept rows): prompts, trees fed in two forwards, scattered keeps across
    # block boundaries, nothing kept, everything kept.
    for sizes, keep in [
        ([5], [0, 1, 2, 3, 4]),
        ([7], [0, 2, 5, 6]),
        ([3, 6], [1, 3, 4, 8]),
        ([9], []),
        ([2], [0, 1]),
        ([11], [0, 1, 2, 6, 7, 10]),
    ]:
        for n in sizes:
            forward(n)
        assert pool.num_used == -(-(paged.length + paged.pending) // BLOCK)
        for cache in (paged, plain):
            cache.commit(keep)
        torch.testing.assert_close(paged.committed(), plain.committed(), rtol=0, atol=0)
        assert paged.length == plain.length and len(paged.blocks) == pool.num_used == -(-paged.length // BLOCK)

    forward(6)
    paged.rollback()
    assert len(paged.blocks) == -(-paged.length // BLOCK)
    paged.free()
    assert pool.num_free == 12 and not paged.blocks
    with pytest.raises(RuntimeError, match="exhausted"):
        paged.reserve(12 * BLOCK + 1)


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
