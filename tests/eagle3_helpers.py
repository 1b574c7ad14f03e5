"""Tiny random EAGLE-3 heads for tiny random LLMs (tests of models/eagle3.py and drafters/feature.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import transformers

from helpers import make_tiny_checkpoint

from specinfer_dist.models.eagle3 import Eagle3Head, default_aux_layers, eagle3_config, save_eagle3


def make_eagle3_head(tmp_path: Path, llm_dir: Path, draft_ids: list[int] | None = None, seed: int = 0,
                     logit_scale: float = 1.0) -> Path:
    """A random head for the LLM at ``llm_dir`` (draft vocabulary ``draft_ids``, else all), saved
    self-contained (its own embedding and head). ``logit_scale`` sharpens its distributions."""
    config = transformers.AutoConfig.from_pretrained(llm_dir)
    draft = torch.tensor(draft_ids if draft_ids is not None else range(config.vocab_size))
    torch.manual_seed(seed)
    head = Eagle3Head(eagle3_config(config, len(draft)), default_aux_layers(config.num_hidden_layers))
    head.set_draft_vocab(draft)
    with torch.no_grad():
        head.lm_head.weight.mul_(logit_scale)
    return save_eagle3(head, tempfile.mkdtemp(dir=tmp_path, prefix="eagle3-"))



def make_feature_models(tmp_path: Path) -> tuple[Path, Path]:
    """(LLM, head): a tiny LLM with a small vocabulary and peaked distributions, and a random head
    drafting 18 of its tokens, sharpened, so that random drafts are sometimes accepted."""
    llm = make_tiny_checkpoint(tmp_path, "llama", seed=1, num_hidden_layers=4, word_vocab=24, initializer_range=0.3)
    return llm, make_eagle3_head(tmp_path, llm, draft_ids=list(range(2, 20)), logit_scale=3.0)
