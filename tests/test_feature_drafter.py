"""The feature drafter (drafters/feature.py): it reads the right hidden states, and output stays exact.

Random heads propose badly but legally, which is what exactness needs: greedy output equals
transformers' whatever is drafted (alone, merged with an SSM and prompt lookup; tree, chain),
and sampled output keeps the LLM's distribution (G-test, with test_mss.py's machinery).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from eagle3_helpers import make_eagle3_head, make_feature_models
from exactness import assert_greedy_equal, hf_greedy
from helpers import make_tiny_checkpoint
from test_mss import ALPHA, NEW_TOKENS, PROMPT, TopKButClaimsDrawn, exact_distribution, g_test, noisy_copy, sample

from specinfer_dist import LLMEngine, SamplingParams
from specinfer_dist.drafters.base import DraftRequest
from specinfer_dist.drafters.feature import FeatureDrafter

MAX_NEW = 20


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("feature")
    llm, head = make_feature_models(tmp)  # random drafts are sometimes accepted
    ssm = noisy_copy(llm, tmp / "ssm", 0.5, 3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32).eval()
    return str(llm), str(head), ssm, hf


def test_drafter_receives_the_llms_hidden_states_of_committed_tokens(models):
    llm, head, _, hf = models
    engine = LLMEngine.load(llm, ssms=[], feature_drafter=head, tree="2,1")
    [drafter] = engine.drafters
    seen = []
    observe = drafter.observe
    drafter.observe = lambda rid, start, aux: (seen.append((start, aux.clone())), observe(rid, start, aux))[-1]
    prompt = [4, 9, 7, 5, 12, 6]
    [out] = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    tokens = prompt + out.token_ids
    with torch.no_grad():
        states = hf(torch.tensor([tokens]), output_hidden_states=True).hidden_states
    want = torch.cat([states[i][0] for i in drafter.aux_layers], dim=-1)  # residual entering layer i
    got = torch.cat([aux for _, aux in seen])
    assert sum(len(a) for _, a in seen) == len(tokens) - 1  # every committed token but the newest
    assert [s for s, _ in seen] == [sum(len(a) for _, a in seen[:i]) for i in range(len(seen))]
    torch.testing.assert_close(got, want[: len(got)], atol=1e-4, rtol=1e-4)


def test_first_depth_matches_a_single_pass_over_the_whole_sequence(models):
    """Drafting after several steps (cache + chains) gives what one pass over all rows gives."""
    llm, head, _, hf = models
    engine = LLMEngine.load(llm, ssms=[], feature_drafter=head, tree="3")
    [drafter] = engine.drafters
    prompt = [4, 9, 7, 5, 12, 6, 8]
    seq = engine.add_request(prompt, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    for _ in range(3):
        engine.step()
    tokens = seq.tokens
    fresh = FeatureDrafter(drafter.head, drafter.spec)
    with torch.no_grad():
        states = hf(torch.tensor([tokens]), output_hidden_states=True).hidden_states
    aux = torch.cat([states[i][0] for i in drafter.aux_layers], dim=-1)
    fresh.observe(0, 0, aux[: len(tokens) - 1])
    [one_pass] = fresh.propose([DraftRequest(0, tokens, seq.params)], [1])
    [stepped] = drafter.propose([DraftRequest(seq.request_id, tokens, seq.params)], [1])
    assert one_pass.num_drafted == 3 and stepped.tokens == one_pass.tokens


@pytest.mark.parametrize("mode,tree,ssm,ngram", [
    ("tree", "2,2,1,1", False, False),
    ("sequence", "1,1,1,1,1", False, False),
    ("tree", "2,1,1", True, True),  # merged with an SSM and prompt lookup
    ("sequence", "1,1,1,1", True, True),
])
def test_greedy_equals_transformers(models, mode, tree, ssm, ngram):
    llm, head, ssm_dir, hf = models
    engine = LLMEngine.load(llm, ssms=[ssm_dir] if ssm else [], drafters=["ngram"] if ngram else [],
                       feature_drafter=head, tree=tree, mode=mode)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 24, (int(n),), generator=gen).tolist() for n in torch.randint(2, 20, (5,), generator=gen)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0))
    for prompt, out in zip(prompts, outs):
        assert_greedy_equal(hf, prompt, out.token_ids, hf_greedy(hf, prompt, MAX_NEW))
    assert sum(o.stats.accepted_tokens for o in outs) > 0  # drafts were accepted: the path was exercised


# ---- sampling: the G-test of test_mss.py on its enumerable 8-token LLM ----------------------


@pytest.fixture(scope="module")
def mss_models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("feature-mss")
    common = dict(word_vocab=8, initializer_range=0.3, hidden_size=32, intermediate_size=64)
    llm = make_tiny_checkpoint(tmp, "llama", seed=1, **common)
    hf = transformers.AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32).eval()
    # A draft vocabulary of 5 of the 8 tokens: q = 0 for the rest, which only residuals produce.
    head = make_eagle3_head(tmp, llm, draft_ids=[2, 4, 5, 6, 7], logit_scale=3.0)
    return str(llm), str(head), noisy_copy(llm, tmp / "near", 0.5, 3), hf


@pytest.mark.parametrize("tree,with_ssm,temperature,top_p", [("2,2", False, 1.0, 1.0), ("2,1", True, 0.8, 0.9)])
def test_mss_with_feature_drafter_matches_llm_distribution(mss_models, tree, with_ssm, temperature, top_p):
    llm, head, near, hf = mss_models
    engine = LLMEngine.load(llm, ssms=[near] if with_ssm else [], drafters=["ngram"] if with_ssm else [],
                       feature_drafter=head, tree=tree, max_num_seqs=2048)
    counts, tokens_per_step = sample(engine, temperature=temperature, top_p=top_p)
    p_value = g_test(counts, exact_distribution(hf, PROMPT, NEW_TOKENS, temperature, 0, top_p))
    print(f"G-test p={p_value:.3g}, tokens/step={tokens_per_step:.3f}")
    assert p_value > ALPHA
    assert tokens_per_step > 1.0


class FeatureTopKButClaimsDrawn(FeatureDrafter):
    _children = TopKButClaimsDrawn._children  # wrong on purpose (see test_mss.py)


def test_negative_control_wrong_feature_proposal_is_rejected(mss_models):
    llm, head, _, hf = mss_models
    engine = LLMEngine.load(llm, ssms=[], feature_drafter=head, tree="2,1", max_num_seqs=2048)
    [drafter] = engine.drafters
    engine.drafters = engine.feature_drafters = [FeatureTopKButClaimsDrawn(drafter.head, drafter.spec)]
    counts, _ = sample(engine, temperature=1.0)
    p_value = g_test(counts, exact_distribution(hf, PROMPT, NEW_TOKENS, 1.0))
    print(f"negative control: G-test p={p_value:.3g}")
    assert p_value < ALPHA
