"""``--tree auto`` and ``specinfer-dist tune-tree``: measure, then pick the tree (tree_cost.py).

Calibration uses its own prompts (calibration.jsonl), never the held-out bench set. Results
are cached per (models, machine, dtype), so only the first start pays the ~half minute.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from typing import Any

from specinfer_dist.bench.common import load_prompts, machine
from specinfer_dist.bench.tree_cost import SWEEP_SIZES, choose_tree, forward_cost, topk_coverage
from specinfer_dist.engine.sampling_params import SamplingParams
from specinfer_dist.engine.verifier import LocalVerifier
from specinfer_dist.models.loader import cache_root
from specinfer_dist.models.transformer import Transformer
from specinfer_dist.tree.spec import TreeSpec


def tune_tree(
    llm: Transformer, tokenizer: Any, ssms: list[Transformer], *, context: int = 256, max_new: int = 48,
    budget: int = 64,
) -> dict[str, Any]:
    """Measure coverage and costs on this machine and choose the width config."""
    from specinfer_dist.engine.engine import LLMEngine  # the engine imports this module for tree="auto"

    rows = load_prompts(str(resources.files(__package__).joinpath("calibration.jsonl")))
    engine = LLMEngine.from_parts(
        tokenizer=tokenizer, model_config=llm.config, eos_ids=set(), verifier=LocalVerifier(llm), drafters=[],
        spec=TreeSpec(), mode="incremental", verify="mss", max_num_seqs=len(rows),
    )
    chat = bool(getattr(tokenizer, "chat_template", None))  # base models get the plain text
    prompts = [engine.encode(r["prompt"], chat=chat and bool(r.get("chat"))) for r in rows]
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True))
    coverage = topk_coverage(ssms, [(p, o.token_ids) for p, o in zip(prompts, outs)])
    verify_cost = forward_cost(llm, SWEEP_SIZES, context)
    per_ssm = [forward_cost(ssm, [n for n in SWEEP_SIZES if n <= budget], context) for ssm in ssms]
    draft_cost = {n: sum(c[n] for c in per_ssm) for n in per_ssm[0]}
    choice = choose_tree(coverage, verify_cost, draft_cost, budget=budget)
    return {
        "machine": machine(),
        "context": context,
        "coverage_topk": coverage,
        "verify_cost_s": verify_cost,
        "draft_cost_s": draft_cost,
        "tree": list(choice.widths),
        "expected_tokens_per_step": choice.tokens_per_step,
        "expected_step_s": choice.step_s,
        "expected_speedup_vs_incremental": choice.tokens_per_s * verify_cost[1],
    }


def auto_tree(llm: Transformer, tokenizer: Any, ssms: list[Transformer], sources: list[str], budget: int) -> TreeSpec | None:
    """The tuned tree for these models on this machine (cached); None = don't speculate."""
    dtype = next(llm.parameters()).dtype
    key = hashlib.sha256(json.dumps([sources, machine(), str(dtype), budget]).encode()).hexdigest()[:16]
    path = cache_root() / "tree-auto" / f"{key}.json"
    if path.is_file():
        result = json.loads(path.read_text())
    else:
        result = tune_tree(llm, tokenizer, ssms, budget=budget)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
    return TreeSpec(tuple(result["tree"]), budget) if result["tree"] else None
