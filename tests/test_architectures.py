"""Every supported family beyond Llama/Qwen2/Mistral, against Hugging Face on tiny random models:
Qwen3 (q/k norms, sliding layers), Gemma 3 text (scaled embeddings, (1 + w) norms, sandwich
norms, GELU-tanh, alternating sliding/global layers with their own RoPE bases, query_pre_attn_scalar,
final soft-capping), Gemma 2 (the same without q/k norms, with attention soft-capping), Phi-3/4 (fused projections, LongRoPE, partial rotary, sliding window) and
Llama 3.x RoPE scaling. Logits in fp32, greedy engine output == generate() (incremental, chain,
tree, prompt lookup, cross-family drafters, mixed-length batches), TP=2 over gloo, bf16 smoke
runs, and the refusals. Prompts plus outputs cross every sliding window (8-16 tokens).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from exactness import assert_greedy_equal, hf_greedy
from helpers import make_tiny_checkpoint
from test_engine_exact import noisy_copy
from test_model import prefill
from tp_helpers import assert_shards_match

from specinfer_dist import LLMEngine, ModelLoadError, SamplingParams
from specinfer_dist.models.loader import load_model
from specinfer_dist.runtime.model_runner import ModelRunner, RunItem
from specinfer_dist.tree import TokenTree

MAX_NEW = 20
LONGROPE_ORIGINAL = 64  # the tests' sequences stay below it: short factors, exactly as HF (see RotaryEmbedding)
ARCHS = {
    "qwen3": ("qwen3", dict(head_dim=16, use_sliding_window=True, sliding_window=12, max_window_layers=1)),
    "gemma3": (
        "gemma3_text",
        dict(
            head_dim=16, sliding_window=8, sliding_window_pattern=2, query_pre_attn_scalar=24,
            rope_theta=10000.0, rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
            final_logit_softcapping=0.5, tie_word_embeddings=True,
        ),
    ),
    "gemma2": (
        "gemma2",
        dict(head_dim=16, sliding_window=10, attn_logit_softcapping=1.0, final_logit_softcapping=0.5),
    ),
    "phi3": (
        "phi3",
        dict(
            partial_rotary_factor=0.75, sliding_window=16, original_max_position_embeddings=LONGROPE_ORIGINAL,
            rope_scaling={
                "rope_type": "longrope",
                "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                "long_factor": [1.5, 2.0, 3.0, 5.0, 8.0, 13.0],
            },
        ),
    ),
    "llama3": (
        "llama",
        dict(rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }),
    ),
}


def load_hf(model_dir, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (LLM dir, a noisy copy as a same-family SSM); plus a Llama SSM for cross-family drafting."""
    tmp = tmp_path_factory.mktemp("archs")
    out = {}
    for name, (arch, overrides) in ARCHS.items():
        llm = make_tiny_checkpoint(tmp, arch, seed=1, num_hidden_layers=3, **overrides)
        out[name] = llm, noisy_copy(llm, tmp / f"{name}-near", noise=0.3)
    out["llama-ssm"] = make_tiny_checkpoint(tmp, "llama", seed=2, num_hidden_layers=1)
    return out


def prompts(n: int = 5, seed: int = 0) -> list[list[int]]:
    """Mixed lengths (3-43) whose outputs cross the sliding windows; every other one repeats
    itself, so prompt lookup finds something."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, m in enumerate(torch.randint(3, 30, (n,), generator=gen).tolist()):
        p = torch.randint(4, 260, (m,), generator=gen).tolist()
        out.append(p + p[: m // 2] if i % 2 else p)
    return out


@pytest.mark.parametrize("name", ARCHS)
def test_logits_match_transformers(checkpoints, name):
    """A 40-token prompt (past every window) and then a token tree in one pass, vs HF per branch."""
    llm, _ = checkpoints[name]
    hf = load_hf(llm)
    model, _, _ = load_model(str(llm), progress=False)
    prompt = torch.randint(4, 260, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    runner = ModelRunner(model)
    cache = runner.new_cache()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt[:-1]])).logits[0]
    torch.testing.assert_close(prefill(runner, cache, prompt[:-1]), ref, atol=1e-5, rtol=1e-5)
    tree = TokenTree.from_root(prompt[-1])
    a, b = tree.add(0, 5), tree.add(0, 6)
    tree.add(tree.add(a, 7), 8)
    tree.add(b, 9)
    tree = tree.dfs()
    logits = runner.forward([RunItem(cache, tree.tokens, tree.parents, list(range(len(tree))))])[0]
    for node in range(len(tree)):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt + tree.path(node)])).logits[0, -1]
        torch.testing.assert_close(logits[node], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ARCHS)
def test_greedy_engine_equals_generate(checkpoints, name):
    """Incremental, chain and tree decoding (same-family and Llama SSMs merged with prompt lookup),
    and prompt lookup alone, on one batch of mixed lengths: each output == HF generate()."""
    llm, near = checkpoints[name]
    hf = load_hf(llm)
    batch = prompts()
    refs = [hf_greedy(hf, p, MAX_NEW) for p in batch]
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW)
    runs = {
        "incremental": dict(mode="incremental"),
        "chain": dict(ssms=[str(near)], mode="sequence", tree="1,1,1,1"),
        "tree": dict(ssms=[str(near), str(checkpoints["llama-ssm"])], drafters=["ngram"], tree="1,2,1,1"),
        "prompt lookup": dict(ssms=[], drafters=["ngram"], tree="1,1,1,1"),
    }
    for run, kwargs in runs.items():
        outs = LLMEngine.load(str(llm), max_num_seqs=3, **kwargs).generate(batch, params)  # requests join mid-way
        for prompt, out, ref in zip(batch, outs, refs):
            assert_greedy_equal(hf, prompt, out.token_ids, ref)
        drafted = sum(o.stats.drafted_tokens for o in outs)
        assert (drafted == 0) if run == "incremental" else (drafted > 0), run
        if run == "chain":  # the noisy copy must get drafts accepted, or nothing was verified
            assert sum(o.stats.accepted_tokens for o in outs) > 0


@pytest.mark.parametrize("name", ARCHS)
def test_bfloat16_smoke(checkpoints, name):
    """bf16 logits close to HF's bf16 ones, and a bf16 engine run with drafting gives sane output."""
    llm, near = checkpoints[name]
    hf = load_hf(llm, torch.bfloat16)
    model, _, _ = load_model(str(llm), dtype="bfloat16", progress=False)
    ids = torch.randint(4, 260, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    runner = ModelRunner(model)
    got = prefill(runner, runner.new_cache(), ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    assert runner.dtype == torch.bfloat16 and got.isfinite().all()
    assert all(rope.inv_freq.dtype == torch.float32 for rope in model.model.rotary_emb.values())
    torch.testing.assert_close(got, ref, atol=3e-2, rtol=3e-2)
    engine = LLMEngine.load(str(llm), ssms=[str(near)], tree="1,2,1", dtype="bfloat16")
    outs = engine.generate(prompts(2, seed=4), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert all(len(o.token_ids) == 12 and all(0 <= t < 260 for t in o.token_ids) for o in outs)


def test_tensor_parallel_shards_match_unsharded_models(checkpoints, tmp_path):
    """TP=2 over gloo, every family in one group of processes: fused qkv/gate_up sliced part by
    part, q/k norms replicated, soft-capping, per-layer RoPE, LongRoPE with a partial rotary."""
    assert_shards_match([checkpoints[name][0] for name in ARCHS], tmp_path)


def test_longrope_switches_to_long_factors_per_position(checkpoints):
    """Below original_max_position_embeddings our rotation is HF's short one; from there on, HF's
    long one (HF switches the whole sequence at once and re-encodes it; we never re-encode)."""
    llm, _ = checkpoints["phi3"]
    hf_rope = load_hf(llm).model.rotary_emb
    ours = load_model(str(llm), progress=False)[0].model.rotary_emb["all"]
    positions = torch.arange(LONGROPE_ORIGINAL + 16)
    x = torch.zeros(1, 1, dtype=torch.float32)
    short = hf_rope(x, positions[None, :LONGROPE_ORIGINAL])
    long = hf_rope(x, positions[None])
    cos, sin = ours(positions, torch.float32)
    half = sin.shape[-1] // 2
    sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)  # ours carries rotate_half's negation
    for got, s, lg in ((cos, short[0][0], long[0][0]), (sin, short[1][0], long[1][0])):
        torch.testing.assert_close(got[:LONGROPE_ORIGINAL], s, atol=0, rtol=0)
        torch.testing.assert_close(got[LONGROPE_ORIGINAL:], lg[LONGROPE_ORIGINAL:], atol=0, rtol=0)
    assert not torch.allclose(short[0][0], long[0][0][:LONGROPE_ORIGINAL])  # the two sets differ


def _write_config(path, config: transformers.PretrainedConfig):
    path.mkdir()
    config.to_json_file(path / "config.json")
    return str(path)


def test_unsupported_configurations_are_refused_by_name(tmp_path):
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cases = {
        "qwen3_moe": (transformers.Qwen3MoeConfig(**small, num_experts=4), r"qwen3_moe is a mixture-of-experts model \(num_experts=4\)"),
        "mixtral": (transformers.MixtralConfig(**small), r"mixtral is a mixture-of-experts model \(num_experts=8\)"),
        "llama-experts": (transformers.LlamaConfig(**small, num_experts=2), r"llama is a mixture-of-experts model \(num_experts=2\)"),
        "llama-dynamic-rope": (
            transformers.LlamaConfig(**small, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
            r"rope_type 'dynamic' is not supported",
        ),
        "gemma3-vision": (
            transformers.Gemma3Config(text_config=dict(small, head_dim=16)),
            r"vision tower.*load its text model \(Gemma3ForCausalLM, model_type gemma3_text\)",
        ),
        "embedding-gemma": (
            transformers.Gemma3TextConfig(**small, use_bidirectional_attention=True), r"bidirectional attention"
        ),
        "gpt2": (
            transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64),
            (
                r"unsupported model type 'gpt2'; supported: llama \(LlamaForCausalLM\), .*qwen3 \(Qwen3ForCausalLM\), "
                r"gemma2 \(Gemma2ForCausalLM\), gemma3_text \(Gemma3ForCausalLM\), phi3 \(Phi3ForCausalLM\)"
            ),
        ),
    }
    for name, (config, message) in cases.items():
        with pytest.raises(ModelLoadError, match=f"could not load model from .*{name}: .*{message}"):
            load_model(_write_config(tmp_path / name, config), progress=False)


def test_drafters_of_another_family_must_share_the_vocabulary(checkpoints, tmp_path):
    """A Llama SSM drafts for Gemma 3 when the tokenizers agree (test above); with a different
    vocabulary it is refused by name."""
    llm, _ = checkpoints["gemma3"]
    other = make_tiny_checkpoint(tmp_path, "qwen3", head_dim=16, extra_tokens=["hello"])
    with pytest.raises(ModelLoadError, match=f"SSM {other} does not share the LLM's vocabulary: vocab_size 261 vs LLM's 260"):
        LLMEngine.load(str(llm), ssms=[str(other)], tree="1,1")
    same_size = make_tiny_checkpoint(tmp_path, "phi3", word_vocab=260)
    with pytest.raises(ModelLoadError, match="does not share the LLM's vocabulary: 256 tokens differ"):
        LLMEngine.load(str(llm), ssms=[str(same_size)], tree="1,1")
