"""Offline GPU benchmark: random-weight Llama shapes, a verify-cost sweep, speculation with a
synthetic drafter of set acceptance rate, CUDA graphs on and off, Hugging Face ``generate()``
on the same weights, and the weight-read floor. Nothing is downloaded, so it runs on a machine
with no network.

    python -m specinfer_dist.bench.synthetic --shapes 1b,llama3-8b --out DIR   # on a GPU (bf16)
    python -m specinfer_dist.bench.synthetic --shapes tiny --out DIR           # smoke run on a CPU

The synthetic drafter proposes, at every depth, the LLM's own greedy continuation with
probability ``alpha`` (else a wrong token), so acceptance is controlled while the LLM, the
tree verification and the engine's overheads are all real. Rows per shape and batch:
``incremental`` (CUDA graphs, the default), ``incremental-eager`` (``enforce_eager``: no graphs;
the same code on a CPU), ``sequence-alphaA`` / ``tree-alphaA`` (``--tree-widths``; the sequence
has its depth), and ``hf_generate`` (greedy ``generate()`` of ``transformers.LlamaForCausalLM``
holding our very tensors, one batched call of the same equal-length prompts, no padding).

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
- Outputs are compared token for token: every row of ours with incremental decoding
  (``outputs_equal_incremental``) and incremental decoding with HF greedy (``outputs_equal_hf``).
  In float32 a difference fails the run; in bf16 it is reported (kernels round differently).
- Each engine and HF are warmed up on the very batch they are timed on (CUDA graphs are
  captured per batch bucket, so a smaller warm-up would leave captures in the timed run);
  timers synchronise the device; the model is built in its dtype directly on the device;
  peak device memory is reported.
- Weight-read floor: a decode step reads every weight once, so no batch-1 step beats
  (bytes of the parameters in the model dtype) / (memory bandwidth). The lm_head counts once
  even when tied; the embedding table does not count unless tied (a step reads a few rows).
  Bandwidth is measured in the same run: a large device-to-device copy, bytes read + written
  over time (best of a few timings). ``floor_ratio`` = ms per token per request / floor ms;
  batch-1 ``incremental``'s is the shape's ``distance_to_floor``.

Time: the default run (``--shapes 1b,llama3-8b``, HF rows included) took 143 s on an H200 on
2026-12-04, process start and graph captures included (``seconds`` per shape is recorded:
1b 26 s, llama3-8b 29 s; the rest ran outside those timers).
"""

from __future__ import annotations

import argparse
import copy
import gc
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
VERIFY_CONTEXTS = (512, 2048)
SHAPES: dict[str, dict[str, Any]] = {  # Llama-family shapes (LlamaConfig keyword arguments)
    "tiny": dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4),
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
}


class SyntheticDrafter(Drafter):
    """Proposes the reference continuation with probability ``alpha`` per node (the first child
    of each node); other children and misses are wrong tokens (of ``vocab``). Point masses, so
    exact for MSS. ``references`` maps a prompt (its first ``prompt_len`` tokens) to prompt + the
    LLM's greedy output. Counts its tries along the reference path and its hits there (``reset``
    clears)."""

    def __init__(
        self, spec: TreeSpec, alpha: float, references: dict[tuple[int, ...], list[int]], prompt_len: int, vocab: int
    ) -> None:
        super().__init__(f"synthetic-{alpha}", spec)
        self.alpha, self.references, self.prompt_len, self.vocab = alpha, references, prompt_len, vocab
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
                        token = truth if child == 0 and hit else (truth + 1 + child) % self.vocab
                        grown.append((tree.add(node, token), pos + 1, on_path and child == 0 and hit))
                frontier = grown
            trees.append(tree)
        return trees

    def release(self, request_id: int) -> None:
        self.generators.pop(request_id, None)


@torch.no_grad()
def random_llm(shape: str, device: torch.device, dtype: torch.dtype) -> Transformer:
    """A random Llama of ``shape`` built in ``dtype`` directly on ``device`` (see module docstring)."""
    config = transformers.LlamaConfig(max_position_embeddings=4096, **SHAPES[shape])
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
    perm = torch.randperm(config.vocab_size, generator=gen, device=device)
    model.lm_head.weight.copy_(model.model.embed_tokens.weight[perm] / math.sqrt(hidden))
    return model.eval().requires_grad_(False)


def weight_bytes(model: Transformer) -> int:
    """Bytes a decode step reads: every parameter once (tied ones once), the embedding table only if tied."""
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters()  # deduplicates tied tensors
               if tied or name != "model.embed_tokens.weight")


def memory_bandwidth(device: torch.device, copies: int = 10, trials: int = 3) -> float:
    """Bytes per second of a device-to-device copy (read + written), the best of ``trials``
    timings of ``copies`` copies: 1 GiB on CUDA (far beyond its caches), 64 MiB elsewhere."""
    n = 1 << 30 if device.type == "cuda" else 1 << 26
    src = torch.ones(n, dtype=torch.uint8, device=device)  # written once, so every page is backed
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(trials):
        _sync(device)
        start = time.perf_counter()
        for _ in range(copies):
            dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n * copies / best


def engine_for(
    model: Transformer, drafters: list[Drafter], spec: TreeSpec, mode: str, batch: int, enforce_eager: bool = False
) -> LLMEngine:
    verifier = LocalVerifier(model, max_num_seqs=batch, enforce_eager=enforce_eager)
    return LLMEngine(
        tokenizer=None, model_config=model.config, eos_ids=set(), verifier=verifier,
        drafters=drafters, spec=spec, mode=mode, verify="mss", max_num_seqs=batch,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    """Drop what the last engine held (its KV pool, captured graphs) before the next is sized."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_generation(
    engine: LLMEngine, prompts: list[list[int]], max_tokens: int, device: torch.device
) -> tuple[dict[str, Any], list[list[int]]]:
    """Warm up (a short run of the same batch), then time a greedy run of every prompt. The seed
    only fixes the synthetic drafter's hit/miss draws, so runs repeat exactly."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, seed=0)
    engine.generate(prompts, SamplingParams(temperature=0, max_tokens=min(8, max_tokens), ignore_eos=True, seed=0))
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


def hf_twin(model: Transformer, device: torch.device) -> transformers.LlamaForCausalLM:
    """``transformers.LlamaForCausalLM`` holding ``model``'s very tensors (parameter names are
    equal): built on the meta device and assigned, so no weight is copied (an 8B model twice
    would not fit some GPUs). Its RoPE buffers are its own, computed in fp32 on the CPU. It has
    no EOS, like our engine here: with one, ``min_new_tokens`` would mask that token's logit and
    change the greedy output."""
    with init_empty_weights(include_buffers=False):
        hf = transformers.LlamaForCausalLM(copy.deepcopy(model.config))
    hf.load_state_dict(model.state_dict(), assign=True)
    hf.generation_config.eos_token_id = None
    return hf.to(device).eval()


def run_hf(
    hf: transformers.LlamaForCausalLM, prompts: list[list[int]], max_tokens: int, device: torch.device
) -> tuple[dict[str, Any], list[list[int]]]:
    """Greedy ``generate()`` of all prompts in one batch (equal lengths: no padding), warmed up on
    the same batch, exactly ``max_tokens`` new tokens each."""
    ids = torch.tensor(prompts, device=device)

    def generate(n: int) -> torch.Tensor:
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)

    generate(min(4, max_tokens))
    _sync(device)
    start = time.perf_counter()
    out = generate(max_tokens)
    _sync(device)
    elapsed = time.perf_counter() - start
    tokens = len(prompts) * max_tokens
    row = {"tokens_per_s": tokens / elapsed, "tokens_per_step": 1.0,
           "ms_per_token_per_request": 1000 * elapsed / max_tokens}
    return row, out[:, ids.shape[1]:].tolist()


def bench_shape(
    shape: str, device: torch.device, dtype: torch.dtype, bandwidth: float, args: argparse.Namespace
) -> dict[str, Any]:
    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = random_llm(shape, device, dtype)
    vocab = model.config.vocab_size
    floor_ms = 1000 * weight_bytes(model) / bandwidth
    print(f"{shape}: {weight_bytes(model) / 1e9:.3g} GB of weights read per step, floor {floor_ms:.3f} ms", flush=True)
    costs = {c: forward_cost(model, SWEEP_SIZES, c) for c in VERIFY_CONTEXTS}
    result: dict[str, Any] = {
        "weight_bytes": weight_bytes(model), "weight_floor_ms": floor_ms, "verify_cost_s": costs,
        # How much more a 64-token verify costs than a one-token decode (a memory-bound GPU: ~1).
        "verify64_over_1": {c: cost[64] / cost[1] for c, cost in costs.items()},
        "outputs_equal_hf": {}, "outputs_equal_incremental": {},
    }
    hf = None if args.skip_hf else hf_twin(model, device)
    gen = torch.Generator().manual_seed(1)
    for batch in args.batches:
        prompts = [torch.randint(vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(batch)]

        def timed(drafters: list[Drafter], spec: TreeSpec, mode: str, eager: bool = False) -> tuple[dict, list]:
            row_outputs = run_generation(engine_for(model, drafters, spec, mode, batch, eager), prompts,
                                         args.max_tokens, device)
            _free(device)  # the engine is gone: its pool is released before the next one is sized
            return row_outputs

        base, outputs = timed([], TreeSpec(), "incremental")
        rows, equal = {"incremental": base}, {}
        rows["incremental-eager"], got = timed([], TreeSpec(), "incremental", eager=True)
        equal["incremental-eager"] = got == outputs
        # The reference the drafter copies is the LLM's own greedy output for these prompts.
        references = {tuple(p): p + o for p, o in zip(prompts, outputs)}
        for alpha in args.alphas:
            for name, widths in (("sequence", (1,) * len(args.tree_widths)), ("tree", args.tree_widths)):
                spec = TreeSpec(widths)
                drafter = SyntheticDrafter(spec, alpha, references, args.prompt_len, vocab)
                rows[f"{name}-alpha{alpha}"], got = timed([drafter], spec, name)
                equal[f"{name}-alpha{alpha}"] = got == outputs
        if hf is not None:
            hf_row, hf_outputs = run_hf(hf, prompts, args.max_tokens, device)
            result["outputs_equal_hf"][f"batch{batch}"] = hf_outputs == outputs
        for row in rows.values():
            row["speedup_vs_incremental"] = row["tokens_per_s"] / base["tokens_per_s"]
            if hf is not None:
                row["speedup_vs_hf"] = row["tokens_per_s"] / hf_row["tokens_per_s"]
        if hf is not None:
            rows["hf_generate"] = hf_row
        for row in rows.values():
            row["floor_ratio"] = row["ms_per_token_per_request"] / floor_ms
        result[f"batch{batch}"] = rows
        result["outputs_equal_incremental"][f"batch{batch}"] = equal
    if 1 in args.batches:
        result["distance_to_floor"] = result["batch1"]["incremental"]["floor_ratio"]
    if device.type == "cuda":
        result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del model, hf
    _free(device)
    result["seconds"] = time.perf_counter() - started
    return result


def summary_table(results: dict[str, Any], shapes: list[str]) -> str:
    """One line per (shape, batch, mode) of the numbers that matter, as a Markdown table."""
    lines = ["| shape | batch | mode | ms/token | tokens/s | tokens/step | vs incremental | vs HF | floor ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for shape in shapes:
        for key, rows in results[shape].items():
            if not key.startswith("batch"):
                continue
            for mode, r in rows.items():
                cells = [f"{r['ms_per_token_per_request']:.2f}", f"{r['tokens_per_s']:.1f}",
                         f"{r['tokens_per_step']:.2f}",
                         *(f"{r[k]:.2f}" if k in r else "" for k in ("speedup_vs_incremental", "speedup_vs_hf")),
                         f"{r['floor_ratio']:.2f}"]
                lines.append(f"| {shape} | {key.removeprefix('batch')} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1b,llama3-8b", help=f"comma-separated, of: {', '.join(SHAPES)}")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--batches", type=_ints, default=(1, 16), help="comma-separated batch sizes")
    parser.add_argument("--alphas", type=lambda s: tuple(float(x) for x in s.split(",")), default=(0.7,),
                        help="comma-separated acceptance rates of the synthetic drafter")
    parser.add_argument("--tree-widths", type=_ints, default=(2, 2, 1, 1, 1, 1),
                        help="the tree rows' widths per depth (the sequence rows take its depth)")
    parser.add_argument("--skip-hf", action="store_true", help="no Hugging Face generate() rows")
    parser.add_argument("--out", default="bench-out/gpu")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: bfloat16 on CUDA, float32 on CPU")
    args = parser.parse_args(argv)
    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shapes {unknown}; known: {', '.join(SHAPES)}")
    device = resolve_device(args.device)
    dtype = parse_dtype(args.dtype or default_dtype(device))
    bandwidth = memory_bandwidth(device)
    print(f"memory bandwidth (device-to-device copy): {bandwidth / 1e9:.1f} GB/s", flush=True)
    results: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "device": str(device),
                               "dtype": str(dtype), "memory_bandwidth_gb_per_s": bandwidth / 1e9,
                               "args": {k: v for k, v in vars(args).items() if k != "out"}}
    acceptance_ok = outputs_ok = True
    for shape in shapes:
        results[shape] = r = bench_shape(shape, device, dtype, bandwidth, args)
        print(json.dumps({shape: r}, indent=1), flush=True)
        for batch in (f"batch{b}" for b in args.batches):
            for name, row in r[batch].items():
                if not row.get("acceptance_ok", True):
                    acceptance_ok = False
                    print(f"{shape} {batch} {name}: realised acceptance {row['realised_acceptance']:.3f} vs the "
                          f"drafter's hit rate {row['drafter_hit_rate']:.3f}: off by more than {ACCEPTANCE_TOLERANCE}")
        # Greedy outputs must be equal in float32; in bf16 different kernels may round a tie differently.
        differ = [f"{b} vs HF" for b, eq in r["outputs_equal_hf"].items() if not eq] + [
            f"{b} {mode} vs incremental" for b, modes in r["outputs_equal_incremental"].items()
            for mode, eq in modes.items() if not eq]
        if differ:
            print(f"{shape}: greedy outputs differ: {', '.join(differ)}", flush=True)
            outputs_ok &= dtype != torch.float32
    results.update(acceptance_ok=acceptance_ok, outputs_ok=outputs_ok)
    print(summary_table(results, shapes), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return 0 if acceptance_ok and outputs_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
