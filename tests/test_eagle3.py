"""The EAGLE-3 head format (models/eagle3.py): the names and config fields vLLM/SGLang load, round-trips."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_tiny_checkpoint
from safetensors.torch import load_file, save_file

from specinfer_dist.errors import ModelLoadError
from specinfer_dist.models.eagle3 import default_aux_layers, load_eagle3, save_eagle3
from specinfer_dist.models.loader import load_model

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 64, 4, 2, 16, 96
DRAFT_IDS = [2, 5, 7, 11, 40, 41, 100, 259]


def published_checkpoint(path, vocab: int, bin_file: bool = False, with_embed: bool = True):
    """A head written the way SafeAILab / SpecForge releases are, with no help from our code."""
    path.mkdir()
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    state = {
        "fc.weight": rand(HIDDEN, 3 * HIDDEN),
        "midlayer.input_layernorm.weight": rand(HIDDEN),
        "midlayer.hidden_norm.weight": rand(HIDDEN),
        "midlayer.post_attention_layernorm.weight": rand(HIDDEN),
        "midlayer.self_attn.q_proj.weight": rand(HEADS * HEAD_DIM, 2 * HIDDEN),
        "midlayer.self_attn.k_proj.weight": rand(KV_HEADS * HEAD_DIM, 2 * HIDDEN),
        "midlayer.self_attn.v_proj.weight": rand(KV_HEADS * HEAD_DIM, 2 * HIDDEN),
        "midlayer.self_attn.o_proj.weight": rand(HIDDEN, HEADS * HEAD_DIM),
        "midlayer.mlp.gate_proj.weight": rand(INTER, HIDDEN),
        "midlayer.mlp.up_proj.weight": rand(INTER, HIDDEN),
        "midlayer.mlp.down_proj.weight": rand(HIDDEN, INTER),
        "norm.weight": rand(HIDDEN),
        "lm_head.weight": rand(len(DRAFT_IDS), HIDDEN),
        "d2t": torch.tensor(DRAFT_IDS) - torch.arange(len(DRAFT_IDS)),
        "t2d": torch.zeros(vocab, dtype=torch.bool).index_fill_(0, torch.tensor(DRAFT_IDS), True),
    }
    if with_embed:
        state["embed_tokens.weight"] = rand(vocab, HIDDEN)
    config = {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": HIDDEN, "intermediate_size": INTER, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "num_hidden_layers": 1, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 256, "vocab_size": vocab, "draft_vocab_size": len(DRAFT_IDS),
        "target_hidden_size": HIDDEN, "tie_word_embeddings": False, "torch_dtype": "float32",
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 2, 3], "use_aux_hidden_state": True},
    }
    (path / "config.json").write_text(json.dumps(config))
    if bin_file:
        torch.save(state, path / "pytorch_model.bin")
    else:
        save_file(state, path / "model.safetensors")
    return state


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    llm_dir = make_tiny_checkpoint(tmp_path_factory.mktemp("llm"), "llama", num_hidden_layers=5)
    return load_model(str(llm_dir))[0]


@pytest.mark.parametrize("bin_file", [False, True])
def test_published_head_loads_and_round_trips(llm, tmp_path, bin_file):
    state = published_checkpoint(tmp_path / "pub", llm.config.vocab_size, bin_file)
    head = load_eagle3(tmp_path / "pub", llm)
    # SGLang's eagle_config names layer outputs; we capture the residual entering layer i (vLLM's ids).
    assert head.aux_layers == [1, 3, 4]
    mine = head.state_dict()
    assert set(mine) == set(state)
    for name, tensor in state.items():
        assert torch.equal(mine[name], tensor), name
    assert head.draft_ids.tolist() == DRAFT_IDS
    out = save_eagle3(head, tmp_path / "ours")
    saved = load_file(out / "model.safetensors")
    assert set(saved) == set(state)  # the names other engines load
    again = load_eagle3(out, llm)
    for name, tensor in state.items():
        assert torch.equal(again.state_dict()[name], tensor), name
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["draft_vocab_size"] == len(DRAFT_IDS) and config["target_hidden_size"] == HIDDEN
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 2, 3]
    assert again.aux_layers == head.aux_layers


def test_target_logits_map_the_draft_vocabulary(llm, tmp_path):
    published_checkpoint(tmp_path / "pub", llm.config.vocab_size)
    head = load_eagle3(tmp_path / "pub", llm)
    out = torch.randn(3, HIDDEN)
    draft, full = head.draft_logits(out), head.target_logits(out)
    assert torch.equal(full[:, DRAFT_IDS], draft)
    outside = torch.ones(llm.config.vocab_size, dtype=torch.bool)
    outside[DRAFT_IDS] = False
    assert torch.isinf(full[:, outside]).all()


def test_missing_embedding_comes_from_the_llm_and_shared_head_is_its_draft_rows(llm, tmp_path):
    published_checkpoint(tmp_path / "pub", llm.config.vocab_size, with_embed=False)
    head = load_eagle3(tmp_path / "pub", llm)
    assert head.embed_tokens.weight is llm.model.embed_tokens.weight
    with pytest.raises(ModelLoadError, match="from its LLM"):
        load_eagle3(tmp_path / "pub")
    out = save_eagle3(head, tmp_path / "shared", shared=["embed_tokens.weight", "lm_head.weight"])
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    again = load_eagle3(out, llm)
    assert torch.equal(again.lm_head.weight, llm.lm_head.weight[DRAFT_IDS])


def test_shared_tensors_are_read_for_an_llm_loaded_without_weights(tmp_path):
    # A process that only drafts (the Ray coordinator) holds the LLM on the meta device: the head
    # reads just the tensors it shares from the LLM's checkpoint, and equals the head loaded beside the LLM.
    llm_dir = make_tiny_checkpoint(tmp_path, "llama", num_hidden_layers=5)
    full = load_model(str(llm_dir))[0]
    published_checkpoint(tmp_path / "pub", full.config.vocab_size, with_embed=False)
    shared = save_eagle3(load_eagle3(tmp_path / "pub", full), tmp_path / "shared",
                         shared=["embed_tokens.weight", "lm_head.weight"])
    meta = load_model(str(llm_dir), weights=False)[0]
    head = load_eagle3(shared, meta, device="cpu")
    held = {name for name, p in meta.named_parameters() if not p.is_meta}
    assert held == {"model.embed_tokens.weight", "lm_head.weight"}
    assert head.embed_tokens.weight is meta.model.embed_tokens.weight
    want = load_eagle3(shared, full).state_dict()
    for name, tensor in head.state_dict().items():
        assert tensor.device.type == "cpu" and torch.equal(tensor, want[name]), name


def test_default_aux_layers():
    assert default_aux_layers(32) == [2, 16, 29]
    assert default_aux_layers(30) == [2, 15, 27]  # SmolLM2-135M


@pytest.mark.parametrize("edit,message", [
    (lambda c, s: c.update(target_hidden_size=32), "hidden size"),
    (lambda c, s: s.pop("fc.weight"), "missing tensors"),
    (lambda c, s: c.update(num_hidden_layers=2), "num_hidden_layers"),
    (lambda c, s: c.update(architectures=["LlamaForCausalLM"]), "no config.json"),
    (lambda c, s: c["eagle_config"].update(eagle_aux_hidden_state_layer_ids=[0, 2, 9]), "aux layers"),
])
def test_bad_checkpoints_are_one_line_errors(llm, tmp_path, edit, message):
    published_checkpoint(tmp_path / "pub", llm.config.vocab_size)
    config = json.loads((tmp_path / "pub" / "config.json").read_text())
    state = load_file(tmp_path / "pub" / "model.safetensors")
    edit(config, state)
    (tmp_path / "pub" / "config.json").write_text(json.dumps(config))
    save_file(state, tmp_path / "pub" / "model.safetensors")
    with pytest.raises(ModelLoadError, match=message):
        load_eagle3(tmp_path / "pub", llm)
