"""Token tree structure, DFS linearisation, mask/positions, merge and VerifyGreedy on hand-built inputs."""

import pytest
import torch

from specinfer_dist.errors import InvalidConfigError
from specinfer_dist.tree import (
    TokenTree,
    TreeSpec,
    ancestor_mask,
    depths,
    merge_trees,
    verify_greedy,
    verify_mss,
)


def bfs_tree() -> TokenTree:
    #        r(10)
    #       /     \
    #    a(11)    b(12)
    #    /   \       \
    #  c(13) d(14)   e(15)
    #  |
    #  f(16)
    tree = TokenTree.from_root(10)
    a, b = tree.add(0, 11), tree.add(0, 12)
    c, d = tree.add(a, 13), tree.add(a, 14)
    tree.add(b, 15)
    tree.add(c, 16)
    return tree


def test_dfs_linearisation_is_preorder_with_remapped_parents():
    tree = bfs_tree().dfs()
    assert tree.tokens == [10, 11, 13, 16, 14, 12, 15]
    assert tree.parents == [-1, 0, 1, 2, 1, 0, 5]
    assert tree.depths() == [0, 1, 2, 3, 2, 1, 2]
    assert tree.path(3) == [11, 13, 16]


def test_mask_is_ancestor_or_self():
    tree = bfs_tree().dfs()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0],
            [1, 1, 0, 0, 1, 0, 0],
            [1, 0, 0, 0, 0, 1, 0],
            [1, 0, 0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(tree.attention_mask(), expected)


def test_chain_mask_is_causal_and_depths_are_positions():
    parents = list(range(-1, 5))
    assert torch.equal(ancestor_mask(parents), torch.ones(6, 6, dtype=torch.bool).tril())
    assert depths(parents) == list(range(6))
    # A forest: a second root restarts depth 0.
    assert depths([-1, 0, -1, 2]) == [0, 1, 0, 1]


def test_add_rejects_unknown_parent():
    with pytest.raises(IndexError):
        TokenTree.from_root(1).add(3, 5)


def test_verify_greedy_follows_argmax_and_adds_bonus():
    tree = bfs_tree().dfs()  # tokens [10, 11, 13, 16, 14, 12, 15]
    vocab = 20
    logits = torch.zeros(len(tree), vocab)
    logits[0, 11] = 1  # root -> a (node 1)
    logits[1, 14] = 1  # a -> d (node 4), not c
    logits[4, 7] = 1  # d has no children: bonus 7
    accepted, bonus = verify_greedy(tree, logits)
    assert accepted == [1, 4]
    assert bonus == 7
    assert [tree.tokens[n] for n in accepted] == [11, 14]


def test_verify_greedy_rejects_at_root_and_accepts_full_depth():
    tree = bfs_tree().dfs()
    logits = torch.zeros(len(tree), 20)
    logits[0, 3] = 1
    assert verify_greedy(tree, logits) == ([], 3)
    logits = torch.zeros(len(tree), 20)
    for node, nxt in [(0, 11), (1, 13), (2, 16), (3, 9)]:
        logits[node, nxt] = 1
    assert verify_greedy(tree, logits) == ([1, 2, 3], 9)


def test_verify_greedy_on_root_only_tree_is_incremental_decoding():
    logits = torch.tensor([[0.0, 2.0, 1.0]])
    assert verify_greedy(TokenTree.from_root(0), logits) == ([], 1)


def sequences(tree: TokenTree) -> set[tuple[int, ...]]:
    return {tuple(tree.path(n)) for n in range(1, len(tree))}


def test_merge_is_union_of_sequences_without_duplicates():
    t1 = TokenTree.from_root(1)
    n = t1.add(0, 2)
    t1.add(n, 3)
    t2 = TokenTree.from_root(1)
    n = t2.add(0, 2)
    t2.add(n, 4)
    t2.add(0, 5)
    merged = merge_trees([t1, t2])
    assert sequences(merged) == sequences(t1) | sequences(t2)
    assert len(merged) == 1 + len(sequences(merged))  # every node is a distinct sequence
    with pytest.raises(ValueError):
        merge_trees([t1, TokenTree.from_root(9)])


def test_tree_spec_parse_count_and_validation():
    spec = TreeSpec.parse("1,1,3,1,1,1,1,1")
    assert spec.depth == 8 and spec.num_tokens == 1 + 1 + 3 * 6
    assert spec.as_sequence().widths == (1,) * 8
    for bad in ("", "1,0,2", "1,-1", "a,b", "2,2,2,2,2,2"):  # the last drafts 126 > 64 tokens
        with pytest.raises(InvalidConfigError):
            TreeSpec.parse(bad)
    assert TreeSpec.parse("2,2,2,2,2,2", token_budget=126).num_tokens == 126


def test_mss_never_accepts_a_token_the_llm_rules_out():
    """u * q(x) < p(x), strictly: with p(x) = 0 the candidate is rejected even where q(x) = 0
    (a draft vocabulary) would make a non-strict comparison accept it whatever u is."""
    p = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64)
    q = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)  # recorded q gives the drafted token 0 no mass
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        tree = TokenTree.from_root(2)
        tree.add(0, 0, q)
        accepted, bonus = verify_mss(tree, p.expand(2, -1), gen)
        assert accepted == [] and bonus in (1, 2)
