"""Model-free drafting (prompt lookup) and the merge budget, on hand-made token streams."""

from specinfer_dist.drafters.base import DraftRequest
from specinfer_dist.drafters.ngram import NgramDrafter
from specinfer_dist.runtime.sampling_params import SamplingParams
from specinfer_dist.tree import TokenTree, TreeSpec, merge_trees


def test_ngram_prefers_longest_latest_match():
    drafter = NgramDrafter(TreeSpec((1, 1, 1)))
    #            0  1  2  3  4  5  6  7  8  9
    tokens = [1, 2, 3, 9, 9, 1, 2, 3, 4, 2, 3]
    # Suffix [4, 2, 3] never occurred; [2, 3] did, latest at 6..7, followed by 4, 2, 3.
    assert drafter.continuations(tokens, 3) == [[4, 2, 3]]
    assert drafter.continuations([5, 6, 7], 3) == []  # nothing repeats
    assert drafter.continuations(tokens, 0) == []


def test_ngram_branches_on_distinct_matches_and_respects_depth():
    drafter = NgramDrafter(TreeSpec((2, 1, 1)))
    tokens = [7, 1, 7, 2, 7, 1, 7]
    # Suffix [1, 7] matched at 0..1 -> [2, 7, 1]; [7] alone would give more, but longest wins.
    assert drafter.continuations(tokens, 3) == [[2, 7, 1]]
    tokens = [7, 1, 7, 2, 7]  # only the 1-gram [7] recurs: two distinct continuations, latest first
    assert drafter.continuations(tokens, 2) == [[2, 7], [1, 7]]
    [tree] = drafter.propose([DraftRequest(0, tokens, SamplingParams())], max_depths=[1])
    assert tree.tokens[0] == 7 and sorted(tree.tokens[1:]) == [1, 2] and tree.depths() == [0, 1, 1]
    assert all(q is None for q in tree.probs)  # deterministic proposals: point masses


def chain(root, tokens):
    tree = TokenTree.from_root(root)
    node = 0
    for t in tokens:
        node = tree.add(node, t)
    return tree


def test_merge_budget_keeps_shallow_nodes_and_a_valid_tree():
    trees = [chain(0, [1, 2, 3, 4]), chain(0, [5, 6, 7, 8]), chain(0, [1, 2, 9])]
    merged = merge_trees(trees, budget=5)
    assert merged.num_drafted == 5
    assert sorted(merged.depths()) == [0, 1, 1, 2, 2, 3]
    assert all(p < i for i, p in enumerate(merged.parents) if i)  # parents still precede children
    assert {tuple(merged.path(n)) for n in range(1, len(merged))} == {(1,), (5,), (1, 2), (5, 6), (1, 2, 3)}
    # Without dedup (stochastic mode) duplicates stay separate candidates.
    assert merge_trees([chain(0, [1]), chain(0, [1])], dedup=False).num_drafted == 2
