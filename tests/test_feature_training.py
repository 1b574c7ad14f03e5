"""train-feature-drafter end to end on a tiny random LLM (seconds, no network), and its pieces."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from exactness import assert_greedy_equal, hf_greedy
from helpers import make_tiny_checkpoint
from test_training import CORPUS

from specinfer_dist import LLMEngine, SamplingParams
from specinfer_dist.cli import main
from specinfer_dist.models.eagle3 import load_eagle3
from specinfer_dist.models.loader import load_model
from specinfer_dist.training.feature import (
    CKPT_NAME,
    FeatureTrainConfig,
    TrainSequence,
    UnrolledAttention,
    train_feature_drafter,
    valid_rows,
)


def test_ttt_mask_matches_the_rows_a_drafted_chain_sees():
    # Unrolled step 2, row 4: feature rows 0..2, then its chain's step-1 row 3 and step-2 row 4.
    mask = UnrolledAttention([6], torch.device("cpu")).mask(2)
    assert mask.shape == (6, 18)
    assert mask[4].nonzero().flatten().tolist() == [0, 1, 2, 6 + 3, 12 + 4]
    assert mask[0].nonzero().flatten().tolist() == [12]  # no chain (t < j): only itself, never scored
    assert UnrolledAttention([3], torch.device("cpu")).mask(0).equal(torch.ones(3, 3, dtype=torch.bool).tril())
    # Two sequences side by side: each row sees only its own sequence's rows.
    two = UnrolledAttention([3, 2], torch.device("cpu")).mask(1)
    assert two[4].nonzero().flatten().tolist() == [3, 5 + 4]  # sequence 1, t=1: feature row t=0, its step-1 row
    assert not two[:3, 3:5].any() and not two[3:, :3].any()


def test_only_chains_drafting_would_run_are_scored():
    # An answer to a 4-token prompt (root row 3: the prompt's last token with the first answer
    # token, which the LLM itself emits); a corpus window scores every chain.
    answer, window = TrainSequence(torch.arange(8), root=3), TrainSequence(torch.arange(5))
    assert valid_rows([answer, window], 0, torch.device("cpu")).tolist() == [0, 0, 0, 1, 1, 1, 1] + [1, 1, 1, 1]
    assert valid_rows([answer, window], 2, torch.device("cpu")).tolist() == [0, 0, 0, 0, 0, 1, 1] + [0, 0, 1, 1]


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("llm"), tie_word_embeddings=True, num_hidden_layers=4,
                                max_position_embeddings=1024, initializer_range=0.1)


def test_train_resume_load_and_generate_exactly(llm_dir, tmp_path):
    cfg = FeatureTrainConfig(out=tmp_path / "head", llm=str(llm_dir), prompts=40, max_new_tokens=24,
                             corpus_sequences=16, seq_len=224, tokens=600, batch_size=4, ttt_steps=2,
                             draft_vocab=64, ckpt_every=2, log_every=1, threads=1)
    first = train_feature_drafter(cfg, corpus=CORPUS, progress=False)
    assert first["trained_tokens"] >= 600 and (tmp_path / "head" / ".work" / CKPT_NAME).is_file()
    losses = [loss for _, _, loss in first["loss_curve"]]
    assert losses[-1] < losses[0]
    # Resuming with a larger token target continues from the checkpoint rather than starting over.
    # The LLM itself as the "SSM" to compare with agrees with itself everywhere.
    more = train_feature_drafter(FeatureTrainConfig(**{**cfg.__dict__, "tokens": 1200, "compare_ssms": [str(llm_dir)]}),
                                 corpus=CORPUS, progress=False)
    assert more["steps"] > first["steps"] and more["trained_tokens"] >= 1200
    assert len(more["heldout"]["top1_by_depth"]) == 2
    assert more["heldout"]["ssms"]["ssm0"]["top1"] == 1.0
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == 64
    assert config["specinfer_shared_from_llm"] == ["embed_tokens.weight", "lm_head.weight"]

    llm = load_model(str(llm_dir))[0]
    head = load_eagle3(tmp_path / "head", llm)
    assert head.embed_tokens.weight is llm.model.embed_tokens.weight
    # Fine-tuning starts from the head's weights and keeps its draft vocabulary, whatever the data.
    tuned_cfg = FeatureTrainConfig(**{**cfg.__dict__, "out": tmp_path / "tuned", "init": tmp_path / "head",
                                      "corpus_sequences": 0, "tokens": 100, "lr": 0.0})
    tuned_report = train_feature_drafter(tuned_cfg, corpus=CORPUS, progress=False)
    # The report measures the --init head on the same held-out rows; at lr 0 nothing changed.
    before = tuned_report["heldout"].pop("init")
    assert before == {k: v for k, v in tuned_report["heldout"].items() if k != "ssms"}
    tuned = load_eagle3(tmp_path / "tuned", llm)
    assert tuned.d2t.equal(head.d2t) and tuned.midlayer.mlp.up_proj.weight.equal(head.midlayer.mlp.up_proj.weight)
    engine = LLMEngine.load(str(llm_dir), ssms=[], feature_drafter=str(tmp_path / "head"), tree="2,1,1")
    hf = transformers.AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).eval()
    prompt = [40, 41, 42, 43, 44, 45]
    [out] = engine.generate(prompt, SamplingParams(max_tokens=16, temperature=0))
    assert_greedy_equal(hf, prompt, out.token_ids, hf_greedy(hf, prompt, 16))


def test_cli_trains_a_head(llm_dir, tmp_path, monkeypatch):
    import specinfer_dist.training.prompts as prompts

    monkeypatch.setattr(prompts, "fetch_corpus", lambda progress=True: CORPUS)
    rc = main(["train-feature-drafter", "--llm", str(llm_dir), "--out", str(tmp_path / "h"), "--tokens", "100",
               "--prompts", "20", "--max-new-tokens", "8", "--corpus-sequences", "4", "--seq-len", "224",
               "--draft-vocab", "32", "--threads", "1"])
    assert rc == 0 and (tmp_path / "h" / "model.safetensors").is_file()


def test_cli_with_a_time_budget_keeps_to_it_measures_drafting_and_grows_its_data(llm_dir, tmp_path, monkeypatch):
    import specinfer_dist.training.prompts as prompts
    from specinfer_dist.training.answers import ANSWERS, MANIFEST

    monkeypatch.setattr(prompts, "fetch_corpus", lambda progress=True: CORPUS)
    data = tmp_path / "answers"

    def run(out: str, n: int) -> dict:
        rc = main(["train-feature-drafter", "--llm", str(llm_dir), "--out", str(tmp_path / out), "--data-dir", str(data),
                   "--budget-minutes", "0.25", "--prompts", str(n), "--max-new-tokens", "8", "--corpus-sequences", "0",
                   "--tokens", "1000000000", "--draft-vocab", "32", "--threads", "1", "--eval-prompts", "2",
                   "--eval-max-tokens", "8"])
        assert rc == 0
        return json.loads((tmp_path / out / "train_report.json").read_text())

    report = run("a", 40)
    # Trained until the budget's training share had passed (not to the token target), then measured.
    assert report["trained_tokens"] < 1_000_000_000 and report["total_s_this_run"] < 15 + 10
    drafting = report["drafting"]
    assert drafting["prompts"] == report["data"]["heldout_sequences"] >= 1
    assert drafting["incremental"]["tokens_per_step"] == 1.0
    for setup in ("head-dynamic", "all-dynamic", "all-dynamic-mss"):
        assert drafting[setup]["tokens_per_step"] >= 1.0 and "feature" in drafting[setup]["drafters"]
    n = drafting["prompts"]
    assert drafting["head-dynamic"]["outputs_equal_incremental"] == drafting["all-dynamic"]["outputs_equal_incremental"] == f"{n}/{n}"
    before = (data / ANSWERS).read_text()
    # More prompts, the same data dir: the 40 answers are kept, only the new prompts are answered.
    grown = run("b", 60)
    assert (data / ANSWERS).read_text().startswith(before)
    manifest = json.loads((data / MANIFEST).read_text())
    assert [r["added"] for r in manifest["runs"]] == [40, 20] and grown["data"]["answered_prompts"] == 60
