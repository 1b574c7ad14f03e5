"""Prompt lookup: propose what followed the latest earlier occurrence of the current suffix.

Model-free and nearly free: it wins when the output repeats the input (summaries, edits,
code, quoting). Its proposals are deterministic, so each node is a point mass for MSS.
"""

from __future__ import annotations

from specinfer_dist.drafters.base import Drafter, DraftRequest
from specinfer_dist.tree.merge import merge_trees
from specinfer_dist.tree.spec import TreeSpec
from specinfer_dist.tree.token_tree import TokenTree


class NgramDrafter(Drafter):
    """Matches the last ``max_ngram`` .. ``min_ngram`` tokens against the prompt and output.

    The tree's first width is how many distinct earlier matches become branches (most recent
    first); each branch is the chain of tokens that followed its match, as deep as the spec.
    """

    def __init__(self, spec: TreeSpec, max_ngram: int = 3, min_ngram: int = 1, name: str = "ngram") -> None:
        super().__init__(name, spec)
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, requests: list[DraftRequest], max_depths: list[int]) -> list[TokenTree]:
        trees = []
        for request, max_depth in zip(requests, max_depths):
            tokens = request.tokens
            branches = []
            for continuation in self.continuations(tokens, min(max_depth, self.spec.depth)):
                branch = TokenTree.from_root(tokens[-1])
                node = 0
                for token in continuation:
                    node = branch.add(node, token)
                branches.append(branch)
            trees.append(merge_trees(branches) if branches else TokenTree.from_root(tokens[-1]))
        return trees

    def continuations(self, tokens: list[int], depth: int) -> list[list[int]]:
        """Up to ``widths[0]`` distinct continuations of the longest suffix seen before."""
        if depth < 1:
            return []
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            suffix = tokens[-n:]
            found: list[list[int]] = []
            # Latest match first; a match must leave at least one token after it.
            for end in range(len(tokens) - 1, n - 1, -1):
                if tokens[end - n : end] == suffix:
                    continuation = tokens[end : end + depth]
                    if continuation and continuation not in found:
                        found.append(continuation)
                        if len(found) == self.spec.widths[0]:
                            break
            if found:
                return found
        return []
