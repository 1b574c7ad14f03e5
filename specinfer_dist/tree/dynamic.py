"""Dynamic token trees (EAGLE-2): grow the most probable paths, keep the best N nodes.

A drafter scores each drafted node by its path log-probability under the drafter (the sum
of log q along the path; q the distribution that proposed it). Each depth expands only the
``k`` best new nodes; at the end a greedy tree keeps its ``budget`` best nodes. Because a
child never scores above its parent, the best nodes (ties to the shallower, earlier one)
always form a tree rooted at the root.

Sampled trees are never pruned by value: multi-step speculative sampling needs each node's
candidates to be independent draws from their q, so which draws exist may depend on their
ancestors (expansion choices) but not on their own tokens (see drafters/ssm.py).
"""

from __future__ import annotations

from specinfer_dist.tree.token_tree import TokenTree


def best_nodes(nodes: list[int], scores: list[float], k: int) -> list[int]:
    """The ``k`` best of ``nodes`` by score (ties: the earlier), in their original order."""
    ranked = sorted(range(len(nodes)), key=lambda i: (-scores[nodes[i]], i))[:k]
    return [nodes[i] for i in sorted(ranked)]


def prune_tree(tree: TokenTree, scores: list[float], budget: int) -> TokenTree:
    """The root plus the ``budget`` best-scoring drafted nodes, with their q, in the original order.

    ``scores[0]`` (the root) is ignored; a node is kept only with its parent, which the
    ordering by (score, depth, index) considers first whenever scores never rise along a path.
    """
    depths = tree.depths()
    order = sorted(range(1, len(tree)), key=lambda n: (-scores[n], depths[n], n))
    keep = {0}
    for node in order:
        if len(keep) > budget:
            break
        if tree.parents[node] in keep:
            keep.add(node)
    pruned = TokenTree.from_root(tree.tokens[0])
    new_index = {0: 0}
    for node in sorted(keep - {0}):  # parents precede children in index order
        new_index[node] = pruned.add(new_index[tree.parents[node]], tree.tokens[node], tree.probs[node])
    return pruned
