"""Verification of a token tree against the LLM's logits."""

from __future__ import annotations

import torch

from specinfer_dist.tree.token_tree import TokenTree


def verify_greedy(tree: TokenTree, logits: torch.Tensor) -> tuple[list[int], int]:
    """VerifyGreedy: follow the child matching the LLM's argmax, then add the LLM's own token.

    ``logits[i]`` is the LLM's prediction after node i. Returns the accepted drafted nodes
    (root-to-leaf order) and the bonus token, so each step yields ``len(accepted) + 1`` tokens.
    """
    best = logits.argmax(dim=-1).tolist()
    kids = tree.children()
    accepted: list[int] = []
    node = 0
    while True:
        match = next((c for c in kids[node] if tree.tokens[c] == best[node]), None)
        if match is None:
            return accepted, best[node]
        accepted.append(match)
        node = match
