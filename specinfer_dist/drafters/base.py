"""The drafter interface: anything that proposes a token tree below each request's last token."""

from __future__ import annotations

from abc import ABC, abstractmethod

from specinfer_dist.engine.sequence import Sequence
from specinfer_dist.tree.spec import TreeSpec
from specinfer_dist.tree.token_tree import TokenTree


class Drafter(ABC):
    def __init__(self, name: str, spec: TreeSpec) -> None:
        self.name = name
        self.spec = spec

    @abstractmethod
    def propose(self, seqs: list[Sequence], max_depths: list[int]) -> list[TokenTree]:
        """One tree per sequence, rooted at its last token, at most ``max_depths[i]`` deep."""

    def release(self, seq: Sequence) -> None:
        """Forget per-request state once a request ends."""
