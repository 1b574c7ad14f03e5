"""Generation defaults (vLLM's ``--generation-config auto``): a request that leaves temperature,
top_p or top_k unset gets the model's generation_config.json values, else OpenAI's."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from exactness import assert_greedy_equal, hf_greedy
from helpers import make_tiny_checkpoint

from specinfer_dist import LLMEngine, SamplingParams
from specinfer_dist.cli import main
from specinfer_dist.engine.builder import sampling_defaults
from specinfer_dist.models.default import SAMPLING_DEFAULTS

PROMPT = [5, 17, 42, 9, 88, 23]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("gen"), "llama", seed=1)
    config = json.loads((path / "generation_config.json").read_text())
    # The authors ask for near-greedy sampling with a nucleus: temperature 0 makes it checkable.
    config.update(do_sample=True, temperature=0.0, top_p=0.5, top_k=7)
    (path / "generation_config.json").write_text(json.dumps(config))
    return path


def test_model_defaults_fill_unset_fields_only(llm):
    engine = LLMEngine.load(str(llm), mode="incremental")
    assert engine.sampling_defaults == {"temperature": 0.0, "top_p": 0.5, "top_k": 7}
    seq = engine.new_sequence(PROMPT, SamplingParams(max_tokens=4, top_k=3))
    assert (seq.params.temperature, seq.params.top_p, seq.params.top_k) == (0.0, 0.5, 3)  # set fields win
    hf = transformers.AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32).eval()
    [out] = engine.generate(PROMPT, SamplingParams(max_tokens=12, ignore_eos=True))  # no sampling fields
    assert_greedy_equal(hf, PROMPT, out.token_ids, hf_greedy(hf, PROMPT, 12))


def test_generation_config_none_gives_openai_defaults(llm):
    engine = LLMEngine.load(str(llm), mode="incremental", generation_config="none")
    assert engine.sampling_defaults == {}
    seq = engine.new_sequence(PROMPT, SamplingParams(max_tokens=4))
    assert (seq.params.temperature, seq.params.top_p, seq.params.top_k) == (1.0, 1.0, 0)
    # Unseeded temperature-1 sampling over a random model: outputs vary.
    outs = engine.generate([PROMPT] * 8, SamplingParams(max_tokens=12, ignore_eos=True))
    assert len({tuple(o.token_ids) for o in outs}) > 1


def test_cli_uses_model_defaults_and_can_turn_them_off(llm, capsys):
    assert main(["generate", "--llm", str(llm), "--prompt", "hello", "--max-tokens", "6", "--ignore-eos", "--json",
                 "--mode", "incremental"]) == 0
    greedy = json.loads(capsys.readouterr().out)
    assert greedy["verify"] == "greedy"  # the model's temperature 0
    assert main(["generate", "--llm", str(llm), "--prompt", "hello", "--max-tokens", "6", "--json",
                 "--mode", "incremental", "--generation-config", "none"]) == 0
    assert json.loads(capsys.readouterr().out)["verify"] == "mss"


def test_default_model_ships_its_authors_sampling(tmp_path):
    # What models/default.py writes into the converted checkpoint, read as the engine reads it.
    (tmp_path / "generation_config.json").write_text(json.dumps(SAMPLING_DEFAULTS))
    assert sampling_defaults(tmp_path) == {"temperature": 0.2, "top_p": 0.9}
