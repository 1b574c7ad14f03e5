"""Chunked prefill under a per-step token budget: long prompts go through the LLM in chunks,
interleaved with the other requests' steps, and outputs do not change (greedy == transformers,
sampling exact by G-test and seed for seed)."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
import torch
import transformers
from exactness import assert_greedy_equal, hf_greedy
from helpers import make_tiny_checkpoint
from test_engine_exact import noisy_copy
from test_mss import NEW_TOKENS, VOCAB, ckpts, exact_distribution, g_test  # noqa: F401 - ckpts is a fixture

from specinfer_dist import LLMEngine, SamplingParams
from specinfer_dist.bench.chunked_prefill import head_of_line, long_prompt
from specinfer_dist.config import EngineConfig
from specinfer_dist.engine.async_engine import AsyncLLMEngine
from specinfer_dist.engine.builder import scheduling_options
from specinfer_dist.errors import InvalidConfigError
from specinfer_dist.runtime.device import default_max_batched_tokens

BUDGET = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chunked")
    llm = make_tiny_checkpoint(tmp, "llama", seed=1, num_hidden_layers=3)
    near = noisy_copy(llm, tmp / "ssm-near", noise=0.3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32).eval()
    return str(llm), str(near), hf


def mixed_prompts() -> list[list[int]]:
    """Two prompts several budgets long, submitted first, and short ones after them."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(4, 260, (m,), generator=gen).tolist() for m in (150, 97, 3, 5, 40)]


class ForwardLog:
    """Records what each LLM forward held: (request id, rows, logit rows) per item."""

    def __init__(self, engine: LLMEngine) -> None:
        self.forwards: list[list[tuple[int, int, int]]] = []
        real = engine.verifier.logits

        def logits(items):
            self.forwards.append([(i.request_id, len(i.tokens), len(i.logit_rows)) for i in items])
            return real(items)

        engine.verifier.logits = logits


def test_step_budget_auto_follows_the_device():
    """auto: vLLM's 2048 where the LLM runs on a GPU, 128 on a CPU (the README's head-of-line
    measurement); a number or null (no chunks) as given; anything else refused."""
    assert default_max_batched_tokens(torch.device("cuda")) == 2048
    assert scheduling_options(EngineConfig(device="cpu"))["max_num_batched_tokens"] == 128
    assert scheduling_options(EngineConfig(max_num_batched_tokens=512))["max_num_batched_tokens"] == 512
    assert scheduling_options(EngineConfig(max_num_batched_tokens=None))["max_num_batched_tokens"] is None
    for bad in (0, "big", 1.5):
        with pytest.raises(InvalidConfigError, match="max_num_batched_tokens"):
            EngineConfig(max_num_batched_tokens=bad)


@pytest.mark.parametrize("mode,kv_blocks", [("tree", None), ("tree", 64), ("incremental", None)])
def test_greedy_with_chunked_prompts_equals_transformers(models, mode, kv_blocks):
    llm, near, hf = models
    engine = LLMEngine.load(
        llm, ssms=[near] if mode == "tree" else ["none"], mode=mode, tree="1,2,1", kv_blocks=kv_blocks,
        max_num_batched_tokens=BUDGET,
    )
    log = ForwardLog(engine)
    prompts = mixed_prompts()
    seqs = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)) for p in prompts]
    first_token_step: dict[int, int] = {}
    step = 0
    while engine.has_unfinished():
        for seq in engine.step():
            first_token_step.setdefault(seq.request_id, step)
        step += 1
    for prompt, seq in zip(prompts, seqs):
        assert_greedy_equal(hf, prompt, seq.output_ids, hf_greedy(hf, prompt, 20))
    long_ids, short_ids = [s.request_id for s in seqs[:2]], [s.request_id for s in seqs[2:4]]
    chunks = [(rid, rows) for fwd in log.forwards for rid, rows, logit_rows in fwd if logit_rows == 0]
    assert {rid for rid, _ in chunks} >= set(long_ids) and all(rows <= BUDGET for _, rows in chunks)
    # The short prompts, queued behind the long ones, got their first tokens before them.
    assert max(first_token_step[r] for r in short_ids) < min(first_token_step[r] for r in long_ids)
    # Chunks ran in the same forwards as other requests' decode/verify steps.
    assert any(
        any(lr == 0 and rid in long_ids for rid, _, lr in fwd) and any(lr > 0 and rid in short_ids for rid, _, lr in fwd)
        for fwd in log.forwards
    )
    assert not engine.verifier.caches


def sample(engine: LLMEngine, prompt: list[int], trials: int, **kwargs) -> list[tuple[int, ...]]:
    params = [SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, seed=i, **kwargs) for i in range(trials)]
    return [tuple(o.token_ids) for o in engine.generate([prompt] * trials, params)]


LONG_PROMPT = [4, 5, 6, 7, 5, 6, 4, 4, 7, 6, 5, 5, 4, 7, 7, 6, 4, 5, 6, 7]  # 20 tokens


def test_mss_with_chunked_prompts_keeps_the_llm_distribution(ckpts):  # noqa: F811 - the fixture
    # Budget 18 < the 19 uncached prompt tokens: every prompt is split, whatever else runs. The
    # prompt repeats, so prefix caching would skip most chunks (tests/test_prefix_caching.py).
    engine = LLMEngine.load(ckpts["llm"], ssms=[ckpts["near"]], tree="2,2", max_num_seqs=64, max_num_batched_tokens=18,
                            enable_prefix_caching=False)
    log = ForwardLog(engine)
    trials = 1200  # about one prompt is chunked per step: fewer trials than test_mss, still a fixed-level test
    counts = Counter(sample(engine, LONG_PROMPT, trials, temperature=1.0))
    chunked = {rid for fwd in log.forwards for rid, _, logit_rows in fwd if logit_rows == 0}
    assert len(chunked) == trials  # every request's prompt was split
    p_value = g_test(counts, exact_distribution(ckpts["hf"], LONG_PROMPT, NEW_TOKENS, 1.0))
    print(f"G-test p={p_value:.3g}")
    assert p_value > 1e-3


def test_seeded_sampling_is_the_same_with_and_without_chunks(ckpts):  # noqa: F811 - the fixture
    whole = LLMEngine.load(ckpts["llm"], ssms=[ckpts["near"]], tree="2,2", max_num_seqs=512, max_num_batched_tokens=None)
    chunked = LLMEngine.load(ckpts["llm"], ssms=[ckpts["near"]], tree="2,2", max_num_seqs=512, max_num_batched_tokens=8)
    kwargs = dict(temperature=0.8, top_k=5)
    a, b = sample(whole, LONG_PROMPT, 200, **kwargs), sample(chunked, LONG_PROMPT, 200, **kwargs)
    assert a == b and len(set(a)) > 20


def test_async_stream_with_chunked_prompt_matches_generate(models):
    llm, near, _ = models
    prompts = mixed_prompts()[:3]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = LLMEngine.load(llm, ssms=[near], tree="1,2,1").generate(prompts, params)
    served = AsyncLLMEngine(LLMEngine.load(llm, ssms=[near], tree="1,2,1", max_num_batched_tokens=16))

    async def collect(prompt):
        return [d async for d in served.generate(prompt, params)]

    async def main():
        return await asyncio.gather(*(collect(p) for p in prompts))

    try:
        for deltas, want in zip(asyncio.run(main()), expected):
            assert all(d.token_ids for d in deltas)  # no empty deltas for chunk-only steps
            assert [t for d in deltas for t in d.token_ids] == want.token_ids
    finally:
        served.shutdown()


@pytest.mark.slow
def test_short_request_ttft_while_an_8k_prompt_is_prefilled():
    """Head-of-line blocking, on the default SmolLM2 (context 8192) with the default step budget:
    4-token requests sent while an 8000-token prompt is being prefilled in chunks. Without chunks
    each would wait for the whole prefill. What is checked is the order, not a time: each short
    request gets its first token while the long prompt is still being prefilled. The times are
    printed; `python -m specinfer_dist.bench.chunked_prefill` compares chunk sizes."""
    engine = LLMEngine.load("default", ssms=["none"], mode="incremental")
    chunk = engine.max_num_batched_tokens
    assert chunk == default_max_batched_tokens(engine.verifier.runner.device)
    served = AsyncLLMEngine(engine)
    prompt = long_prompt(8000)
    try:
        (early, seen_early), (late, seen_late) = head_of_line(served, prompt, [1000, 6000])
    finally:
        served.shutdown()
    assert None not in (early, late), "the long prompt was prefilled before the short requests were sent"
    assert max(seen_early, seen_late) < len(prompt) - 1, "a short request waited for the whole long prefill"
    assert not engine.has_unfinished()  # the long request was aborted
    print(f"TTFT of a 4-token request with an 8000-token prompt in flight (chunk {chunk} tokens): "
          f"{early:.2f} s at 1000 tokens cached, {late:.2f} s at 6000")
