"""Merge trees from several drafters into one tree holding exactly the union of their paths."""

from __future__ import annotations

from specinfer_dist.tree.token_tree import TokenTree


def merge_trees(trees: list[TokenTree], dedup: bool = True, budget: int | None = None) -> TokenTree:
    """Union of root-to-node token sequences, shallowest nodes first.

    With ``dedup`` (greedy mode) identical prefixes share nodes. Without it (stochastic mode)
    every draw stays its own candidate with its own q, as multi-step speculative sampling needs.
    ``budget`` caps the drafted nodes; shallow ones are kept, since every accepted path starts
    at the root.
    """
    if not trees:
        raise ValueError("nothing to merge")
    root = trees[0].tokens[0]
    if any(t.tokens[0] != root for t in trees):
        raise ValueError("trees to merge must share their root token")
    merged = TokenTree.from_root(root)
    child_of: dict[tuple[int, int], int] = {}
    where = [[0] + [-1] * (len(t) - 1) for t in trees]  # node in each tree -> node in merged
    order = sorted((d, i, n) for i, t in enumerate(trees) for n, d in enumerate(t.depths()) if n > 0)
    for _, i, node in order:
        tree = trees[i]
        parent = where[i][tree.parents[node]]
        if parent < 0:  # its parent fell outside the budget
            continue
        key = (parent, tree.tokens[node])
        if dedup and key in child_of:
            where[i][node] = child_of[key]
        elif budget is None or merged.num_drafted < budget:
            where[i][node] = child_of[key] = merged.add(*key, tree.probs[node])
    return merged
