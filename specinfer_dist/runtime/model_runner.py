"""Runs one model over many requests' new tokens in a single flattened forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specinfer_dist.models.eagle3 import Eagle3Head
from specinfer_dist.models.transformer import Segment, Transformer
from specinfer_dist.runtime.kv_cache import KVCache
from specinfer_dist.tree.token_tree import ancestor_mask, depths


@dataclass
class RunItem:
    """New tokens for one request.

    ``parents`` covers every pending row of the cache in this step (earlier forwards'
    rows first, then this forward's ``tokens``); -1 means "child of the committed prefix".
    ``logit_rows`` picks which of this forward's rows need logits.
    """

    cache: KVCache
    tokens: list[int]
    parents: list[int]
    logit_rows: list[int]


def chain_parents(n: int) -> list[int]:
    """Parents of ``n`` consecutive tokens right after the committed prefix."""
    return list(range(-1, n - 1))


class ModelRunner:
    """Runs an LLM or SSM (``forward``), or gives an EAGLE-3 head its flattened inputs (``prepare``)."""

    def __init__(self, model: Transformer | Eagle3Head) -> None:
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    def new_cache(self) -> KVCache:
        return KVCache(self.model.num_layers, self.model.num_kv_heads, self.model.head_dim, self.dtype, self.device)

    def prepare(self, items: list[RunItem]) -> tuple[torch.Tensor, torch.Tensor, list[Segment], torch.Tensor]:
        """Reserve cache rows and flatten ``items`` into (ids, positions, segments, logit rows)."""
        ids, positions, segments, rows = [], [], [], []
        start = 0
        for item in items:
            n = len(item.tokens)
            item.cache.reserve(n)
            tree_mask = ancestor_mask(item.parents)[-n:]
            mask = torch.cat((torch.ones(n, item.cache.length, dtype=torch.bool), tree_mask), dim=1)
            ids.extend(item.tokens)
            positions.extend(item.cache.length + d for d in depths(item.parents)[-n:])
            segments.append(Segment(start, start + n, item.cache, mask.to(self.device)))
            rows.extend(start + r for r in item.logit_rows)
            start += n
        device = self.device
        return torch.tensor(ids, device=device), torch.tensor(positions, device=device), segments, torch.tensor(rows, dtype=torch.long, device=device)  # may be empty (prompt chunks only)

    @torch.inference_mode()
    def forward(self, items: list[RunItem]) -> list[torch.Tensor]:
        """Logits [len(item.logit_rows), vocab] for every item, from one forward pass."""
        return self._split_logits(self.model(*self.prepare(items)), items)

    @torch.inference_mode()
    def forward_hidden(self, items: list[RunItem], aux_layers: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Logits as ``forward``, plus every row's hidden states entering ``aux_layers``
        ([len(item.tokens), k * hidden] per item, left on the device for a feature drafter)."""
        logits, aux = self.model(*self.prepare(items), aux_layers=aux_layers)
        return self._split_logits(logits, items), list(aux.split([len(item.tokens) for item in items]))

    @staticmethod
    def _split_logits(logits: torch.Tensor, items: list[RunItem]) -> list[torch.Tensor]:
        # On the host: verification is sequential per request, and its RNG lives on the CPU.
        return list(logits.float().cpu().split([len(item.logit_rows) for item in items]))
