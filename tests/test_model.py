"""Our Llama-family model against Hugging Face's, on prompts and on whole token trees in one pass."""

import pytest
import torch
import transformers

from specinfer_dist.models.transformer import Transformer
from specinfer_dist.runtime.block_pool import KVCapacity
from specinfer_dist.runtime.model_runner import ModelRunner, RunItem, chain_parents
from specinfer_dist.tree import TokenTree

VOCAB = 300
ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
}


def pair(arch: str, dtype=torch.float32, **overrides):
    config_cls, model_cls = ARCHS[arch]
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    hf = model_cls(config_cls(**kwargs)).eval().to(dtype)
    ours = Transformer(hf.config)
    ours.load_state_dict(hf.state_dict())
    return hf, ours.eval().to(dtype)


def prefill(runner: ModelRunner, cache, ids: list[int]) -> torch.Tensor:
    logits = runner.forward([RunItem(cache, ids, chain_parents(len(ids)), list(range(len(ids))))])[0]
    cache.commit(range(len(ids)))
    return logits


CASES = [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": False, "attention_bias": True, "mlp_bias": True}),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}}),
    ("llama", {"num_key_value_heads": 4, "head_dim": 32}),
    ("qwen2", {}),
    ("mistral", {}),
    ("mistral", {"sliding_window": 6}),
]


@pytest.mark.parametrize("arch,overrides", CASES)
def test_prompt_logits_match_transformers(arch, overrides):
    hf, ours = pair(arch, **overrides)
    ids = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    runner = ModelRunner(ours)
    got = prefill(runner, runner.new_cache(), ids.tolist())
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,overrides", CASES)
def test_tree_in_one_pass_matches_each_branch_alone(arch, overrides):
    hf, ours = pair(arch, **overrides)
    prompt = torch.randint(0, VOCAB, (9,), generator=torch.Generator().manual_seed(2)).tolist()
    tree = TokenTree.from_root(prompt[-1])
    a, b = tree.add(0, 5), tree.add(0, 6)
    c = tree.add(a, 7)
    tree.add(c, 8)
    tree.add(b, 9)
    tree = tree.dfs()
    runner = ModelRunner(ours)
    cache = runner.new_cache()
    prefill(runner, cache, prompt[:-1])
    logits = runner.forward([RunItem(cache, tree.tokens, tree.parents, list(range(len(tree))))])[0]
    for node in range(len(tree)):
        seq = prompt + tree.path(node)
        with torch.no_grad():
            ref = hf(torch.tensor([seq])).logits[0, -1]
        torch.testing.assert_close(logits[node], ref, atol=1e-5, rtol=1e-5)


def test_bfloat16_close_to_transformers_bfloat16():
    hf, ours = pair("llama", dtype=torch.bfloat16)
    ids = torch.randint(0, VOCAB, (16,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0].float()
    runner = ModelRunner(ours)
    got = prefill(runner, runner.new_cache(), ids.tolist())
    assert runner.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref, atol=3e-2, rtol=3e-2)


def test_two_requests_in_one_forward_equal_each_alone():
    _, ours = pair("qwen2")
    runner = ModelRunner(ours)
    a, b = list(range(10, 30)), list(range(50, 57))
    alone = [prefill(runner, runner.new_cache(), ids) for ids in (a, b)]
    items = [RunItem(runner.new_cache(), ids, chain_parents(len(ids)), list(range(len(ids)))) for ids in (a, b)]
    together = runner.forward(items)
    for x, y in zip(alone, together):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("mistral", {"sliding_window": 6})])
def test_prompts_trees_and_single_tokens_in_one_forward_equal_each_alone(arch, overrides):
    """One batched attention call per layer: a prompt, a tree after a cached prefix (with part of
    the prefix uncached, as after a preemption) and a single token give the logits they give alone."""
    _, ours = pair(arch, **overrides)
    runner = ModelRunner(ours, KVCapacity(64, 4))  # small blocks: tables of different lengths
    gen = torch.Generator().manual_seed(4)
    prompt, prefix, single_prefix = (torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (13, 11, 5))
    tree = TokenTree.from_root(prefix[-1])
    a, b = tree.add(0, 5), tree.add(0, 6)
    tree.add(a, 7)
    tree.add(b, 9)
    tree = tree.dfs()
    chain = [3, 4]  # committed but uncached, then the tree below them
    tree_tokens = chain + tree.tokens
    tree_parents = chain_parents(2) + [p + 2 if p >= 0 else 1 for p in tree.parents]

    def items():
        caches = [runner.new_cache() for _ in range(3)]
        prefill(runner, caches[1], prefix[:-1])
        prefill(runner, caches[2], single_prefix)
        return [
            RunItem(caches[0], prompt, chain_parents(len(prompt)), [0, 6, 12]),
            RunItem(caches[1], tree_tokens, tree_parents, list(range(len(tree_tokens)))),
            RunItem(caches[2], [42], [-1], [0]),
        ]

    batch = items()
    together = runner.forward(batch)
    for item in batch:
        item.cache.free()
    alone = [runner.forward([item])[0] for item in items()]
    for x, y in zip(together, alone):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    assert runner.pool.num_used > 0


def test_rotary_frequencies_stay_fp32_in_a_bfloat16_model():
    """model.to(bfloat16) must not round RoPE frequencies (HF keeps them fp32): the rotation
    angles of a bf16 model equal the fp32 model's at every position up to 8k, and its bf16
    cos/sin are those angles' values rounded once."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
    )
    ref = Transformer(config).model.rotary_emb["all"]
    bf16 = Transformer(config).to(torch.bfloat16).model.rotary_emb["all"]
    assert bf16.inv_freq.dtype == torch.float32
    positions = torch.arange(8192)
    cos32, sin32 = ref(positions, torch.float32)
    cos, sin = bf16(positions, torch.float32)
    error = torch.remainder(torch.atan2(sin, cos) - torch.atan2(sin32, cos32) + torch.pi, 2 * torch.pi) - torch.pi
    assert error.abs().max() < 1e-6
    cos16, sin16 = bf16(positions, torch.bfloat16)
    assert (cos16.float() - cos32).abs().max() <= 2**-8 and (sin16.float() - sin32).abs().max() <= 2**-8
    moved = Transformer(config).to(torch.bfloat16).to("meta").model.rotary_emb["all"].inv_freq
    assert moved.device.type == "meta" and moved.dtype == torch.float32  # device moves still apply


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases fused too
def test_fused_projections_keep_names_and_fall_back_when_replaced(arch):
    """A runner fuses q/k/v and gate/up into one matmul each by making the parameters row views
    of one matrix: HF's names and state_dict stay, a loaded state_dict still reaches the fused
    matrix, and a move that replaces the parameters falls back to the separate linears."""
    hf, ours = pair(arch)
    names = list(ours.state_dict())
    runner = ModelRunner(ours)
    attn, mlp = ours.model.layers[0].self_attn, ours.model.layers[0].mlp
    assert attn.qkv.intact() and mlp.gate_up.intact() and list(ours.state_dict()) == names
    ids = torch.randint(VOCAB, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(prefill(runner, runner.new_cache(), ids), want, rtol=1e-5, atol=1e-5)
    ours.load_state_dict({k: torch.zeros_like(v) if "k_proj" in k else v for k, v in hf.state_dict().items()})
    assert attn.qkv.intact() and not attn.qkv.weight[attn.head_dim * attn.num_heads :][: 16].any()
    ours.load_state_dict(hf.state_dict())
    ours.double().float()  # new parameter tensors: the views are gone
    assert not attn.qkv.intact() and not mlp.gate_up.intact()
    torch.testing.assert_close(prefill(runner, runner.new_cache(), ids), want, rtol=1e-5, atol=1e-5)


def test_fast_paths_equal_the_reference_formulas():
    """The op-saving forms (issue 21) compute the reference's formulas, to float rounding only:
    RMSNorm on the CPU from the vector norm, RoPE's addcmul, the residual inside the matmul."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from specinfer_dist.models.layers import OffsetRMSNorm, RMSNorm, apply_rope
    from specinfer_dist.models.linear import linear

    gen = torch.Generator().manual_seed(5)
    for rows in (1, 5, 40):
        x = torch.randn(rows, 3, 64, generator=gen) * 3
        x[0, 0] = 0  # a zero row: eps alone
        norm = RMSNorm(64, 1e-5)
        norm.weight.data = torch.randn(64, generator=gen)
        ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
        torch.testing.assert_close(norm(x), norm.weight * ref, rtol=1e-6, atol=0)
        torch.testing.assert_close(norm.normalize(x.bfloat16()), x.bfloat16().float() * torch.rsqrt(
            x.bfloat16().float().pow(2).mean(-1, keepdim=True) + 1e-5), rtol=1e-6, atol=0)
        offset = OffsetRMSNorm(64, 1e-5)
        offset.weight.data = norm.weight.data
        torch.testing.assert_close(offset(x), ref * (1 + norm.weight), rtol=1e-6, atol=0)

        for dim in (64, 48):  # 48: a partial rotary factor, the last 16 features kept
            angles = (torch.arange(rows) * 7.0)[:, None] / 100.0 ** (torch.arange(0, dim, 2) / dim)
            cos, sin = angles.cos().repeat(1, 2), angles.sin()
            # HF's formula on HF's tables; ours has rotate_half's negation folded into sin.
            want, _ = apply_rotary_pos_emb(x[..., :dim], x[..., :dim], cos, sin.repeat(1, 2))  # [tokens, 1, dim]
            got = apply_rope(x, cos, torch.cat((-sin, sin), -1))
            torch.testing.assert_close(got, torch.cat((want, x[..., dim:]), -1), rtol=0, atol=1e-6)

        weight, bias, residual = (torch.randn(*s, generator=gen) for s in ((32, 64), (32,), (rows, 3, 32)))
        for b in (None, bias):
            torch.testing.assert_close(linear(x, weight, b, residual), residual + linear(x, weight, b),
                                       rtol=1e-6, atol=1e-6)


def test_cpu_rms_norm_gradient_equals_the_reference():
    """Heads train through the CPU path: its gradient is the reference's, at a zero row too."""
    from specinfer_dist.models.layers import RMSNorm

    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(6), requires_grad=True)
    norm = RMSNorm(64, 1e-5)
    with torch.no_grad():
        x[1] = 0
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    (grad,) = torch.autograd.grad((norm(x) * torch.arange(64)).sum(), x)
    (want,) = torch.autograd.grad((ref * torch.arange(64)).sum(), x)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6)
