"""Greedy tree/sequence speculation == Hugging Face greedy generate(), on tiny random models."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from exactness import assert_greedy_equal, hf_greedy
from helpers import make_tiny_checkpoint
from safetensors.torch import load_file, save_file

from specinfer_dist import LLMEngine, SamplingParams
from specinfer_dist.runtime.model_runner import RunItem

MAX_NEW = 24
SPECINFER_TREE = "1,1,3,1,1,1,1,1"


def noisy_copy(src, dst, noise: float, seed: int = 0):
    """An SSM that agrees with the LLM often but not always: the LLM's weights plus noise."""
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    state = {k: v + noise * v.std() * torch.randn(v.shape, generator=gen) for k, v in state.items()}
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def models(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    llm = make_tiny_checkpoint(tmp, request.param, seed=1, num_hidden_layers=3)
    near = noisy_copy(llm, tmp / "ssm-near", noise=0.3)
    far = make_tiny_checkpoint(tmp, request.param, seed=2, num_hidden_layers=1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32).eval()
    return llm, near, far, hf


def prompts(n: int = 6, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 40, (n,), generator=gen).tolist()
    return [torch.randint(4, 260, (m,), generator=gen).tolist() for m in lengths]


@pytest.mark.parametrize(
    "mode,tree,which",
    [
        ("tree", "1,1,3,1,1,1,1,1", "near"),
        ("tree", "2,2,1,1", "far"),
        ("sequence", "1,1,1,1,1,1", "near"),
        ("incremental", None, None),
    ],
)
def test_greedy_equals_transformers(models, mode, tree, which):
    llm, near, far, hf = models
    ssms = {"near": [near], "far": [far], None: []}[which]
    engine = LLMEngine.load(str(llm), ssms=[str(s) for s in ssms], tree=tree or "auto", mode=mode)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW)
    batch = prompts()
    outs = engine.generate(batch, params)
    for prompt, out in zip(batch, outs):
        assert_greedy_equal(hf, prompt, out.token_ids, hf_greedy(hf, prompt, MAX_NEW))
        assert out.stats.steps >= 1
        assert out.stats.generated_tokens == len(out.token_ids)
    total = sum(o.stats.accepted_tokens for o in outs)
    if which == "near":  # the noisy copy must actually get drafts accepted, or nothing was tested
        assert total > 0 and max(o.stats.tokens_per_step for o in outs) > 1.5
    if mode == "incremental":
        assert total == 0 and all(o.stats.tokens_per_step == 1.0 for o in outs)


def test_two_ssms_merged_tree_is_exact(models):
    llm, near, far, hf = models
    engine = LLMEngine.load(str(llm), ssms=[str(near), str(far)], tree="1,2,1,1")
    batch = prompts(4, seed=5)
    for prompt, out in zip(batch, engine.generate(batch, SamplingParams(temperature=0, max_tokens=MAX_NEW))):
        assert_greedy_equal(hf, prompt, out.token_ids, hf_greedy(hf, prompt, MAX_NEW))


def test_ngram_drafter_alone_and_merged_is_exact(models):
    llm, near, _, hf = models
    # Prompts that repeat themselves, so prompt lookup has something to find.
    batch = [p + p[: len(p) // 2] for p in prompts(4, seed=13)]
    for ssms, drafters in (([], ["ngram"]), ([str(near)], ["ngram:2,1,1,1"])):
        engine = LLMEngine.load(str(llm), ssms=ssms, drafters=drafters, tree="1,1,1,1")
        outs = engine.generate(batch, SamplingParams(temperature=0, max_tokens=MAX_NEW))
        for prompt, out in zip(batch, outs):
            assert_greedy_equal(hf, prompt, out.token_ids, hf_greedy(hf, prompt, MAX_NEW))
        assert sum(o.stats.drafted_tokens for o in outs) > 0


def test_batch_of_mixed_lengths_equals_each_alone(models):
    llm, near, _, _ = models
    engine = LLMEngine.load(str(llm), ssms=[str(near)], tree=SPECINFER_TREE, max_num_seqs=4)  # 7 prompts: requests join mid-way
    batch = prompts(7, seed=3)
    params = [SamplingParams(temperature=0, max_tokens=m) for m in (5, 30, 12, 1, 20, 9, 16)]
    together = engine.generate(batch, params)
    for prompt, sp, out in zip(batch, params, together):
        [alone] = engine.generate(prompt, sp)
        assert out.token_ids == alone.token_ids


def test_speculation_pauses_while_the_batch_is_big(models):
    llm, near, _, _ = models
    engine = LLMEngine.load(str(llm), ssms=[str(near)], tree="1,1,1", speculation_max_batch=2)
    batch = prompts(3, seed=5)
    # Two requests end after 4 tokens; the third then runs alone, and drafting resumes.
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (4, 4, 30)]
    steps_in_threes = []
    seqs = [engine.add_request(p, sp) for p, sp in zip(batch, params)]
    while engine.scheduler.has_unfinished():
        if len(engine.scheduler.running) + len(engine.scheduler.waiting) == 3:
            steps_in_threes.append(sum(s.stats.drafted_tokens for s in seqs))
        engine.step()
    assert steps_in_threes and steps_in_threes[-1] == 0  # nothing drafted while three ran
    assert seqs[0].stats.drafted_tokens == 0 and seqs[2].stats.drafted_tokens > 0
    plain = LLMEngine.load(str(llm), mode="incremental")
    for prompt, sp, seq in zip(batch, params, seqs):
        assert seq.output_ids == plain.generate(prompt, sp)[0].token_ids


def test_kv_cache_after_speculative_steps_equals_incremental(models):
    llm, near, _, _ = models
    engine = LLMEngine.load(str(llm), ssms=[str(near)], tree="1,1,3,1,1")
    seq = engine.add_request(prompts(1, seed=7)[0], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert seq.stats.accepted_tokens > 0 and not seq.finished
    spec_cache = engine.verifier.caches[seq.request_id].committed()
    assert spec_cache.shape[2] == len(seq.tokens) - 1  # everything but the newest token
    runner = engine.verifier.runner
    cache = runner.new_cache()
    for token in seq.tokens[:-1]:  # plain incremental decoding, one token per forward
        runner.forward([RunItem(cache, [token], [-1], [0])])
        cache.commit([0])
    torch.testing.assert_close(spec_cache, cache.committed(), atol=1e-5, rtol=1e-5)


def test_max_tokens_is_exact(models):
    llm, near, _, hf = models
    engine = LLMEngine.load(str(llm), ssms=[str(near)], tree=SPECINFER_TREE)
    prompt = prompts(1, seed=9)[0]
    ref = hf_greedy(hf, prompt, 10)
    assert len(ref) == 10  # the reference did not stop at EOS
    for m in (1, 2, 3, 7, 10):
        [out] = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=m, ignore_eos=True))
        assert len(out.token_ids) == m and out.finish_reason == "length"
        assert_greedy_equal(hf, prompt, out.token_ids, ref[:m])
        stats = out.stats  # drafted tokens past max_tokens are not counted as accepted
        assert stats.steps - 1 <= m - stats.accepted_tokens <= stats.steps
        assert sum(stats.accepted_at_depth) == stats.accepted_tokens


def test_eos_and_stop_strings_end_requests(models, tmp_path):
    llm, near, _, hf = models
    prompt = prompts(1, seed=11)[0]
    ref = hf_greedy(hf, prompt, MAX_NEW)
    # Make a generated token that did not occur before it this model's EOS (in a copy of the
    # checkpoint), at a position inside an accepted path: the LLM drafts for itself below with a
    # chain of depth 8, so every draft is accepted and each step emits 9 tokens, the 9th its own.
    cut = max(j for j in range(1, 18) if ref[j] not in ref[:j] and j % 9 != 8)  # 18: full-depth steps
    eos = ref[cut]

    eos_llm = tmp_path / "eos-llm"
    shutil.copytree(llm, eos_llm)
    for name in ("config.json", "generation_config.json"):
        data = json.loads((eos_llm / name).read_text())
        data["eos_token_id"] = eos
        (eos_llm / name).write_text(json.dumps(data))
    engine = LLMEngine.load(str(eos_llm), ssms=[str(eos_llm)], tree="1,1,1,1,1,1,1,1")
    [out] = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=MAX_NEW))
    assert out.finish_reason == "stop" and out.token_ids == ref[: cut + 1]
    # Every step emitted its whole accepted path but the last, which EOS cut short: the drafted
    # tokens after EOS were accepted by the LLM but never emitted, so they do not count.
    stats = out.stats
    assert stats.accepted_tokens == cut + 1 - (stats.steps - 1) and cut % 9 != 8
    assert sum(stats.accepted_at_depth) == stats.accepted_tokens

    engine = LLMEngine.load(str(llm), ssms=[str(near)], tree=SPECINFER_TREE)
    full = engine.tokenizer.decode(ref, skip_special_tokens=True)
    stop = next(ch for ch in full[len(full) // 3 :] if ch.isascii() and ch.isprintable())
    [out] = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=MAX_NEW, stop=[stop]))
    assert out.finish_reason == "stop"
    assert out.text == full[: full.index(stop)]
    assert ref[: len(out.token_ids)] == out.token_ids
