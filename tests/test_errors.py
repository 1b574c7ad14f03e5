"""Every user mistake gets one clear typed error (API) or one line and a non-zero exit (CLI)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import make_tiny_checkpoint

from specinfer_dist import (
    InvalidConfigError,
    InvalidRequestError,
    LLMEngine,
    ModelLoadError,
    SamplingParams,
)
from specinfer_dist.cli import main


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    llm = make_tiny_checkpoint(tmp, "llama", seed=1, max_position_embeddings=64)
    ssm = make_tiny_checkpoint(tmp, "llama", seed=2, num_hidden_layers=1, max_position_embeddings=64)
    other_vocab = make_tiny_checkpoint(tmp, "llama", seed=3, extra_tokens=["<extra>"])
    return {"llm": str(llm), "ssm": str(ssm), "other_vocab": str(other_vocab), "tmp": tmp}


@pytest.fixture(scope="module")
def engine(ckpts):
    return LLMEngine(ckpts["llm"], ssms=[ckpts["ssm"]])


@pytest.mark.parametrize("prompt", ["", [[]], [""], [1, -1], [1, 10_000], [1, "a"]])
def test_bad_prompts(engine, prompt):
    with pytest.raises(InvalidRequestError):
        engine.generate(prompt, SamplingParams(temperature=0, max_tokens=4))


def test_bad_prompt_in_a_batch_leaves_the_engine_clean(engine):
    with pytest.raises(InvalidRequestError):
        engine.generate([[5, 6, 7], []], SamplingParams(temperature=0, max_tokens=4))
    assert not engine.scheduler.has_unfinished()
    [out] = engine.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out.token_ids) == 4


def test_prompt_plus_max_tokens_beyond_context(engine):
    with pytest.raises(InvalidRequestError, match="context of 64"):
        engine.generate([5] * 60, SamplingParams(temperature=0, max_tokens=5))
    # At the limit exactly, it runs (and the tree is clipped so no position overflows).
    [out] = engine.generate([5] * 60, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out.token_ids) == 4


@pytest.mark.parametrize("kwargs", [{"max_tokens": 0}, {"max_tokens": -3}, {"max_tokens": "8"}, {"stop": [""]}])
def test_bad_sampling_params(kwargs):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**kwargs)


def test_params_list_must_match_prompts(engine):
    with pytest.raises(InvalidRequestError):
        engine.generate(["a", "b"], [SamplingParams()])


@pytest.mark.parametrize("tree", ["0,1", "1,-2", "x", "", "4,4,4"])
def test_bad_tree(ckpts, tree):
    with pytest.raises(InvalidConfigError):
        LLMEngine(ckpts["llm"], ssms=[ckpts["ssm"]], tree=tree)


def test_big_tree_allowed_when_budget_raised(ckpts):
    engine = LLMEngine(ckpts["llm"], ssms=[ckpts["ssm"]], tree="4,4,4", tree_budget=84)
    assert engine.spec.num_tokens == 84


def test_bad_mode_and_missing_ssm(ckpts):
    with pytest.raises(InvalidConfigError):
        LLMEngine(ckpts["llm"], mode="beam")
    with pytest.raises(InvalidConfigError, match="needs at least one SSM"):
        LLMEngine(ckpts["llm"], mode="tree")
    with pytest.raises(InvalidConfigError, match="speculation_max_batch"):
        LLMEngine(ckpts["llm"], ssms=[ckpts["ssm"]], tree="1", speculation_max_batch=0)


def test_model_sources(ckpts):
    tmp = ckpts["tmp"]
    with pytest.raises(ModelLoadError):
        LLMEngine(str(tmp / "does-not-exist"))
    corrupt = make_tiny_checkpoint(tmp, "llama", seed=4)
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError):
        LLMEngine(str(corrupt))
    with pytest.raises(ModelLoadError, match="vocab"):
        LLMEngine(ckpts["llm"], ssms=[ckpts["other_vocab"]])


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "extra",
    [
        ["--prompt", ""],
        ["--prompt", "hi", "--tree", "1,0"],
        ["--prompt", "hi", "--tree", "9,9"],
        ["--prompt", "hi", "--max-tokens", "0"],
        ["--prompt", "hi", "--max-tokens", "500"],
        ["--prompt", "hi", "--ssm", "OTHER"],
        ["--prompt", "hi", "--llm", "/nonexistent/model"],
        ["--prompt", "hi", "--chat"],  # the tiny tokenizer has no chat template
    ],
)
def test_cli_errors_are_one_line_and_nonzero(ckpts, capsys, extra):
    args = ["generate", "--llm", ckpts["llm"], "--ssm", ckpts["ssm"], "--tree", "1,2"] + extra  # extra's --tree wins
    args = [ckpts["other_vocab"] if a == "OTHER" else a for a in args]
    code, out, err = run_cli(args, capsys)
    assert code == 2
    assert out == ""
    assert err.startswith("specinfer-dist: error: ") and "Traceback" not in err


def test_cli_json_output(ckpts, capsys):
    code, out, _ = run_cli(
        ["generate", "--llm", ckpts["llm"], "--ssm", ckpts["ssm"], "--prompt", "hello", "--max-tokens", "6",
         "--ignore-eos", "--json"],
        capsys,
    )
    assert code == 0
    result = json.loads(out)
    for key in ("text", "token_ids", "finish_reason", "steps", "accepted_tokens", "tokens_per_step"):
        assert key in result
    assert len(result["token_ids"]) == 6 and result["finish_reason"] == "length"


def test_installed_cli_reports_bad_model_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "specinfer_dist.cli", "generate", "--prompt", "x", "--llm", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "error:" in proc.stderr
