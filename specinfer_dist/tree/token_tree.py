"""Token trees: nodes, DFS linearisation, topology-aware mask and positions.

Node 0 is the root, the request's last committed token; every other node is a drafted
token whose parent has a smaller index. A node attends to the committed prefix and to
its own ancestors, and sits at position ``prefix length + depth``. In stochastic mode each
drafted node also records the distribution q it was sampled from (None: proposed
deterministically, a point mass), which multi-step speculative sampling needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TokenTree:
    tokens: list[int]
    parents: list[int] = field(default_factory=lambda: [-1])
    probs: list[torch.Tensor | None] = field(default_factory=lambda: [None])

    @classmethod
    def from_root(cls, token: int) -> "TokenTree":
        return cls([token], [-1], [None])

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_drafted(self) -> int:
        return len(self.tokens) - 1

    def add(self, parent: int, token: int, probs: torch.Tensor | None = None) -> int:
        """Append a child of ``parent`` (drawn from ``probs``, if sampled) and return its index."""
        if not 0 <= parent < len(self.tokens):
            raise IndexError(f"parent {parent} is not a node of this tree")
        self.tokens.append(token)
        self.parents.append(parent)
        self.probs.append(probs)
        return len(self.tokens) - 1

    def children(self) -> list[list[int]]:
        kids: list[list[int]] = [[] for _ in self.tokens]
        for node, parent in enumerate(self.parents[1:], start=1):
            kids[parent].append(node)
        return kids

    def depths(self) -> list[int]:
        return depths(self.parents)

    def path(self, node: int) -> list[int]:
        """Tokens from the first drafted token down to ``node`` (the root excluded)."""
        out = []
        while node > 0:
            out.append(self.tokens[node])
            node = self.parents[node]
        return out[::-1]

    def dfs_order(self) -> list[int]:
        """The nodes in depth-first pre-order (children in insertion order)."""
        kids = self.children()
        order, stack = [], [0]
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(reversed(kids[node]))
        return order

    def dfs(self) -> "TokenTree":
        """The same tree with nodes renumbered in depth-first pre-order (``dfs_order``)."""
        order = self.dfs_order()
        new_index = {old: new for new, old in enumerate(order)}
        return TokenTree(
            [self.tokens[old] for old in order],
            [-1] + [new_index[self.parents[old]] for old in order[1:]],
            [self.probs[old] for old in order],
        )

    def attention_mask(self) -> torch.Tensor:
        return ancestor_mask(self.parents)


def depths(parents: list[int]) -> list[int]:
    """Depth of every node of a forest given parent indices (-1 = a root at depth 0)."""
    out: list[int] = []
    for parent in parents:
        out.append(0 if parent < 0 else out[parent] + 1)
    return out


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """Bool [n, n]: row i is True at i and at every ancestor of i (parents precede children)."""
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, parent in enumerate(parents):
        if parent >= 0:
            mask[i] = mask[parent]
        mask[i, i] = True
    return mask
