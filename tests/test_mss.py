"""Sampling keeps the LLM's distribution exactly: multi-step speculative sampling (MSS) on trees.

Tiny-vocabulary models make the LLM's exact distribution over the first generated tokens
enumerable; thousands of seeded requests are compared with it by a G-test at a fixed level.
A deliberately wrong verifier must be rejected by the same test, which shows it has power.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers
from helpers import make_tiny_checkpoint
from safetensors.torch import load_file, save_file
from scipy.stats import power_divergence

from specinfer_dist import InvalidRequestError, LLMEngine, SamplingParams
from specinfer_dist.drafters.base import DraftRequest
from specinfer_dist.drafters.ssm import SSMDrafter
from specinfer_dist.models.draft_vocab import write_draft_vocab
from specinfer_dist.tree import TokenTree, sampling_probs, verify_mss, verify_naive

VOCAB = 8
NEW_TOKENS = 3
TRIALS = 12_000
ALPHA = 1e-3
PROMPT = [4, 5, 6, 7, 5]


def g_test(counts: Counter, exact: dict[tuple, float]) -> float:
    """p-value of the observed counts under ``exact``; cells expected < 5 times are pooled."""
    total = sum(counts.values())
    assert set(counts) <= {k for k, v in exact.items() if v > 0}, "an outcome the LLM cannot produce occurred"
    obs, exp, pooled_obs, pooled_exp = [], [], 0, 0.0
    for outcome, prob in exact.items():
        if prob * total >= 5:
            obs.append(counts[outcome])
            exp.append(prob * total)
        else:
            pooled_obs += counts[outcome]
            pooled_exp += prob * total
    if pooled_exp > 0:
        obs.append(pooled_obs)
        exp.append(pooled_exp)
    return float(power_divergence(obs, exp, lambda_="log-likelihood").pvalue)


def exact_distribution(hf, prompt, n, temperature, top_k=0, top_p=1.0) -> dict[tuple, float]:
    dist = {(): 1.0}
    for _ in range(n):
        prefixes = list(dist)
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + list(p) for p in prefixes])).logits[:, -1]
        probs = sampling_probs(logits, temperature, top_k, top_p)
        dist = {p + (t,): dist[p] * probs[i, t].item() for i, p in enumerate(prefixes) for t in range(VOCAB)}
    return dist


def noisy_copy(src, dst, noise: float, seed: int):
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    state = {k: v + noise * v.std() * torch.randn(v.shape, generator=gen) for k, v in state.items()}
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return str(dst)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mss")
    # A large init range makes the random models' distributions peaked rather than near uniform.
    common = dict(word_vocab=VOCAB, initializer_range=0.3, hidden_size=32, intermediate_size=64)
    llm = make_tiny_checkpoint(tmp, "llama", seed=1, **common)
    far = make_tiny_checkpoint(tmp, "llama", seed=2, num_hidden_layers=1, **common)
    hf = transformers.AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32).eval()
    # "near" whose q covers only some tokens (a draft vocabulary): the rest come from residuals.
    subset = noisy_copy(llm, tmp / "near-subset", 0.5, 3)
    write_draft_vocab(Path(subset), torch.tensor([5, 4, 6]), {"counted": "test"})
    return {"llm": str(llm), "near": noisy_copy(llm, tmp / "near", 0.5, 3), "far": str(far), "hf": hf,
            "near-subset": subset}


def sample(engine: LLMEngine, trials: int = TRIALS, **kwargs) -> tuple[Counter, float]:
    params = [SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, seed=i, **kwargs) for i in range(trials)]
    outs = engine.generate([PROMPT] * trials, params)
    steps = sum(o.stats.steps for o in outs)
    return Counter(tuple(o.token_ids) for o in outs), trials * NEW_TOKENS / steps


CASES = [
    # (ssms, model-free drafters, tree, temperature, top_k, top_p, draft_confidence)
    (["near"], [], "2,2", 1.0, 0, 1.0, 0.0),
    (["far"], [], "1,3", 0.7, 0, 1.0, 0.0),
    (["near", "far"], ["ngram"], "2,1", 1.0, 0, 0.8, 0.0),  # merged: two SSMs plus prompt lookup
    (["near"], [], "1,2", 0.7, 5, 0.9, 0.5),  # draws only where the SSM is that sure
    (["near-subset"], [], "2,2", 1.0, 0, 1.0, 0.0),
]


@pytest.mark.parametrize("ssms,drafters,tree,temperature,top_k,top_p,confidence", CASES)
def test_tree_mss_matches_llm_distribution(ckpts, ssms, drafters, tree, temperature, top_k, top_p, confidence):
    engine = LLMEngine.load(
        ckpts["llm"], ssms=[ckpts[s] for s in ssms], drafters=drafters, tree=tree, max_num_seqs=2048,
        draft_confidence=confidence,
    )
    counts, tokens_per_step = sample(engine, temperature=temperature, top_k=top_k, top_p=top_p)
    exact = exact_distribution(ckpts["hf"], PROMPT, NEW_TOKENS, temperature, top_k, top_p)
    p_value = g_test(counts, exact)
    print(f"G-test p={p_value:.3g}, tokens/step={tokens_per_step:.3f}")
    assert p_value > ALPHA
    assert tokens_per_step > 1.0  # drafts were accepted, so MSS itself was exercised


def ssm_probs(hf_ssm, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_ssm(torch.tensor([tokens])).logits[0, -1].softmax(-1)


@pytest.mark.parametrize("temperature,c", [(0.0, 0.3), (1.0, 0.45)])
def test_draft_confidence_drafts_only_where_the_ssm_is_sure(ckpts, temperature, c):
    """Greedy: the confident tree is the full tree's nodes whose every step the SSM gives
    q >= c. Sampled: a node has draws exactly where its most probable token has q >= c (a
    choice made before drawing, so MSS stays exact: the G-test case above), all k of them."""
    depth = 3
    ssm = LLMEngine.load(ckpts["llm"], ssms=[ckpts["near"]], tree="2,2,2").drafters[0]
    hf_ssm = transformers.AutoModelForCausalLM.from_pretrained(ckpts["near"], dtype=torch.float32).eval()
    params = SamplingParams(temperature=temperature, top_k=0, top_p=1.0, seed=0)
    trees = {}
    for i, confidence in enumerate((0.0, c)):
        drafter = SSMDrafter(ssm.runner.model, ssm.spec, confidence=confidence)
        trees[confidence] = drafter.propose([DraftRequest(i, PROMPT, params)], [depth])[0]
    full, sure = trees[0.0], trees[c]
    paths = {tuple(sure.path(n)) for n in range(1, len(sure))}
    assert 1 < len(sure) < len(full)  # the SSM was sure at some nodes and not at others
    if temperature == 0:
        confident = set()
        for n in range(1, len(full)):
            path = full.path(n)
            if all(ssm_probs(hf_ssm, PROMPT + path[:i])[path[i]] >= c for i in range(len(path))):
                confident.add(tuple(path))
        assert paths == confident
    else:
        kids = sure.children()
        for n, depth_n in enumerate(sure.depths()):
            if depth_n < depth:
                confident = bool(ssm_probs(hf_ssm, PROMPT + sure.path(n)).max() >= c)
                assert len(kids[n]) == (2 if confident else 0)  # all k draws, whatever tokens they drew


class TopKButClaimsDrawn(SSMDrafter):
    """Wrong on purpose: takes the SSM's top-k tokens but records them as drawn from q."""

    def _children(self, request, logits, k):
        q = sampling_probs(logits, request.params.temperature)
        return [[(t, q[row]) for t in tokens] for row, tokens in enumerate(q.topk(k, dim=-1).indices.tolist())]


def test_negative_control_wrong_proposal_is_rejected(ckpts):
    engine = LLMEngine.load(ckpts["llm"], ssms=[ckpts["near"]], tree="2,1", max_num_seqs=2048)
    engine.drafters = [TopKButClaimsDrawn(d.runner.model, d.spec) for d in engine.drafters]
    counts, _ = sample(engine, temperature=1.0)
    exact = exact_distribution(ckpts["hf"], PROMPT, NEW_TOKENS, 1.0)
    p_value = g_test(counts, exact)
    print(f"negative control: G-test p={p_value:.3g}")
    assert p_value < ALPHA


class RecordsQWithoutTopKTopP(SSMDrafter):
    """Subtly wrong: draws children from the request's processed q, but records q before
    top-k/top-p (the same temperature), so MSS corrects against the wrong distribution."""

    def _children(self, request, logits, k):
        params = request.params
        drawn_from = sampling_probs(logits, params.temperature, params.top_k, params.top_p)
        recorded = sampling_probs(logits, params.temperature)
        draws = torch.multinomial(drawn_from, k, replacement=True, generator=self.generators[request.request_id])
        return [[(t, recorded[row]) for t in tokens] for row, tokens in enumerate(draws.tolist())]


def test_subtle_negative_control_q_without_top_k_top_p_is_rejected(ckpts):
    engine = LLMEngine.load(ckpts["llm"], ssms=[ckpts["near"]], tree="2,1", max_num_seqs=2048)
    engine.drafters = [RecordsQWithoutTopKTopP(d.runner.model, d.spec) for d in engine.drafters]
    counts, _ = sample(engine, temperature=1.0, top_k=3, top_p=0.8)
    p_value = g_test(counts, exact_distribution(ckpts["hf"], PROMPT, NEW_TOKENS, 1.0, 3, 0.8))
    print(f"subtle negative control: G-test p={p_value:.3g}")
    assert p_value < ALPHA


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (0.5, 0, 0.9), (1.0, 10, 0.75), (0.8, 1, 1.0), (2.0, 40, 0.3),
])
def test_sampling_probs_match_transformers_processors(temperature, top_k, top_p):
    """The G-tests' expected distribution comes from sampling_probs: check it against HF's own
    temperature -> top-k -> top-p warpers (the order generate() applies them)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 100, generator=gen, dtype=torch.float64) * 3
    processors = transformers.LogitsProcessorList([transformers.TemperatureLogitsWarper(temperature)])
    if top_k:
        processors.append(transformers.TopKLogitsWarper(top_k))
    if top_p < 1:
        processors.append(transformers.TopPLogitsWarper(top_p))
    want = processors(None, logits.clone()).softmax(dim=-1)
    torch.testing.assert_close(sampling_probs(logits, temperature, top_k, top_p), want, rtol=1e-9, atol=1e-12)


def test_naive_sampling_is_exact_and_mss_accepts_more(ckpts):
    results = {}
    for verify in ("mss", "naive"):
        engine = LLMEngine.load(ckpts["llm"], ssms=[ckpts["near"]], tree="2,2", verify=verify, max_num_seqs=2048)
        results[verify] = sample(engine, temperature=1.0)
    exact = exact_distribution(ckpts["hf"], PROMPT, NEW_TOKENS, 1.0)
    assert g_test(results["naive"][0], exact) > ALPHA
    print(f"tokens/step: MSS {results['mss'][1]:.3f}, naive {results['naive'][1]:.3f}")
    assert results["mss"][1] > results["naive"][1]


def test_same_seed_same_output_whatever_the_batch(ckpts):
    engine = LLMEngine.load(ckpts["llm"], ssms=[ckpts["near"]], tree="2,2")
    params = SamplingParams(max_tokens=12, temperature=0.9, seed=1234, ignore_eos=True)
    [alone] = engine.generate(PROMPT, params)
    others = [SamplingParams(max_tokens=m, temperature=1.0, seed=m) for m in (3, 20, 7)]
    batch = engine.generate([[4, 4], PROMPT, PROMPT + [6, 6, 6], [7]], [others[0], params, *others[1:]])
    assert batch[1].token_ids == alone.token_ids
    unseeded = engine.generate([PROMPT] * 8, SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True))
    assert len({tuple(o.token_ids) for o in unseeded}) > 1  # no seed: fresh randomness per request


def test_temperature_zero_is_greedy(ckpts):
    engine = LLMEngine.load(ckpts["llm"], ssms=[ckpts["near"]], tree="2,2")
    [out] = engine.generate(PROMPT, SamplingParams(max_tokens=10, temperature=0, top_p=0.5, seed=3, ignore_eos=True))
    greedy = ckpts["hf"].generate(torch.tensor([PROMPT]), max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert out.token_ids == greedy[0, len(PROMPT):].tolist()


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": -0.1}, {"temperature": float("nan")}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1},
     {"seed": 1.5}, {"seed": "7"}, {"temperature": "hot"}],
)
def test_invalid_sampling_parameters(kwargs):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**kwargs)


# ---- MSS alone, on hand-built trees with known p and q (fast, many trials) ------------------


def test_verify_mss_first_token_is_distributed_as_p():
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.05, 0.4, 0.25, 0.3, 0.0], dtype=torch.float64)
    q1 = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.2], dtype=torch.float64)
    q2 = torch.tensor([0.1, 0.1, 0.6, 0.1, 0.1], dtype=torch.float64)
    trials = 40_000
    counts = Counter()
    for _ in range(trials):
        tree = TokenTree.from_root(0)
        for q in (q1, q1, q2):  # two draws from q1, one from q2
            tree.add(0, int(torch.multinomial(q, 1, generator=gen)), q)
        tree.add(0, 3, None)  # and one deterministic proposal
        target = p.expand(len(tree), -1)
        accepted, bonus = verify_mss(tree, target, gen)
        counts[(tree.tokens[accepted[0]] if accepted else bonus,)] += 1
    exact = {(t,): p[t].item() for t in range(5)}
    assert g_test(counts, exact) > ALPHA
    # The negative control: naive sampling's acceptance is fine, but claiming a point mass was
    # drawn from q1 biases the output, and the test sees it.
    wrong = Counter()
    for _ in range(trials):
        tree = TokenTree.from_root(0)
        tree.add(0, 0, q1)  # always token 0, yet recorded as drawn from q1
        accepted, bonus = verify_mss(tree, p.expand(2, -1), gen)
        wrong[(tree.tokens[accepted[0]] if accepted else bonus,)] += 1
    assert g_test(wrong, exact) < ALPHA
    naive = Counter()
    for _ in range(trials // 4):
        tree = TokenTree.from_root(0)
        tree.add(0, 1, q1)
        accepted, bonus = verify_naive(tree, p.expand(2, -1), gen)
        naive[(tree.tokens[accepted[0]] if accepted else bonus,)] += 1
    assert g_test(naive, exact) > ALPHA
