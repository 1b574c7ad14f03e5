"""Collective boost-tuning end to end on a tiny random model (seconds, no network)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers
from helpers import make_tiny_checkpoint

from specinfer_dist import InvalidConfigError, LLMEngine, ModelLoadError, SamplingParams
from specinfer_dist.cli import main
from specinfer_dist.models.draft_vocab import DRAFT_VOCAB_FILE, DraftVocabHead
from specinfer_dist.models.loader import SHARED_FROM_LLM_KEY, load_model
from specinfer_dist.runtime.model_runner import ModelRunner, RunItem, chain_parents
from specinfer_dist.training.boost import BoostConfig, boost_tune
from specinfer_dist.training.data import DataConfig, build_distill_set
from specinfer_dist.training.jobs import load_hf
from specinfer_dist.training.model import SHARED, init_ssm, save_ssm
from specinfer_dist.training.train import TrainConfig

CORPUS = "\n\n".join(
    f"The {animal} walked to the {place} and found {n} shiny stones.\nIt counted them twice, then went home."
    for n, (animal, place) in enumerate(
        [(a, p) for a in ("cat", "dog", "fox", "owl", "bee") for p in ("river", "hill", "market", "forest")]
    )
)
DRAFT_VOCAB = 24  # of the tiny model's vocabulary, so the restriction is exercised


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory) -> Path:
    # initializer_range 0.1: a default (0.02) tiny model predicts one token everywhere.
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("llm"), tie_word_embeddings=True, max_position_embeddings=1024, initializer_range=0.1
    )


def _config(llm_dir: Path, root: Path, name: str, num_ssms: int = 2) -> BoostConfig:
    return BoostConfig(
        out=root / name, llm=str(llm_dir), num_ssms=num_ssms, layers=1, window=4, work_dir=root / f"{name}-work",
        draft_vocab=DRAFT_VOCAB,
        data=DataConfig(num_prompts=64, max_new_tokens=24, batch_size=8, topk=8, seed=1),  # 2 held out
        train=TrainConfig(steps=16, batch_size=4, lr=3e-3, warmup=2, log_every=2, ckpt_every=4, seed=1),
    )


@pytest.fixture(scope="module")
def boosted(llm_dir, tmp_path_factory) -> tuple[BoostConfig, dict]:
    cfg = _config(llm_dir, tmp_path_factory.mktemp("boost"), "run")
    return cfg, boost_tune(cfg, corpus=CORPUS, progress=False)


def test_report_and_boosting_sets(boosted):
    cfg, report = boosted
    assert report == json.loads((cfg.out / "boost_report.json").read_text())
    data, (s1, s2) = report["data"], report["stages"]
    assert data["heldout_sequences"] >= 1 and data["train_target_tokens"] > 0
    # SSM 1 trains on every sample; SSM 2 on exactly the ones SSM 1 did not predict.
    assert s1["trained_samples"] == data["samples"]
    assert s2["trained_samples"] == s1["missed_samples"] == s1["trained_samples"] - s1["predicted_samples"]
    stage1, stage2 = (torch.load(cfg.work_dir / f"stage-{k}.pt") for k in (1, 2))
    assert torch.equal(stage1["trained"], torch.arange(data["samples"]))
    assert torch.equal(stage2["trained"], stage1["missed"])
    assert 0 < len(stage1["missed"]) < data["samples"]  # some samples dropped, some kept
    for stage in (s1, s2):
        curve = [p["loss"] for p in stage["loss_curve"]]
        assert len(curve) == cfg.train.steps // cfg.train.log_every
        assert curve[-1] < curve[0]
    assert report["heldout_collective_top1"] >= max(s1["heldout_top1"], s2["heldout_top1"])
    assert s1["heldout_top1"] > report["heldout_top1_untrained"]
    # Both SSMs get the same draft vocabulary: the most frequent continuation tokens plus EOS.
    vocab = [json.loads((cfg.out / f"ssm-{k}" / DRAFT_VOCAB_FILE).read_text()) for k in (1, 2)]
    assert vocab[0] == vocab[1] and vocab[0]["size"] == DRAFT_VOCAB == len(set(vocab[0]["token_ids"]))
    assert 0 < report["draft_vocab"]["heldout_coverage"] <= 1
    eos = transformers.AutoTokenizer.from_pretrained(cfg.llm).eos_token_id
    assert eos in vocab[0]["token_ids"]


def test_vocab_only_rewrites_the_draft_vocabularies(boosted, tmp_path):
    cfg, report = boosted
    out = shutil.copytree(cfg.out, tmp_path / "out")
    again = boost_tune(replace(cfg, out=out, draft_vocab=5, vocab_only=True), corpus=CORPUS, progress=False)
    assert again["stages"] == report["stages"] and again["draft_vocab"]["size"] == 5
    assert len(json.loads((out / "ssm-2" / DRAFT_VOCAB_FILE).read_text())["token_ids"]) == 5
    with pytest.raises(InvalidConfigError, match="finished run"):
        boost_tune(replace(cfg, out=tmp_path / "nothing", vocab_only=True), corpus=CORPUS, progress=False)


def test_checkpoints_draft_for_the_llm_exactly(boosted, llm_dir):
    cfg, _ = boosted
    ssms = [str(cfg.out / "ssm-1"), str(cfg.out / "ssm-2")]
    prompts = ["The owl walked to the hill and found", "It counted them twice"]  # like the training data
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    reference = LLMEngine.load(str(llm_dir), mode="incremental").generate(prompts, params)
    engine = LLMEngine.load(str(llm_dir), ssms=ssms, tree="1,2,1")
    outs = engine.generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in reference]
    assert sum(o.stats.accepted_tokens for o in outs) > 0  # the trained drafts do get accepted
    # The embedding is the LLM's own tensor, not a copy; the head scores the draft vocabulary.
    for drafter in engine.drafters:
        ssm = drafter.runner.model
        assert ssm.model.embed_tokens.weight is engine.verifier.runner.model.model.embed_tokens.weight
        assert isinstance(ssm.lm_head, DraftVocabHead) and len(ssm.lm_head.token_ids) == DRAFT_VOCAB
    whole = LLMEngine.load(str(llm_dir), ssms=ssms, tree="1,2,1", draft_vocab=False)
    assert [o.token_ids for o in whole.generate(prompts, params)] == [o.token_ids for o in reference]
    for drafter in whole.drafters:  # the whole head is the LLM's tied embedding itself
        assert drafter.runner.model.lm_head.weight is drafter.runner.model.model.embed_tokens.weight


def test_shared_embedding_format_round_trips(llm_dir, tmp_path):
    llm_hf = load_hf(llm_dir)
    ssm = init_ssm(llm_hf, 1)
    with torch.no_grad():  # make the layer differ from the LLM's, so a wrong load would show
        ssm.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    save_ssm(ssm, tmp_path / "ssm", llm_dir, torch.float32)
    stored = safetensors.torch.load_file(tmp_path / "ssm" / "model.safetensors")
    assert not set(SHARED) & set(stored) and "model.norm.weight" in stored
    assert json.loads((tmp_path / "ssm" / "config.json").read_text())[SHARED_FROM_LLM_KEY] == SHARED

    with pytest.raises(ModelLoadError, match="takes model.embed_tokens.weight.*from its LLM"):
        load_model(str(tmp_path / "ssm"), progress=False)
    llm, _, _ = load_model(str(llm_dir), progress=False)
    ours, _, _ = load_model(str(tmp_path / "ssm"), progress=False, shared_from=llm)
    assert ours.model.embed_tokens.weight is llm.model.embed_tokens.weight
    ids = torch.tensor([[7, 8, 9, 10, 11]])
    with torch.no_grad():
        expected = ssm(input_ids=ids).logits[0]
    runner = ModelRunner(ours)
    [logits] = runner.forward([RunItem(runner.new_cache(), ids[0].tolist(), chain_parents(5), list(range(5)))])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)

    other = make_tiny_checkpoint(tmp_path, tie_word_embeddings=True, hidden_size=32, num_attention_heads=2)
    llm2, _, _ = load_model(str(other), progress=False)
    with pytest.raises(ModelLoadError, match="shared weight model.embed_tokens.weight"):
        load_model(str(tmp_path / "ssm"), progress=False, shared_from=llm2)


def test_resume_gives_the_same_weights(llm_dir, tmp_path, monkeypatch):
    straight = _config(llm_dir, tmp_path, "straight", num_ssms=1)
    boost_tune(straight, corpus=CORPUS, progress=False)

    resumed = _config(llm_dir, tmp_path, "resumed", num_ssms=1)
    shutil.copytree(straight.work_dir / "data", resumed.work_dir / "data")  # same data, generated once
    real_step, calls = torch.optim.AdamW.step, []

    def interrupted_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 7:  # after the checkpoint at step 4, before the one at step 8
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        boost_tune(resumed, corpus=CORPUS, progress=False)
    assert torch.load(resumed.work_dir / "ssm-1.pt")["step"] == 4
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    report = boost_tune(resumed, corpus=CORPUS, progress=False)

    a, b = (torch.load(c.work_dir / "ssm-1.pt") for c in (straight, resumed))
    assert a["step"] == b["step"] == straight.train.steps
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert report["stages"][0]["loss_curve"] == json.loads((straight.out / "boost_report.json").read_text())["stages"][0]["loss_curve"]


def test_own_token_targets_skip_the_teacher_pass_on_training_data(boosted, llm_dir):
    cfg, _ = boosted
    llm = load_hf(llm_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(llm_dir)
    data = build_distill_set(llm, tokenizer, llm_dir, cfg.llm, cfg.data, cfg.work_dir / "data", CORPUS, False,
                             soft_targets=False)
    for i, (tokens, plen) in enumerate(zip(data.tokens, data.prompt_lens)):
        if data.heldout[i]:  # held-out sequences keep the LLM's top-k, for evaluation
            assert data.top_ids[i].shape == (len(tokens) - plen, cfg.data.topk)
        else:
            assert torch.equal(data.top_ids[i][:, 0].long(), tokens[plen:])
            assert torch.all(data.top_probs[i] == 1)


def test_changed_data_settings_in_the_same_work_dir_are_refused(boosted):
    cfg, _ = boosted
    other = replace(cfg, data=replace(cfg.data, max_new_tokens=8))
    with pytest.raises(InvalidConfigError, match="other settings.*max_new_tokens"):
        boost_tune(other, corpus=CORPUS, progress=False)


def test_cli_rejects_bad_arguments(capsys):
    assert main(["boost-tune", "--layers", "0", "--out", "unused"]) == 2
    assert "layers must be positive" in capsys.readouterr().err
