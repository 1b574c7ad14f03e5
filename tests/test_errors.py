"""Every user mistake gets one clear typed error (API) or one line and a non-zero exit (CLI)."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import fields

import pytest
import yaml
from helpers import make_tiny_checkpoint

from specinfer_dist import (
    InvalidConfigError,
    InvalidRequestError,
    LLMEngine,
    ModelLoadError,
    SamplingParams,
)
from specinfer_dist.cli import build_parser, main
from specinfer_dist.config import EngineConfig, load_config


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    llm = make_tiny_checkpoint(tmp, "llama", seed=1, max_position_embeddings=64)
    ssm = make_tiny_checkpoint(tmp, "llama", seed=2, num_hidden_layers=1, max_position_embeddings=64)
    other_vocab = make_tiny_checkpoint(tmp, "llama", seed=3, extra_tokens=["<extra>"])
    return {"llm": str(llm), "ssm": str(ssm), "other_vocab": str(other_vocab), "tmp": tmp}


@pytest.fixture(scope="module")
def engine(ckpts):
    return LLMEngine.load(ckpts["llm"], ssms=[ckpts["ssm"]], tree="1,1,3,1,1,1,1,1")


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
        LLMEngine.load(ckpts["llm"], ssms=[ckpts["ssm"]], tree=tree)


def test_big_tree_allowed_when_budget_raised(ckpts):
    engine = LLMEngine.load(ckpts["llm"], ssms=[ckpts["ssm"]], tree="4,4,4", tree_budget=84)
    assert engine.spec.num_tokens == 84


def test_bad_mode_and_missing_ssm(ckpts):
    with pytest.raises(InvalidConfigError):
        LLMEngine.load(ckpts["llm"], mode="beam")
    with pytest.raises(InvalidConfigError, match="needs at least one SSM"):
        LLMEngine.load(ckpts["llm"], mode="tree")
    with pytest.raises(InvalidConfigError, match="speculation_max_batch"):
        LLMEngine.load(ckpts["llm"], ssms=[ckpts["ssm"]], tree="1", speculation_max_batch=0)


def test_model_sources(ckpts):
    tmp = ckpts["tmp"]
    with pytest.raises(ModelLoadError):
        LLMEngine.load(str(tmp / "does-not-exist"))
    corrupt = make_tiny_checkpoint(tmp, "llama", seed=4)
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError):
        LLMEngine.load(str(corrupt))
    with pytest.raises(ModelLoadError, match="vocab"):
        LLMEngine.load(ckpts["llm"], ssms=[ckpts["other_vocab"]])


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
    lines = err.splitlines()  # start-up progress lines, then the error alone on the last one
    assert lines[-1].startswith("specinfer-dist: error: ") and "Traceback" not in err
    assert all(line.startswith("specinfer-dist: ") and "error" not in line for line in lines[:-1]), err


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


@pytest.mark.parametrize("option,value,flag", [
    ("tree", "1,x", "1,x"), ("tree_budget", 0, "0"), ("max_num_seqs", 0, "0"), ("speculation_max_batch", -1, "-1"),
    ("tuning_budget_s", -1, "-1"),
    ("tree", "4,4,4", "4,4,4"),  # over the default budget of 64
])
def test_bad_option_fails_first_with_one_message_everywhere(tmp_path, capsys, option, value, flag):
    """EngineConfig validates before anything loads (the LLM path here does not even exist),
    and the Python API, a YAML file and every subcommand's flag report the same message."""
    llm = str(tmp_path / "no-such-model")
    with pytest.raises(InvalidConfigError) as api:
        LLMEngine.load(llm, **{option: value})
    message = str(api.value)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"engine": {"llm": llm, option: value}}))
    with pytest.raises(InvalidConfigError, match=re.escape(message)):
        load_config(path)
    name = "--" + option.replace("_", "-")
    for command in (["generate", "--prompt", "hi"], ["bench"], ["tune-tree"], ["serve"]):
        for args in ([name, flag], ["--config", str(path)]):
            assert main([*command, "--llm", llm, *args]) == 2, command
            assert f"specinfer-dist: error: {message}" in capsys.readouterr().err, (command, args)


def test_every_engine_command_lists_the_same_engine_options():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    expected = {"--" + f.name.replace("_", "-") for f in fields(EngineConfig)} - {"--ssms", "--drafters", "--draft-vocab"}
    expected |= {"--ssm", "--drafter", "--full-draft-vocab"}
    for command in ("generate", "bench", "serve", "tune-tree"):
        flags = {s for a in subparsers[command]._actions for s in a.option_strings}
        assert expected <= flags, (command, expected - flags)
