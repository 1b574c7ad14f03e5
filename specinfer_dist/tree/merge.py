"""Merge trees from several drafters into one tree holding exactly the union of their paths."""

from __future__ import annotations

from specinfer_dist.tree.token_tree import TokenTree


def merge_trees(trees: list[TokenTree], dedup: bool = True) -> TokenTree:
    """Union of root-to-node token sequences.

    With ``dedup`` (greedy mode) identical prefixes share nodes. Without it (stochastic mode)
    every draw stays its own candidate with its own q, as multi-step speculative sampling needs.
    """
    if not trees:
        raise ValueError("nothing to merge")
    root = trees[0].tokens[0]
    if any(t.tokens[0] != root for t in trees):
        raise ValueError("trees to merge must share their root token")
    merged = TokenTree.from_root(root)
    child_of: dict[tuple[int, int], int] = {}
    for tree in trees:
        where = [0] * len(tree)
        for node in range(1, len(tree)):
            key = (where[tree.parents[node]], tree.tokens[node])
            if not dedup:
                where[node] = merged.add(*key, tree.probs[node])
            else:
                if key not in child_of:
                    child_of[key] = merged.add(*key)
                where[node] = child_of[key]
    return merged
