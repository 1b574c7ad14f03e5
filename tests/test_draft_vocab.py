"""Draft vocabularies (SSM heads over the LLM's frequent tokens) and the skinny CPU linear."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from helpers import make_tiny_checkpoint

from specinfer_dist import LLMEngine, ModelLoadError, SamplingParams
from specinfer_dist.drafters.base import DraftRequest
from specinfer_dist.models.draft_vocab import (
    DRAFT_VOCAB_FILE,
    DraftVocabHead,
    frequent_tokens,
    write_draft_vocab,
)
from specinfer_dist.models import linear as linear_module
from specinfer_dist.models.linear import SKINNY_ROWS, linear


@pytest.mark.parametrize("skinny_cpu", [False, True])  # whatever CPU runs the tests: both paths
@pytest.mark.parametrize("rows", [1, 2, SKINNY_ROWS, SKINNY_ROWS + 1])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_is_the_same_product(rows, bias, skinny_cpu, monkeypatch):
    monkeypatch.setattr(linear_module, "SKINNY_CPU", skinny_cpu)
    gen = torch.Generator().manual_seed(rows)
    weight, x = torch.randn(300, 48, generator=gen), torch.randn(1, rows, 48, generator=gen)
    b = torch.randn(300, generator=gen) if bias else None
    residual = torch.randn(1, rows, 300, generator=gen)
    out = linear(x, weight, b)
    assert out.shape == (1, rows, 300)  # the skinny path returns a transposed view, not a copy
    torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear(x, weight, b, residual), residual + F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_head_scores_only_its_tokens():
    head = torch.nn.Linear(16, 50, bias=False)
    ids = torch.tensor([7, 3, 42, 0])
    restricted = DraftVocabHead(head, ids)
    for rows in (1, 40):  # both linear paths
        x = torch.randn(rows, 16)
        logits, full = restricted(x), head(x)
        torch.testing.assert_close(logits[:, ids], full[:, ids])
        outside = torch.ones(50, dtype=torch.bool)
        outside[ids] = False
        assert torch.isneginf(logits[:, outside]).all()


def test_frequent_tokens_keeps_always_and_orders_by_count():
    seqs = [torch.tensor([5, 5, 5, 2, 2, 9]), torch.tensor([2, 7])]
    assert frequent_tokens(seqs, 12, 3, always={11}).tolist() == [11, 2, 5]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("draft-vocab")
    llm = make_tiny_checkpoint(tmp, "llama", seed=1)
    ssm = shutil.copytree(make_tiny_checkpoint(tmp, "llama", seed=1, num_hidden_layers=1), tmp / "ssm")
    vocab = torch.arange(4, 60)  # a strict subset: the LLM's outputs are not all in it
    write_draft_vocab(ssm, vocab, {"counted": "test"})
    return str(llm), str(ssm), vocab


def test_engine_drafts_from_the_subset_and_output_stays_exact(models):
    llm, ssm, vocab = models
    prompts = [[5, 40, 77, 9, 12], [100, 3, 60, 61, 62, 63]]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    reference = [o.token_ids for o in LLMEngine.load(llm, mode="incremental").generate(prompts, params)]
    engine = LLMEngine.load(llm, ssms=[ssm], tree="2,2,1")
    [drafter] = engine.drafters
    assert isinstance(drafter.runner.model.lm_head, DraftVocabHead)
    assert [o.token_ids for o in engine.generate(prompts, params)] == reference
    assert any(t not in vocab for out in reference for t in out)  # the LLM still emits the rest
    [tree] = drafter.propose([DraftRequest(999, prompts[1], params)], [3])
    assert len(tree.tokens) == 1 + 2 + 4 + 4 and set(tree.tokens[1:]) <= set(vocab.tolist())

    whole = LLMEngine.load(llm, ssms=[ssm], tree="2,2,1", draft_vocab=False)
    head = whole.drafters[0].runner.model.lm_head
    assert isinstance(head, torch.nn.Linear) and head.out_features == whole.vocab_size


@pytest.mark.parametrize("body", [
    "not json", json.dumps({"ids": [1]}), json.dumps({"token_ids": [1, 1]}), json.dumps({"token_ids": [10**6]}),
    json.dumps({"token_ids": []}),
])
def test_a_broken_draft_vocabulary_is_a_load_error(models, tmp_path, body):
    llm, ssm, _ = models
    broken = shutil.copytree(ssm, tmp_path / "ssm")
    (broken / DRAFT_VOCAB_FILE).write_text(body)
    with pytest.raises(ModelLoadError, match=DRAFT_VOCAB_FILE):
        LLMEngine.load(llm, ssms=[str(broken)])
