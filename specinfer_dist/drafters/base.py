"""The drafter interface: anything that proposes a token tree below each request's last token."""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import torch

from specinfer_dist.runtime.grammar import Grammar
from specinfer_dist.runtime.sampling_params import SamplingParams
from specinfer_dist.tree.spec import TreeSpec
from specinfer_dist.tree.token_tree import TokenTree


@dataclass
class DraftRequest:
    """What a drafter sees of a request (small and picklable, so drafters can run elsewhere)."""

    request_id: int
    tokens: list[int]  # prompt + output so far; the tree's root is the last one
    params: SamplingParams
    # The request's grammar at its committed tokens, where the drafter runs in the engine's
    # process: drafters mask their distributions with it (masks for the nodes they expand).
    # Requests shipped to another process travel without it (``shippable``); there, it is
    # rebuilt from ``params.structured_outputs`` and the output tokens (RequestGrammars).
    grammar: Grammar | None = None
    prompt_len: int = 0  # tokens[prompt_len:] is the output so far, what a grammar has consumed

    def shippable(self) -> "DraftRequest":
        return replace(self, grammar=None) if self.grammar is not None else self


class Drafter(ABC):
    def __init__(self, name: str, spec: TreeSpec) -> None:
        self.name = name
        self.spec = spec

    @abstractmethod
    def propose(self, requests: list[DraftRequest], max_depths: list[int]) -> list[TokenTree]:
        """One tree per request, rooted at its last token, at most ``max_depths[i]`` deep."""

    def release(self, request_id: int) -> None:
        """Forget per-request state once a request ends."""


def draft_generator(params: SamplingParams, drafter_name: str) -> torch.Generator:
    """A drafter's own random stream for a request: seeded requests draft reproducibly
    wherever the drafter runs, independently of the verifier's stream and of other drafters."""
    generator = torch.Generator()
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed((params.seed * 1_000_003 + zlib.crc32(drafter_name.encode())) % 2**63)
    return generator
