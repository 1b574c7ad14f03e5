"""Offline GPU benchmark: random-weight Llama shapes, a verify-cost sweep, and speculation with
a synthetic drafter of set acceptance rate. Nothing is downloaded, so it runs on a machine
with no network; it finishes in a few minutes on one H100/H200.

    python -m specinfer_dist.bench.synthetic --shapes 1b,7b --out DIR      # on a GPU (bf16)
    python -m specinfer_dist.bench.synthetic --shapes tiny --out DIR       # smoke run on a CPU

The synthetic drafter proposes, at every depth, the LLM's own greedy continuation with
probability ``alpha`` (else a wrong token), so acceptance is controlled while the LLM, the
tree verification and the engine's overheads are all real.

Invariants that keep the numbers honest:

- The random LLM has a decisive argmax, so bf16 rounding (which differs between a one-token
  decode and a tree forward) never flips it: the embedding is N(0, 1), every layer's weights
  are small (each block adds little to the residual stream), and the head is a scaled
  permutation of the embedding, so the next token is perm^-1(current) by a margin of about
  sqrt(hidden) standard deviations. A plain random head has flat logits (median top-2 gap
  0.002) and its acceptance collapses in bf16.
- Realised acceptance is reported per row and checked: the engine's accepted drafts per
  drafted try (the tries along the reference path, counted by the drafter) must equal the
  drafter's own hit rate within ``ACCEPTANCE_TOLERANCE``, else the run fails (exit 1).
- Each engine is warmed up before it is timed; timers synchronise the device; the model is
  built in its dtype directly on the device; peak device memory is reported.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate import init_empty_weights
from torch import nn

from specinfer_dist.drafters.base import Drafter, DraftRequest, draft_generator
from specinfer_dist.engine.engine import LLMEngine
from specinfer_dist.models.loader import parse_dtype
from specinfer_dist.models.transformer import Transformer
from specinfer_dist.runtime.device import default_dtype, machine, resolve_device
from specinfer_dist.runtime.sampling_params import SamplingParams
from specinfer_dist.runtime.verifier import LocalVerifier
from specinfer_dist.tree.spec import TreeSpec
from specinfer_dist.tree.token_tree import TokenTree
from specinfer_dist.tuning.tree_cost import SWEEP_SIZES, forward_cost

ACCEPTANCE_TOLERANCE = 0.05
VOCAB = 32000
SHAPES = {  # Llama-family shapes (vocab 32000)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
}


class SyntheticDrafter(Drafter):
    """Proposes the reference continuation with probability ``alpha`` per node (the first child
    of each node); other children and misses are wrong tokens. Point masses, so exact for MSS.
    ``references`` maps a prompt (its first ``prompt_len`` tokens) to prompt + the LLM's greedy
    output. Counts its tries along the reference path and its hits there (``reset`` clears)."""

    def __init__(self, spec: TreeSpec, alpha: float, references: dict[tuple[int, ...], list[int]], prompt_len: int) -> None:
        super().__init__(f"synthetic-{alpha}", spec)
        self.alpha, self.references, self.prompt_len = alpha, references, prompt_len
        self.generators: dict[int, torch.Generator] = {}
        self.reset()

    def reset(self) -> None:
        self.tries = self.hits = 0

    def propose(self, requests: list[DraftRequest], max_depths: list[int]) -> list[TokenTree]:
        trees = []
        for request, max_depth in zip(requests, max_depths):
            gen = self.generators.setdefault(request.request_id, draft_generator(request.params, self.name))
            reference = self.references[tuple(request.tokens[: self.prompt_len])]
            tree = TokenTree.from_root(request.tokens[-1])
            frontier = [(0, len(request.tokens), True)]  # (node, its next token's position, on the reference path)
            for width in self.spec.widths[: max(0, max_depth)]:
                grown = []
                for node, pos, on_path in frontier:
                    truth = reference[pos] if pos < len(reference) else 0
                    hit = float(torch.rand((), generator=gen)) < self.alpha
                    if on_path:  # verification reaches this draw only along the reference path
                        self.tries += 1
                        self.hits += hit
                    for child in range(width):
                        token = truth if child == 0 and hit else (truth + 1 + child) % VOCAB
                        grown.append((tree.add(node, token), pos + 1, on_path and child == 0 and hit))
                frontier = grown
            trees.append(tree)
        return trees

    def release(self, request_id: int) -> None:
        self.generators.pop(request_id, None)


@torch.no_grad()
def random_llm(shape: str, device: torch.device, dtype: torch.dtype) -> Transformer:
    """A random Llama of ``shape`` built in ``dtype`` directly on ``device`` (see module docstring)."""
    config = transformers.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, **SHAPES[shape])
    with init_empty_weights(include_buffers=False):  # buffers (RoPE) computed on the CPU, in fp32
        model = Transformer(config)
    for name, p in list(model.named_parameters()):
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device)))
    model.to(device)  # the buffers
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = config.hidden_size
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif "embed_tokens" in name:
            p.normal_(0, 1, generator=gen)
        elif p.dim() == 2:  # each block adds ~1% to the residual: the embedding's direction survives every layer
            p.normal_(0, 0.1 / math.sqrt(p.shape[1]), generator=gen)
        else:
            p.zero_()
    perm = torch.randperm(VOCAB, generator=gen, device=device)
    model.lm_head.weight.copy_(model.model.embed_tokens.weight[perm] / math.sqrt(hidden))
    return model.eval().requires_grad_(False)


def engine_for(model: Transformer, drafters: list[Drafter], spec: TreeSpec, mode: str, batch: int) -> LLMEngine:
    return LLMEngine(
        tokenizer=None, model_config=model.config, eos_ids=set(), verifier=LocalVerifier(model),
        drafters=drafters, spec=spec, mode=mode, verify="mss", max_num_seqs=batch,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_generation(engine: LLMEngine, prompts: list[list[int]], max_tokens: int, device: torch.device) -> dict[str, Any]:
    """Warm up (a short run), then time a greedy run of every prompt. The seed only fixes the
    synthetic drafter's hit/miss draws, so runs repeat exactly."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, seed=0)
    engine.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, seed=0))
    for drafter in engine.drafters:
        drafter.reset()
    _sync(device)
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    _sync(device)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    row: dict[str, Any] = {
        "tokens_per_s": tokens / elapsed, "tokens_per_step": tokens / sum(o.stats.steps for o in outs),
        "ms_per_token_per_request": 1000 * elapsed * len(prompts) / tokens,
    }
    if engine.drafters:
        [drafter] = engine.drafters
        accepted = sum(o.stats.accepted_tokens for o in outs)
        row["configured_alpha"] = drafter.alpha
        row["drafter_hit_rate"] = drafter.hits / drafter.tries
        row["realised_acceptance"] = accepted / drafter.tries
        row["acceptance_ok"] = abs(row["realised_acceptance"] - row["drafter_hit_rate"]) <= ACCEPTANCE_TOLERANCE
    return row, [o.token_ids for o in outs]


def bench_shape(shape: str, device: torch.device, dtype: torch.dtype, max_tokens: int, prompt_len: int) -> dict[str, Any]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = random_llm(shape, device, dtype)
    result: dict[str, Any] = {"verify_cost_s": {c: forward_cost(model, SWEEP_SIZES, c) for c in (512, 2048)}}
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 8):
        prompts = [torch.randint(VOCAB, (prompt_len,), generator=gen).tolist() for _ in range(batch)]
        base, outputs = run_generation(engine_for(model, [], TreeSpec(), "incremental", batch), prompts, max_tokens, device)
        # The reference the drafter copies is the LLM's own greedy output for these prompts.
        references = {tuple(p): p + o for p, o in zip(prompts, outputs)}
        rows = {"incremental": base}
        for alpha in (0.6, 0.8):
            for name, widths in (("sequence", (1,) * 6), ("tree", (2, 2, 1, 1, 1, 1))):
                spec = TreeSpec(widths)
                drafter = SyntheticDrafter(spec, alpha, references, prompt_len)
                row, _ = run_generation(engine_for(model, [drafter], spec, name, batch), prompts, max_tokens, device)
                row["speedup_vs_incremental"] = row["tokens_per_s"] / base["tokens_per_s"]
                rows[f"{name}-alpha{alpha}"] = row
        result[f"batch{batch}"] = rows
    if device.type == "cuda":
        result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1b,7b")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--out", default="bench-out/gpu")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: bfloat16 on CUDA, float32 on CPU")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    dtype = parse_dtype(args.dtype or default_dtype(device))
    results: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "device": str(device),
                               "dtype": str(dtype)}
    ok = True
    for shape in args.shapes.split(","):
        results[shape] = bench_shape(shape, device, dtype, args.max_tokens, args.prompt_len)
        print(json.dumps({shape: results[shape]}, indent=1), flush=True)
        for batch in ("batch1", "batch8"):
            for name, row in results[shape][batch].items():
                if not row.get("acceptance_ok", True):
                    ok = False
                    print(f"{shape} {batch} {name}: realised acceptance {row['realised_acceptance']:.3f} vs the "
                          f"drafter's hit rate {row['drafter_hit_rate']:.3f}: off by more than {ACCEPTANCE_TOLERANCE}")
    results["acceptance_ok"] = ok
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
