"""One bad request cannot hurt the others: a failure in its own drafting, verification or
commit ends it alone, logged and counted, and every other request's output is token-identical
to a run without it. Also the admission limits (queue length, sequences per request)."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch
from helpers import make_tiny_checkpoint

from specinfer_dist import InvalidRequestError, LLMEngine, SamplingParams
from specinfer_dist.drafters.ssm import SSMDrafter
from specinfer_dist.engine.async_engine import AsyncLLMEngine, EngineStepError
from specinfer_dist.errors import EngineOverloadedError
from specinfer_dist.tree import TokenTree
from specinfer_dist.tree.verify import verify_tree

PROMPTS = ["hello world", "abc", "the quick brown fox", "lorem ipsum dolor"]
POISON = 7  # a token id the tiny byte tokenizer never produces from text


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("robust"), "llama", seed=1))


def good_params() -> list[SamplingParams]:
    """Greedy requests, and seeded sampled ones (their draws come from per-request streams)."""
    return [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True, seed=3),
        SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=20, max_tokens=10, ignore_eos=True, seed=4),
    ]


def slipped_through_temperature() -> SamplingParams:
    """A tiny temperature as if validation (which makes it greedy) had let it through:
    logits / 1e-310 overflow. Every sampling field is set, so the engine's defaults keep it."""
    params = SamplingParams(temperature=0.5, top_p=1.0, top_k=0, max_tokens=12, ignore_eos=True)
    params.temperature = 1e-310
    return params


def run_with_and_without(engine: LLMEngine, good: list[SamplingParams], bad_prompt, bad_params: SamplingParams):
    """Outputs of the good requests alone, and of the same requests with a bad one in the batch."""
    alone = engine.generate(PROMPTS, good)
    mixed = engine.generate([*PROMPTS[:2], bad_prompt, *PROMPTS[2:]], [*good[:2], bad_params, *good[2:]])
    return alone, mixed[:2] + mixed[3:], mixed[2]


@pytest.mark.parametrize("mode", ["incremental", "tree"])
def test_non_finite_probabilities_fail_only_that_request(llm, mode, caplog):
    engine = LLMEngine.load(llm, ssms=[llm] if mode == "tree" else ["none"], tree="1,2,1", mode=mode)
    # A drafter that failed on a batch restarts the others' draft streams (engine._propose):
    # sampled requests stay exact in distribution, greedy ones token-identical, as checked here.
    good = good_params() if mode == "incremental" else [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)
                                                        for m in (12, 7, 9, 10)]
    with caplog.at_level(logging.ERROR, logger="specinfer_dist.engine.engine"):
        alone, others, bad = run_with_and_without(engine, good, "bad request", slipped_through_temperature())
    assert [o.token_ids for o in others] == [o.token_ids for o in alone]
    assert [o.text for o in others] == [o.text for o in alone]
    assert bad.finish_reason == "error"
    # Incremental: the verifier refuses the probabilities; tree: the SSM's own draw raises first.
    stage = "verifying" if mode == "incremental" else "drafting"
    assert f"request {bad.request_id} failed while {stage}" in bad.error
    assert ("non-finite" if mode == "incremental" else "inf") in bad.error
    assert any(f"request {bad.request_id} failed" in r.getMessage() for r in caplog.records)
    assert not engine.has_unfinished() and not engine.verifier.caches  # everything released
    assert all(not d.caches for d in engine.drafters)


class PoisonedDrafter(SSMDrafter):
    """Raises for any batch holding a request whose tokens contain POISON, and for that
    request alone; the SSM itself runs as usual for the others."""

    def propose(self, requests, max_depths):
        if any(POISON in r.tokens for r in requests):
            raise RuntimeError("drafter crashed")
        return super().propose(requests, max_depths)


def test_drafter_failure_is_retried_per_request_and_fails_only_the_culprit(llm):
    engine = LLMEngine.load(llm, ssms=[llm], tree="1,2,1")
    engine.drafters = [PoisonedDrafter(d.runner.model, d.spec, d.name) for d in engine.drafters]
    greedy = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * len(PROMPTS)
    alone = engine.generate(PROMPTS, greedy)
    mixed = engine.generate([*PROMPTS[:2], [POISON, 40, 41], *PROMPTS[2:]], [*greedy, greedy[0]])
    assert [o.token_ids for o in mixed[:2] + mixed[3:]] == [o.token_ids for o in alone]
    assert all(o.stats.accepted_tokens > 0 for o in mixed[:2] + mixed[3:])  # they kept speculating
    assert mixed[2].finish_reason == "error" and "drafting: RuntimeError: drafter crashed" in mixed[2].error


class FailsToCommit(Exception):
    pass


def test_commit_failure_releases_that_request_and_the_others_continue(llm, monkeypatch):
    engine = LLMEngine.load(llm, ssms=["none"], mode="incremental")
    alone = engine.generate(PROMPTS, good_params())
    real_commit = engine.verifier.commit
    victim = {}

    def commit(request_id, keep):
        victim.setdefault("id", request_id)  # the first request to commit fails
        if request_id == victim["id"]:
            raise FailsToCommit("cache corrupted")
        real_commit(request_id, keep)

    monkeypatch.setattr(engine.verifier, "commit", commit)
    outs = engine.generate(["bad request", *PROMPTS], [SamplingParams(temperature=0, max_tokens=5), *good_params()])
    assert outs[0].finish_reason == "error" and "cache corrupted" in outs[0].error and outs[0].token_ids == []
    assert [o.token_ids for o in outs[1:]] == [o.token_ids for o in alone]
    assert not engine.verifier.caches


def test_forward_failure_ends_its_step_and_the_engine_stays_usable(llm, monkeypatch):
    engine = LLMEngine.load(llm, ssms=[llm], tree="1,2,1")
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    [want] = engine.generate(PROMPTS[:1], greedy)
    real_logits = engine.verifier.logits
    calls = {"n": 0}

    def flaky(items):
        calls["n"] += 1
        if calls["n"] == 2:  # mid-generation: the caches hold rows of this unfinished forward
            raise RuntimeError("device lost")
        return real_logits(items)

    monkeypatch.setattr(engine.verifier, "logits", flaky)
    seqs = [engine.add_request(p, greedy) for p in PROMPTS[:2]]
    engine.step()
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()
    assert all(s.finish_reason.value == "error" and "LLM forward" in s.error for s in seqs)
    assert not engine.has_unfinished() and not engine.verifier.caches
    assert engine.generate(PROMPTS[:1], greedy)[0].token_ids == want.token_ids


def test_verify_tree_refuses_non_finite_numbers():
    tree = TokenTree.from_root(1)
    logits = torch.randn(1, 16)
    with pytest.raises(FloatingPointError, match="non-finite probabilities"):
        verify_tree(tree, logits, torch.Generator(), temperature=1e-310, top_k=0, top_p=1.0)
    logits[0, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        verify_tree(tree, logits, torch.Generator(), temperature=0, top_k=0, top_p=1.0)
    logits[0, 3] = float("-inf")  # probability 0 is fine
    verify_tree(tree, logits, torch.Generator(), temperature=0.7, top_k=0, top_p=1.0)


def test_four_concurrent_streams_one_bad_through_async_engine(llm, caplog):
    sync = LLMEngine.load(llm, ssms=[llm], tree="1,2,1")
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    expected = sync.generate(PROMPTS[:3], [greedy] * 3)
    served = AsyncLLMEngine(LLMEngine.load(llm, ssms=[llm], tree="1,2,1"))

    async def stream(prompt, params):
        try:
            return [d async for d in served.generate(prompt, params)]
        except EngineStepError as err:
            return err

    async def main():
        jobs = [stream(p, greedy) for p in PROMPTS[:3]]
        jobs.insert(1, stream("bad request", slipped_through_temperature()))
        return await asyncio.gather(*jobs)

    try:
        with caplog.at_level(logging.ERROR):
            results = asyncio.run(main())
        bad = results.pop(1)
        assert isinstance(bad, EngineStepError) and "failed while drafting" in str(bad)
        for deltas, want in zip(results, expected):
            assert [t for d in deltas for t in d.token_ids] == want.token_ids
            assert deltas[-1].finish_reason == "length"
        assert served.counters.requests_failed == 1 and served.counters.requests_finished == 3
        assert any("failed while drafting" in r.getMessage() for r in caplog.records)
        # The engine keeps serving.
        deltas = asyncio.run(stream("again", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)))
        assert sum(len(d.token_ids) for d in deltas) == 4
    finally:
        served.shutdown()


def test_queue_and_per_request_limits(llm):
    engine = LLMEngine.load(llm, ssms=["none"], max_queued_seqs=2, max_seqs_per_request=3, max_num_seqs=1)
    for _ in range(2):
        engine.add(engine.new_sequence("hi", SamplingParams(max_tokens=2)))
    with pytest.raises(EngineOverloadedError, match="2 sequences are waiting"):
        engine.add(engine.new_sequence("hi", SamplingParams(max_tokens=2)))
    with pytest.raises(InvalidRequestError, match="at most 3 sequences"):
        engine.check_capacity(4, queued=0)
    while engine.has_unfinished():
        engine.step()
    # Offline generate() queues every prompt: nobody else is waiting.
    assert len(engine.generate(["a", "b", "c", "d"], SamplingParams(max_tokens=2))) == 4

    served = AsyncLLMEngine(LLMEngine.load(llm, ssms=["none"], max_queued_seqs=2, max_seqs_per_request=3))
    try:
        served.check_capacity(2)
        with pytest.raises(EngineOverloadedError):
            served.check_capacity(3)
        with pytest.raises(InvalidRequestError):
            served.check_capacity(4)
    finally:
        served.shutdown()
