"""The LLM side of a step: one forward over every request's new tokens, then commits.

``LocalVerifier`` keeps the LLM and the per-request KV caches in this process. A group of
tensor-parallel shards offers the same three calls, so the engine does not care where the
LLM runs; it only tracks how many of each request's tokens are cached (``Sequence.num_cached``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from specinfer_dist.engine.kv_cache import KVCache
from specinfer_dist.engine.model_runner import ModelRunner, RunItem
from specinfer_dist.models.transformer import Transformer


@dataclass
class VerifyItem:
    """New tokens of one request: what is committed but uncached, then its token tree."""

    request_id: int
    tokens: list[int]
    parents: list[int]  # over these tokens; -1 = child of the cached prefix
    logit_rows: list[int]


class Verifier(Protocol):
    def forward(self, items: list[VerifyItem]) -> list[torch.Tensor]: ...

    def commit(self, request_id: int, keep: list[int]) -> None: ...

    def release(self, request_id: int) -> None: ...


class LocalVerifier:
    def __init__(self, model: Transformer) -> None:
        self.runner = ModelRunner(model)
        self.caches: dict[int, KVCache] = {}

    def forward(self, items: list[VerifyItem]) -> list[torch.Tensor]:
        """Logits for each item's ``logit_rows``; the items' tokens stay pending in the caches."""
        run = []
        for item in items:
            if item.request_id not in self.caches:
                self.caches[item.request_id] = self.runner.new_cache()
            run.append(RunItem(self.caches[item.request_id], item.tokens, item.parents, item.logit_rows))
        return self.runner.forward(run)

    def commit(self, request_id: int, keep: list[int]) -> None:
        """Keep these pending rows (the uncached prefix and the accepted path); drop the rest."""
        self.caches[request_id].commit(keep)

    def release(self, request_id: int) -> None:
        self.caches.pop(request_id, None)
