"""Offline GPU benchmark: random-weight Llama shapes, a verify-cost sweep, and speculation with
a synthetic drafter of set acceptance rate. Nothing is downloaded, so it runs on a machine
with no network; it finishes in a few minutes on one H100/H200.

    python -m specinfer_dist.bench.synthetic --shapes 1b,7b --out DIR      # on a GPU
    python -m specinfer_dist.bench.synthetic --shapes tiny --out DIR       # smoke run on a CPU

The synthetic drafter proposes, at every depth, the LLM's own greedy continuation with
probability ``alpha`` (else a wrong token), so acceptance is controlled while the LLM, the
tree verification and the engine's overheads are all real.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from specinfer_dist.drafters.base import Drafter, DraftRequest, draft_generator
from specinfer_dist.engine.engine import LLMEngine
from specinfer_dist.models.transformer import Transformer
from specinfer_dist.runtime.device import machine
from specinfer_dist.runtime.sampling_params import SamplingParams
from specinfer_dist.runtime.verifier import LocalVerifier
from specinfer_dist.tree.spec import TreeSpec
from specinfer_dist.tree.token_tree import TokenTree
from specinfer_dist.tuning.tree_cost import SWEEP_SIZES, forward_cost

SHAPES = {  # Llama-family shapes (vocab 32000)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
}


class SyntheticDrafter(Drafter):
    """Proposes the reference continuation with probability ``alpha`` per node (the first child
    of each node); other children and misses are wrong tokens. Point masses, so exact for MSS."""

    def __init__(self, spec: TreeSpec, alpha: float, references: dict[int, list[int]], vocab: int) -> None:
        super().__init__(f"synthetic-{alpha}", spec)
        self.alpha, self.references, self.vocab = alpha, references, vocab
        self.generators: dict[int, torch.Generator] = {}

    def propose(self, requests: list[DraftRequest], max_depths: list[int]) -> list[TokenTree]:
        trees = []
        for request, max_depth in zip(requests, max_depths):
            gen = self.generators.setdefault(request.request_id, draft_generator(request.params, self.name))
            reference = self.references[request.request_id]
            tree = TokenTree.from_root(request.tokens[-1])
            frontier = [(0, len(request.tokens))]  # (node, position of its next token in the reference)
            for width in self.spec.widths[: max(0, max_depth)]:
                grown = []
                for node, pos in frontier:
                    truth = reference[pos] if pos < len(reference) else 0
                    hit = float(torch.rand((), generator=gen)) < self.alpha
                    for child in range(width):
                        token = truth if child == 0 and hit else (truth + 1 + child) % self.vocab
                        grown.append((tree.add(node, token), pos + 1))
                frontier = grown
            trees.append(tree)
        return trees

    def release(self, request_id: int) -> None:
        self.generators.pop(request_id, None)


def random_llm(shape: str, device: str, dtype: torch.dtype) -> Transformer:
    config = transformers.LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(config).to(dtype)
    for p in model.parameters():  # small weights keep bf16 activations finite over many layers
        p.data.normal_(0, 0.02)
    return model.eval().requires_grad_(False)


def engine_for(model: Transformer, drafters: list[Drafter], spec: TreeSpec, mode: str, batch: int) -> LLMEngine:
    return LLMEngine(
        tokenizer=None, model_config=model.config, eos_ids=set(), verifier=LocalVerifier(model),
        drafters=drafters, spec=spec, mode=mode, verify="mss", max_num_seqs=batch,
    )


def run_generation(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> dict[str, float]:
    # Greedy; the seed only fixes the synthetic drafter's hit/miss draws, so runs repeat exactly.
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, seed=0)
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    return {"tokens_per_s": tokens / elapsed, "tokens_per_step": tokens / sum(o.stats.steps for o in outs),
            "ms_per_token_per_request": 1000 * elapsed * len(prompts) / tokens}


def bench_shape(shape: str, device: str, dtype: torch.dtype, max_tokens: int, prompt_len: int) -> dict[str, Any]:
    model = random_llm(shape, device, dtype)
    result: dict[str, Any] = {"verify_cost_s": {c: forward_cost(model, SWEEP_SIZES, c) for c in (512, 2048)}}
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 8):
        prompts = [torch.randint(32000, (prompt_len,), generator=gen).tolist() for _ in range(batch)]
        incremental = engine_for(model, [], TreeSpec(), "incremental", batch)
        run_generation(incremental, prompts[:1], 4)  # warm-up
        base = run_generation(incremental, prompts, max_tokens)
        # The reference the drafter copies is the LLM's own greedy output for these prompts.
        reference_outs = incremental.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        rows = {"incremental": base}
        for alpha in (0.6, 0.8):
            for name, widths in (("sequence", (1,) * 6), ("tree", (2, 2, 1, 1, 1, 1))):
                spec = TreeSpec(widths)
                # A fresh engine numbers its requests 0, 1, ... in submission order.
                references = {i: p + o.token_ids for i, (p, o) in enumerate(zip(prompts, reference_outs))}
                engine = engine_for(model, [SyntheticDrafter(spec, alpha, references, 32000)], spec, name, batch)
                row = run_generation(engine, prompts, max_tokens)
                row["speedup_vs_incremental"] = row["tokens_per_s"] / base["tokens_per_s"]
                rows[f"{name}-alpha{alpha}"] = row
        result[f"batch{batch}"] = rows
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1b,7b")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--out", default="bench-out/gpu")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "device": device, "dtype": str(dtype)}
    for shape in args.shapes.split(","):
        results[shape] = bench_shape(shape, device, dtype, args.max_tokens, args.prompt_len)
        print(json.dumps({shape: results[shape]}, indent=1), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
