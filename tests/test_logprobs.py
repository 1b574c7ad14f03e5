"""Per-token logprobs: the LLM's raw log-softmax at each emitted token, taken from the
verification logits; speculation (and chunked prefill) must not change them."""

from __future__ import annotations

import asyncio

import pytest
import torch
from test_chunked_prefill import models  # noqa: F401, F811 - the same tiny LLM + noisy SSM + HF fixture

from specinfer_dist import InvalidRequestError, LLMEngine, SamplingParams
from specinfer_dist.engine.async_engine import AsyncLLMEngine

PROMPTS = [[5, 17, 99, 200, 31], [44, 45, 46], list(range(60, 100))]
K = 5


def hf_logprobs(hf, prompt: list[int], output: list[int]) -> torch.Tensor:
    """log-softmax of the LLM's raw logits at each output position, [len(output), vocab]."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + output])).logits[0, len(prompt) - 1 : -1]
    return logits.double().log_softmax(dim=-1)


def check_against_hf(hf, prompt, out, k=K):
    ref = hf_logprobs(hf, prompt, out.token_ids)
    assert len(out.logprobs) == len(out.token_ids)
    for i, (token, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert lp.logprob == pytest.approx(ref[i, token].item(), abs=1e-4)
        values, ids = ref[i].topk(k)
        assert len(lp.top) == k
        assert lp.token_id == token
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-4)  # most likely first
        assert {t for t, _ in lp.top} == set(ids.tolist()) or (values[-1] - values[-2]).abs() < 1e-4  # a tie at the cut


def test_speculation_does_not_change_logprobs(models):
    llm, near, hf = models
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=K)
    incremental = LLMEngine.load(llm, ssms=["none"], mode="incremental").generate(PROMPTS, params)
    tree = LLMEngine.load(llm, ssms=[near], tree="1,2,1", max_num_batched_tokens=16).generate(PROMPTS, params)
    assert sum(o.stats.accepted_tokens for o in tree) > 0  # drafted tokens were accepted
    for prompt, a, b in zip(PROMPTS, incremental, tree):
        assert a.token_ids == b.token_ids
        assert [lp.logprob for lp in a.logprobs] == pytest.approx([lp.logprob for lp in b.logprobs], abs=1e-5)
        check_against_hf(hf, prompt, b)


def test_sampled_requests_report_the_raw_distribution(models):
    """Temperature/top-k shape what is sampled, not what is reported (as OpenAI and vLLM)."""
    llm, near, hf = models
    params = [SamplingParams(temperature=0.7, top_k=10, max_tokens=12, ignore_eos=True, seed=s, logprobs=3)
              for s in range(len(PROMPTS))]
    outs = LLMEngine.load(llm, ssms=[near], tree="1,2,1").generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs):
        check_against_hf(hf, prompt, out, k=3)


def test_off_by_default_and_zero_gives_only_the_token(models):
    llm, _, _ = models
    engine = LLMEngine.load(llm, ssms=["none"], mode="incremental")
    [off, zero] = engine.generate(
        PROMPTS[:2], [SamplingParams(max_tokens=3, ignore_eos=True), SamplingParams(max_tokens=3, logprobs=0, ignore_eos=True)]
    )
    assert off.logprobs is None and "logprobs" not in off.to_dict()
    assert len(zero.logprobs) == 3 and all(lp.top == [] and lp.logprob <= 0 for lp in zero.logprobs)
    for bad in (-1, 21, 2.5, True):
        with pytest.raises(InvalidRequestError, match="logprobs"):
            SamplingParams(logprobs=bad)


def test_stream_deltas_carry_their_tokens_logprobs(models):
    llm, near, _ = models
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
    [want] = LLMEngine.load(llm, ssms=[near], tree="1,2,1").generate(PROMPTS[:1], params)
    served = AsyncLLMEngine(LLMEngine.load(llm, ssms=[near], tree="1,2,1"))

    async def collect():
        return [d async for d in served.generate(PROMPTS[0], params)]

    try:
        deltas = asyncio.run(collect())
    finally:
        served.shutdown()
    assert all(len(d.logprobs) == len(d.token_ids) for d in deltas)
    got = [lp for d in deltas for lp in d.logprobs]
    assert [lp.logprob for lp in got] == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-5)
