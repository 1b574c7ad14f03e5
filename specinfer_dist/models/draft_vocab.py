"""A draft vocabulary: an SSM's head restricted to the tokens the LLM actually emits often.

A small SSM spends most of a forward in its vocabulary projection (SmolLM2: 28M of a 1-layer
SSM's 32M parameters). Scoring only the K most frequent output tokens (frequency-ranked
drafting, as in FR-Spec) cuts that cost by V/K. Output stays exact: drafts are proposals,
and a token outside the draft vocabulary simply gets probability 0 under the SSM's q, which
greedy verification and multi-step speculative sampling both handle (the LLM's residual
still produces it).

An SSM directory carries ``draft_vocab.json``: ``token_ids`` (most frequent first) and how
they were counted. ``boost-tune`` writes it from its distillation data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specinfer_dist.errors import ModelLoadError
from specinfer_dist.models.linear import linear

DRAFT_VOCAB_FILE = "draft_vocab.json"


class DraftVocabHead(nn.Module):
    """The LM head over a subset of the vocabulary; logits keep the full width (-inf outside)
    so everything downstream (top-k, q, coverage) indexes tokens as usual."""

    def __init__(self, head: nn.Linear, token_ids: torch.Tensor) -> None:
        super().__init__()
        self.vocab_size = head.out_features
        self.register_buffer("token_ids", token_ids.to(head.weight.device))
        self.weight = nn.Parameter(head.weight.detach()[self.token_ids].clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = x.new_full((*x.shape[:-1], self.vocab_size), float("-inf"))
        logits[..., self.token_ids] = linear(x, self.weight)
        return logits


def read_draft_vocab(model_dir: Path, vocab_size: int) -> torch.Tensor | None:
    """The draft vocabulary shipped with an SSM checkpoint, or None (the whole vocabulary)."""
    path = Path(model_dir) / DRAFT_VOCAB_FILE
    if not path.is_file():
        return None
    try:
        ids = torch.tensor(json.loads(path.read_text())["token_ids"], dtype=torch.long)
    except (ValueError, KeyError, TypeError) as err:
        raise ModelLoadError(f"{path}: not a draft vocabulary ({err})") from None
    if ids.ndim != 1 or len(ids) == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab_size or len(ids.unique()) != len(ids):
        raise ModelLoadError(f"{path}: token_ids must be distinct ids in [0, {vocab_size})")
    return ids


def restrict_head(model: nn.Module, token_ids: torch.Tensor) -> None:
    """Replace ``model.lm_head`` by its rows for ``token_ids`` (a copy; a shared head stays whole)."""
    model.lm_head = DraftVocabHead(model.lm_head, token_ids)


def frequent_tokens(sequences: list[torch.Tensor], vocab_size: int, size: int, always: set[int]) -> torch.Tensor:
    """The ``size`` most frequent ids in ``sequences`` (plus ``always``, e.g. EOS), most frequent first."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for seq in sequences:
        counts += torch.bincount(seq.long(), minlength=vocab_size)
    counts[sorted(always)] = counts.max() + 1  # kept whatever the data says
    return counts.argsort(descending=True, stable=True)[:size]


def write_draft_vocab(model_dir: Path, token_ids: torch.Tensor, info: dict[str, Any]) -> None:
    body = {**info, "size": len(token_ids), "token_ids": token_ids.tolist()}
    (Path(model_dir) / DRAFT_VOCAB_FILE).write_text(json.dumps(body) + "\n")
