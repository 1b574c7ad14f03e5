"""Peak host memory of loading one tensor-parallel rank: today's sliced loader vs the old path.

    python -m specinfer_dist.bench.load_memory --dir /tmp/llama-1.6b --tp 3 --out docs/bench/cpu/load

Writes (once) a Llama-shaped random checkpoint of about 1.6B parameters in bf16 safetensors to
``--dir``, then loads every rank in its own fresh process, one process at a time, by each path:

- ``sliced``: ``load_model(..., sharding=TensorParallel(rank, tp))`` (meta device, this rank's
  slices read from safetensors in the target dtype);
- ``old``: what the loader did before: build in fp32 on the host, read the whole state dict,
  cast, then cut the shard (``shard_model``);
- ``draft``: a draft worker's LLM (``weights=False``: config and tokenizer only).

For each it reports the process's peak RSS (``ru_maxrss``), the RSS after imports, and the
bytes of parameters the rank keeps; ``sliced`` passes if peak <= own slice + 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

GIB = 1 << 30
BUDGET_OVER_SLICE = 1 * GIB
# hidden 2304 = 18 heads of 128, 6 KV heads, intermediate 6144: all divisible by 1, 2, 3 and 6.
SHAPE = dict(vocab_size=32000, hidden_size=2304, intermediate_size=6144, num_hidden_layers=26,
             num_attention_heads=18, num_key_value_heads=6, max_position_embeddings=4096, tie_word_embeddings=False)
LAYERS_PER_FILE = 4


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def make_checkpoint(path: Path) -> None:
    """A random Llama checkpoint in bf16, in several safetensors files, with a tokenizer."""
    import safetensors.torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from specinfer_dist.models.transformer import Transformer

    if (path / "config.json").is_file():
        return
    path.mkdir(parents=True, exist_ok=True)
    config = transformers.LlamaConfig(**SHAPE)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    files: dict[str, dict[str, torch.Tensor]] = {}
    for name, shape in shapes.items():
        group = int(name.split(".")[2]) // LAYERS_PER_FILE if name.startswith("model.layers.") else "rest"
        files.setdefault(f"model-{group}.safetensors", {})[name] = (
            torch.randn(shape, generator=gen, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
            if len(shape) > 1 else torch.ones(shape, dtype=torch.bfloat16)
        )
    for file, tensors in files.items():
        safetensors.torch.save_file(tensors, path / file)
    words = ["<unk>", *(f"w{i}" for i in range(1, SHAPE["vocab_size"]))]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)
    config.save_pretrained(path)


def _old_path(model_dir: Path, dtype: torch.dtype, rank: int, tp: int):
    """The loader before sharded loading (kept here only as the baseline being compared)."""
    import safetensors.torch
    import transformers

    from specinfer_dist.distributed.tp import shard_model
    from specinfer_dist.models.transformer import Transformer

    model = Transformer(transformers.AutoConfig.from_pretrained(model_dir))
    state: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(safetensors.torch.load_file(f))
    model.load_state_dict(state)
    del state
    return shard_model(model.to(dtype), rank, tp)


def child(path: str, model_dir: Path, dtype: torch.dtype, rank: int, tp: int) -> dict[str, float]:
    from specinfer_dist.distributed.tp import TensorParallel
    from specinfer_dist.models.loader import load_model

    after_imports = _rss()
    start = time.perf_counter()
    if path == "sliced":
        model = load_model(str(model_dir), dtype=dtype, progress=False, sharding=TensorParallel(rank, tp))[0]
    elif path == "old":
        model = _old_path(model_dir, dtype, rank, tp)
    else:
        model = load_model(str(model_dir), dtype=dtype, progress=False, weights=False)[0]
    seconds = time.perf_counter() - start
    params = {p.data_ptr(): p for p in model.parameters() if not p.is_meta}.values()
    kept = sum(p.numel() * p.element_size() for p in params)
    return {"peak_rss_gib": _peak_rss() / GIB, "rss_after_imports_gib": after_imports / GIB,
            "own_slice_gib": kept / GIB, "load_s": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/specinfer-llama-1.6b", help="checkpoint (written if missing)")
    parser.add_argument("--tp", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--paths", default="sliced,old,draft")
    parser.add_argument("--out", default=None, help="directory for results.json")
    parser.add_argument("--child", nargs=2, metavar=("PATH", "RANK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from specinfer_dist.models.loader import parse_dtype

    dtype, model_dir = parse_dtype(args.dtype), Path(args.dir)
    torch.set_num_threads(1)
    if args.child:
        print(json.dumps(child(args.child[0], model_dir, dtype, int(args.child[1]), args.tp)))
        return 0
    make_checkpoint(model_dir)
    checkpoint_gib = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / GIB
    results: dict = {"checkpoint_gib": checkpoint_gib, "tp": args.tp, "dtype": args.dtype,
                     "machine": "CPU (host memory)", "runs": {}}
    ok = True
    for path in args.paths.split(","):
        ranks = [0] if path == "draft" else range(args.tp)
        for rank in ranks:
            cmd = [sys.executable, "-m", "specinfer_dist.bench.load_memory", "--dir", str(model_dir), "--tp",
                   str(args.tp), "--dtype", args.dtype, "--child", path, str(rank)]
            row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            if path == "sliced":
                row["within_budget"] = row["peak_rss_gib"] * GIB <= row["own_slice_gib"] * GIB + BUDGET_OVER_SLICE
                ok &= row["within_budget"]
            results["runs"][f"{path}/rank{rank}"] = row
            print(f"{path:7s} rank {rank}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                                     for k, v in row.items()), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
