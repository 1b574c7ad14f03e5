"""``--tree auto`` and ``specinfer-dist tune-tree``: measure, then pick the SSMs and the tree
(tree_cost.py). Every subset of the SSMs is a candidate: a second SSM widens the merged tree
(more to verify) for the tokens only it guesses, which pays only where verification is cheap.

Calibration uses its own prompts (calibration.jsonl), never the held-out bench set. Results
are cached per (models, machine, dtype), so only the first start pays the ~half minute.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from importlib import resources
from typing import Any

import torch

from specinfer_dist.models.cache import cache_root
from specinfer_dist.models.transformer import Transformer
from specinfer_dist.runtime.device import machine
from specinfer_dist.runtime.model_runner import ModelRunner, RunItem, chain_parents
from specinfer_dist.tree.spec import TreeSpec
from specinfer_dist.tuning.prompts import load_prompts
from specinfer_dist.tuning.tree_cost import (
    SWEEP_SIZES,
    choose_tree,
    forward_cost,
    token_ranks,
    topk_coverage,
)


def tune_tree(
    llm: Transformer, tokenizer: Any, ssms: list[Transformer], *, context: int = 256, max_new: int = 48,
    budget: int = 64,
) -> dict[str, Any]:
    """Measure coverage and costs on this machine and choose the width config."""
    rows = load_prompts(str(resources.files(__package__).joinpath("calibration.jsonl")))
    chat = bool(getattr(tokenizer, "chat_template", None))  # base models get the plain text
    max_new = min(max_new, llm.config.max_position_embeddings // 4)  # short-context models fit too
    keep = llm.config.max_position_embeddings - max_new
    prompts = [_encode(tokenizer, r["prompt"], chat and bool(r.get("chat")))[-keep:] for r in rows]
    outputs = greedy_outputs(llm, prompts, max_new)
    ranks = [token_ranks(ssm, list(zip(prompts, outputs))) for ssm in ssms]
    verify_cost = forward_cost(llm, SWEEP_SIZES, context)
    per_ssm = [forward_cost(ssm, [n for n in SWEEP_SIZES if n <= budget], context) for ssm in ssms]
    candidates = []
    for size in range(1, len(ssms) + 1):
        for subset in itertools.combinations(range(len(ssms)), size):
            coverage = topk_coverage([ranks[i] for i in subset])
            draft_cost = {n: sum(per_ssm[i][n] for i in subset) for n in per_ssm[0]}
            choice = choose_tree(coverage, verify_cost, draft_cost, budget=budget, num_ssms=size)
            candidates.append({
                "ssms": list(subset),
                "coverage_topk": coverage,
                "draft_cost_s": draft_cost,
                "tree": list(choice.widths),
                "expected_tokens_per_step": choice.tokens_per_step,
                "expected_step_s": choice.step_s,
                "expected_speedup_vs_incremental": choice.tokens_per_s * verify_cost[1],
            })
    best = max(candidates, key=lambda c: c["expected_speedup_vs_incremental"])  # ties: fewer SSMs
    return {"machine": machine(), "context": context, "verify_cost_s": verify_cost, **best, "candidates": candidates}


def _encode(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    if not chat:
        return tokenizer(prompt).input_ids
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


@torch.inference_mode()
def greedy_outputs(llm: Transformer, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """The LLM's own greedy continuations (EOS ignored), decoded as one batch."""
    runner = ModelRunner(llm)
    caches = [runner.new_cache() for _ in prompts]
    pending = [list(p) for p in prompts]  # tokens not in the cache yet
    outputs: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new):
        items = [RunItem(cache, toks, chain_parents(len(toks)), [len(toks) - 1]) for cache, toks in zip(caches, pending)]
        for i, logits in enumerate(runner.forward(items)):
            caches[i].commit(range(len(pending[i])))
            token = int(logits[-1].argmax())
            outputs[i].append(token)
            pending[i] = [token]
    return outputs


def auto_tree(
    llm: Transformer, tokenizer: Any, ssms: list[Transformer], sources: list[str], budget: int, progress: bool = False
) -> tuple[TreeSpec | None, list[int]]:
    """The tuned tree for these models on this machine (cached), and which SSMs (indices) draft
    it; None: don't speculate."""
    dtype = next(llm.parameters()).dtype
    digest = hashlib.sha256(json.dumps(["v2", sources, machine(), str(dtype), budget]).encode())
    shared = {p.data_ptr() for p in llm.parameters()}
    for ssm in ssms:  # a retrained SSM (same path, new weights) must be measured again
        for tensor in ssm.state_dict().values():
            if tensor.data_ptr() not in shared:  # the LLM's own tensors are named by its source
                digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    key = digest.hexdigest()[:16]
    path = cache_root() / "tree-auto" / f"{key}.json"
    if path.is_file():
        result = json.loads(path.read_text())
    else:
        if progress:
            print(f"tree auto: measuring this machine's costs and the SSMs' coverage once (cached in {path})",
                  file=sys.stderr)
        result = tune_tree(llm, tokenizer, ssms, budget=budget)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
    if not result["tree"]:
        return None, []
    return TreeSpec(tuple(result["tree"]), budget), result["ssms"]
