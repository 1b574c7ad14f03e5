"""Host time per decode step: a tiny 32-layer model, so the step is almost all framework
overhead (Python, dispatch, copies), the part that does not shrink on a GPU.

    python -m specinfer_dist.bench.host_step --batch 1,16,64
    python -m specinfer_dist.bench.host_step --compare-with /tmp/old   # old checkout, side by side
    python -m specinfer_dist.bench.host_step --shape smollm2 --layers 30 --batch 1,16 --compare-with /tmp/old

``--compare-with`` runs this same file again with PYTHONPATH at another checkout (e.g.
``git worktree add /tmp/old <commit>``) and prints both and their ratio. Only APIs that both
have are used: an engine from parts and ``LocalVerifier(model)`` with default KV settings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import transformers

from specinfer_dist.engine.engine import LLMEngine
from specinfer_dist.models.transformer import Transformer
from specinfer_dist.runtime.sampling_params import SamplingParams
from specinfer_dist.runtime.verifier import LocalVerifier
from specinfer_dist.tree.spec import TreeSpec


SMOLLM2_135M = dict(  # the default LLM's config.json, so no download is needed
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def tiny_model(layers: int, shape: str = "tiny") -> Transformer:
    """``tiny``: a step that is almost all framework overhead; ``smollm2``: the default LLM's
    shape (random weights), where the step's matrix products count too."""
    if shape == "smollm2":
        config = transformers.LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers})
    else:
        config = transformers.LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        )
    torch.manual_seed(0)
    return Transformer(config).eval().requires_grad_(False)


def step_ms(model: Transformer, batch: int, prompt_len: int, steps: int) -> float:
    """Median wall time of an incremental decode step with ``batch`` requests running."""
    parts = dict(
        tokenizer=None, model_config=model.config, eos_ids=set(), verifier=LocalVerifier(model),
        drafters=[], spec=TreeSpec(), mode="incremental", verify="mss", max_num_seqs=batch,
    )
    # Older checkouts build an engine from parts with from_parts, newer ones with the constructor.
    engine = LLMEngine.from_parts(**parts) if hasattr(LLMEngine, "from_parts") else LLMEngine(**parts)
    gen = torch.Generator().manual_seed(1)
    params = SamplingParams(temperature=0, max_tokens=steps + 3, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(torch.randint(4, 256, (prompt_len,), generator=gen).tolist(), params)
    engine.step()  # the prompts
    engine.step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="1,16,64")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--shape", default="tiny", choices=("tiny", "smollm2"))
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--compare-with", help="another checkout's root: run it there too and print ratios")
    parser.add_argument("--json", action="store_true", help="print only the result as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = tiny_model(args.layers, args.shape)
    ours = {int(b): step_ms(model, int(b), args.prompt_len, args.steps) for b in args.batch.split(",")}
    if args.json:
        print(json.dumps(ours))
        return 0
    rows = {"this checkout": ours}
    if args.compare_with:
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])]
        i = cmd.index("--compare-with")
        del cmd[i : i + 2]
        env = {**os.environ, "PYTHONPATH": args.compare_with}
        out = subprocess.run([*cmd, "--json"], env=env, check=True, capture_output=True, text=True).stdout
        rows[args.compare_with] = {int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}
    print(f"ms per decode step, {args.shape} {args.layers}-layer model, prompt {args.prompt_len}, 1 thread")
    for name, row in rows.items():
        print(f"{name:>20}: " + "  ".join(f"batch {b}: {ms:7.2f}" for b, ms in row.items()))
    if args.compare_with:
        base = rows[args.compare_with]
        print(f"{'ratio new/old':>20}: " + "  ".join(f"batch {b}: {ours[b] / base[b]:7.2f}" for b in ours))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
