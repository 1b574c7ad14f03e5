"""Tiny random checkpoints in Hugging Face format, for tests that need a real model directory."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3

_CONFIGS = {
    "llama": transformers.LlamaConfig,
    "qwen2": transformers.Qwen2Config,
    "mistral": transformers.MistralConfig,
    "qwen3": transformers.Qwen3Config,
    "gemma2": transformers.Gemma2Config,
    "gemma3_text": transformers.Gemma3TextConfig,
    "phi3": transformers.Phi3Config,
}


def make_tiny_tokenizer(extra_tokens: Sequence[str] = ()) -> transformers.PreTrainedTokenizerFast:
    """Byte-level tokenizer: 4 specials, then the 256 bytes, then `extra_tokens`.

    It encodes any text (one token per UTF-8 byte) and decodes it back exactly. There are no
    merges, so `extra_tokens` are vocabulary entries that encoding never produces (useful to
    make two vocabularies differ).
    """
    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    assert len(byte_chars) == 256
    tokens = [*SPECIAL_TOKENS, *sorted(byte_chars), *extra_tokens]
    assert len(set(tokens)) == len(tokens), "extra_tokens must be new (multi-character) tokens"
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>",
    )


def make_word_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A tokenizer of exactly ``vocab_size`` tokens (4 specials, then "w4", "w5", ...): for
    tiny-vocabulary models whose output distributions can be enumerated."""
    words = [*SPECIAL_TOKENS, *(f"w{i}" for i in range(len(SPECIAL_TOKENS), vocab_size))]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def make_tiny_checkpoint(
    tmp_path: Path,
    arch: str = "llama",
    vocab_size: int | None = None,
    seed: int = 0,
    extra_tokens: Sequence[str] = (),
    word_vocab: int | None = None,
    **overrides: Any,
) -> Path:
    """Write config.json + model.safetensors + tokenizer of a tiny random `arch` model.

    Returns a fresh directory under `tmp_path`. `vocab_size` defaults to the tokenizer's size
    (it may be larger, like real models that pad their embedding matrix). `overrides` go into
    the config (e.g. num_hidden_layers=3, tie_word_embeddings=True). ``word_vocab`` swaps in a
    word-level tokenizer of that many tokens (see make_word_tokenizer).
    """
    tokenizer = make_word_tokenizer(word_vocab) if word_vocab else make_tiny_tokenizer(extra_tokens)
    vocab_size = len(tokenizer) if vocab_size is None else vocab_size
    assert vocab_size >= len(tokenizer), "model vocab must cover every tokenizer id"
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        unk_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    config = _CONFIGS[arch](**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = Path(tempfile.mkdtemp(dir=tmp_path, prefix=f"tiny-{arch}-"))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
