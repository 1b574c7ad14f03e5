"""Dynamic (EAGLE-2) trees: pure selection/pruning, the spec, and exactness with every drafter."""

from __future__ import annotations

import math

import pytest
import torch

from specinfer_dist.errors import InvalidConfigError
from specinfer_dist.tree.dynamic import best_nodes, prune_tree
from specinfer_dist.tree.spec import TreeSpec
from specinfer_dist.tree.token_tree import TokenTree


def scored_tree() -> tuple[TokenTree, list[float]]:
    #        root
    #      a(-0.1)      b(-1.0)
    #   c(-0.3) d(-2.0)   e(-1.2)
    #   f(-0.4)
    tree = TokenTree.from_root(0)
    a, b = tree.add(0, 10), tree.add(0, 11)
    c, d = tree.add(a, 12), tree.add(a, 13)
    e = tree.add(b, 14)
    tree.add(c, 15)
    return tree, [0.0, -0.1, -1.0, -0.3, -2.0, -1.2, -0.4]


def test_best_nodes_keeps_original_order_and_breaks_ties_by_position():
    scores = [0.0, -1.0, -0.5, -0.5, -3.0]
    assert best_nodes([1, 2, 3, 4], scores, 2) == [2, 3]
    assert best_nodes([4, 3, 2, 1], scores, 2) == [3, 2]
    assert best_nodes([1, 2], scores, 5) == [1, 2]


@pytest.mark.parametrize("budget,tokens", [(1, [10]), (3, [10, 12, 15]), (4, [10, 11, 12, 15]), (6, [10, 11, 12, 13, 14, 15])])
def test_prune_keeps_the_most_probable_nodes_as_a_tree(budget, tokens):
    tree, scores = scored_tree()
    pruned = prune_tree(tree, scores, budget)
    assert sorted(pruned.tokens[1:]) == tokens
    for node in range(1, len(pruned)):  # every kept node's path is a path of the original tree
        assert pruned.path(node) in [tree.path(n) for n in range(1, len(tree))]


def test_prune_never_orphans_a_node_even_with_equal_scores():
    tree = TokenTree.from_root(0)
    a = tree.add(0, 1)
    tree.add(a, 2)
    tree.add(0, 3)
    pruned = prune_tree(tree, [0.0, -1.0, -1.0, -1.0], 2)
    assert pruned.parents == [-1, 0, 1] or pruned.parents == [-1, 0, 0]
    assert all(p < i for i, p in enumerate(pruned.parents))


def test_dynamic_spec_parses_and_sizes():
    spec = TreeSpec.parse("dynamic", 32)
    assert spec.dynamic and spec.depth == 6 and spec.widths[0] == 4 and spec.num_tokens == 32
    assert str(spec) == "dynamic:4,6"
    small = TreeSpec.parse("dynamic:2,3", 64)
    assert small.num_tokens == 2 + 2 * 4  # k, then k * k candidates per further depth
    with pytest.raises(InvalidConfigError):
        TreeSpec.parse("dynamic:2", 64)
    assert math.prod(spec.widths) > spec.token_budget  # dynamic trees are not bound by the static check


# ---- in the engine -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import transformers
    from eagle3_helpers import make_eagle3_head
    from helpers import make_tiny_checkpoint
    from test_mss import noisy_copy

    tmp = tmp_path_factory.mktemp("dynamic")
    llm = make_tiny_checkpoint(tmp, "llama", seed=1, num_hidden_layers=4, word_vocab=24, initializer_range=0.3)
    head = make_eagle3_head(tmp, llm, draft_ids=list(range(2, 20)), logit_scale=3.0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32).eval()
    return str(llm), str(head), noisy_copy(llm, tmp / "ssm", 0.3, 3), hf


@pytest.mark.parametrize("use_ssm,feature,ngram", [(True, False, False), (False, True, False), (True, True, True)])
def test_greedy_dynamic_tree_equals_transformers(models, use_ssm, feature, ngram):
    from exactness import assert_greedy_equal, hf_greedy

    from specinfer_dist import LLMEngine, SamplingParams

    llm, head, ssm, hf = models
    engine = LLMEngine.load(llm, ssms=[ssm] if use_ssm else [], drafters=["ngram"] if ngram else [],
                       feature_drafter=head if feature else None, tree="dynamic:3,4", tree_budget=12)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 24, (int(n),), generator=gen).tolist() for n in torch.randint(2, 20, (4,), generator=gen)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=20, temperature=0))
    for prompt, out in zip(prompts, outs):
        assert_greedy_equal(hf, prompt, out.token_ids, hf_greedy(hf, prompt, 20))
    stats = [o.stats for o in outs]
    assert sum(s.accepted_tokens for s in stats) > 0
    assert max(s.drafted_tokens / s.steps for s in stats) <= 12 * (1 + use_ssm + feature + ngram)


def test_mss_with_dynamic_tree_matches_llm_distribution(tmp_path):
    import transformers
    from eagle3_helpers import make_eagle3_head
    from helpers import make_tiny_checkpoint
    from test_mss import ALPHA, NEW_TOKENS, PROMPT, exact_distribution, g_test, noisy_copy, sample

    from specinfer_dist import LLMEngine

    common = dict(word_vocab=8, initializer_range=0.3, hidden_size=32, intermediate_size=64)
    llm = make_tiny_checkpoint(tmp_path, "llama", seed=1, **common)
    hf = transformers.AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32).eval()
    head = make_eagle3_head(tmp_path, llm, draft_ids=[2, 4, 5, 6, 7], logit_scale=3.0)
    engine = LLMEngine.load(str(llm), ssms=[noisy_copy(llm, tmp_path / "near", 0.5, 3)], feature_drafter=str(head),
                       tree="dynamic:2,3", tree_budget=6, max_num_seqs=2048)
    counts, tokens_per_step = sample(engine, temperature=1.0)
    p_value = g_test(counts, exact_distribution(hf, PROMPT, NEW_TOKENS, 1.0))
    print(f"dynamic tree MSS: G-test p={p_value:.3g}, tokens/step={tokens_per_step:.3f}")
    assert p_value > ALPHA and tokens_per_step > 1.0


def test_tree_auto_races_the_feature_drafter_and_dynamic_trees(models, tmp_path, monkeypatch):
    import json

    from specinfer_dist import LLMEngine

    monkeypatch.setenv("SPECINFER_DIST_CACHE", str(tmp_path / "cache"))
    llm, head, ssm, _ = models
    engine = LLMEngine.load(llm, ssms=[ssm], feature_drafter=head, tree="auto", tree_budget=12)
    [raced] = (tmp_path / "cache" / "tree-race").glob("*.json")
    race = json.loads(raced.read_text())
    assert set(race["setups"]) == {"incremental", "tuned", "dynamic", "tuned-no-feature", "dynamic-no-feature"}
    assert all(s["outputs_equal_incremental"] for s in race["setups"].values())
    best = race["best"]  # "tuned" may be incremental decoding: the cost model's choice for the SSMs
    assert engine.mode == "incremental" or any(d.name == "feature" for d in engine.drafters) == (
        best in ("tuned", "dynamic"))
    assert engine.spec.dynamic == best.startswith("dynamic")
