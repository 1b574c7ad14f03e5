"""``--tree auto`` and ``specinfer-dist tune-tree``: measure, then pick the SSMs and the tree
(tree_cost.py). Every subset of the SSMs is a candidate: a second SSM widens the merged tree
(more to verify) for the tokens only it guesses, which pays only where verification is cheap.

Calibration uses its own prompts (calibration.jsonl), never the held-out bench set. Results are
cached (cache.py: per device, torch, dtype, model files and token budget), so only the first
start measures. With a time budget (``seconds``) each stage does less when time runs short:
fewer coverage tokens (COVERAGE_SHARE of the budget), sweep sizes and repeats; never less than
MIN_COVERAGE_TOKENS per prompt and two sweep sizes, so any budget gives a choice.
"""

from __future__ import annotations

import itertools
import time
from functools import partial
from typing import Any, Callable

import torch

from specinfer_dist.models.transformer import Transformer
from specinfer_dist.progress import say
from specinfer_dist.runtime.device import machine
from specinfer_dist.runtime.model_runner import ModelRunner, RunItem, chain_parents
from specinfer_dist.tree.spec import TreeSpec
from specinfer_dist.tuning.budget import Deadline, budget_seconds
from specinfer_dist.tuning.cache import read_result, result_path, write_result
from specinfer_dist.tuning.prompts import calibration_prompts
from specinfer_dist.tuning.tree_cost import (
    SWEEP_SIZES,
    choose_tree,
    forward_cost,
    interpolate,
    token_ranks,
    topk_coverage,
)

COVERAGE_SHARE = 0.5  # of the budget: the LLM's own greedy outputs, which coverage is counted on
VERIFY_SHARE = 0.7  # of what is left then: the LLM's cost sweep; the SSMs' sweeps get the rest
MIN_COVERAGE_TOKENS = 8  # per prompt (6 prompts: 48 teacher-forced tokens at the least)


def tune_tree(
    llm: Transformer, tokenizer: Any, ssms: list[Transformer], *, context: int = 256, max_new: int = 48,
    budget: int = 64, seconds: float | None = None, clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Measure coverage and costs on this machine and choose the width config, within
    ``seconds`` (None: the full measurement, as ``tune-tree`` prints it)."""
    deadline = Deadline(seconds, clock)
    chat = bool(getattr(tokenizer, "chat_template", None))
    max_new = min(max_new, llm.config.max_position_embeddings // 4)  # short-context models fit too
    prompts = calibration_prompts(partial(_encode, tokenizer), chat, llm.config.max_position_embeddings - max_new)
    outputs = greedy_outputs(llm, prompts, max_new, deadline.share(COVERAGE_SHARE))
    ranks = [token_ranks(ssm, list(zip(prompts, outputs))) for ssm in ssms]
    verify_cost = forward_cost(llm, SWEEP_SIZES, context, deadline=deadline.share(VERIFY_SHARE))
    per_ssm = [forward_cost(ssm, [n for n in SWEEP_SIZES if n <= budget], context,
                            deadline=deadline.share(1 / (len(ssms) - i))) for i, ssm in enumerate(ssms)]
    candidates = []
    for size in range(1, len(ssms) + 1):
        for subset in itertools.combinations(range(len(ssms)), size):
            coverage = topk_coverage([ranks[i] for i in subset])
            sizes = sorted({n for i in subset for n in per_ssm[i]})  # a short budget may cut sweeps apart
            draft_cost = {n: sum(interpolate(per_ssm[i], n) for i in subset) for n in sizes}
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
    return {"machine": machine(), "context": context, "coverage_tokens": sum(map(len, outputs)),
            "verify_cost_s": verify_cost, **best, "candidates": candidates}


def _encode(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    if not chat:
        return tokenizer(prompt).input_ids
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


@torch.inference_mode()
def greedy_outputs(llm: Transformer, prompts: list[list[int]], max_new: int,
                   deadline: Deadline | None = None) -> list[list[int]]:
    """The LLM's own greedy continuations (EOS ignored), decoded as one batch: ``max_new`` tokens
    each, or fewer (at least MIN_COVERAGE_TOKENS) once ``deadline`` has passed. All prompts in
    one batch because on a CPU a step of 6 rows costs about what one of 2 does."""
    runner = ModelRunner(llm)
    caches = [runner.new_cache() for _ in prompts]
    pending = [list(p) for p in prompts]  # tokens not in the cache yet
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in range(max_new):
        if step >= MIN_COVERAGE_TOKENS and deadline is not None and deadline.passed():
            break
        items = [RunItem(cache, toks, chain_parents(len(toks)), [len(toks) - 1]) for cache, toks in zip(caches, pending)]
        for i, logits in enumerate(runner.forward(items)):
            caches[i].commit(range(len(pending[i])))
            token = int(logits[-1].argmax())
            outputs[i].append(token)
            pending[i] = [token]
    return outputs


def auto_tree(
    llm: Transformer, tokenizer: Any, ssms: list[Transformer], sources: list[str], budget: int, progress: bool = False,
    *, seconds: float | None = None,
) -> tuple[TreeSpec | None, list[int]]:
    """The tuned tree for these models on this machine (cached), and which SSMs (indices) draft
    it; None: don't speculate. ``sources``: the LLM's and the SSMs' sources and whatever else
    changes the SSMs (e.g. "draft_vocab=True"); ``seconds``: the measurement's time budget
    (None: ``tuning_budget_s: auto`` for the LLM's device, for callers that race nothing)."""
    param = next(llm.parameters())
    # A one-shard TP group measures what a local engine does: share its result.
    sources = [s for s in sources if s != "tp=1"]
    path = result_path("tree-auto", param.device, param.dtype, sources, tree_budget=budget)
    result = read_result(path)
    if result is not None:
        say(f"tree auto: using cached tuning result from {path}", "tuning", progress)
    else:
        seconds = budget_seconds("auto", param.device) if seconds is None else seconds
        say(f"tree auto: measuring verify and draft costs and the SSMs' coverage within {seconds:.0f} s "
            f"(once on this machine; cached in {path})", "tuning", progress)
        start = time.perf_counter()
        result = tune_tree(llm, tokenizer, ssms, budget=budget, seconds=seconds)
        write_result(path, result)
        chosen = (f"tree {','.join(map(str, result['tree']))} drafted by SSM(s) {result['ssms']}, expected "
                  f"{result['expected_speedup_vs_incremental']:.2f}x incremental" if result["tree"]
                  else "no tree pays on this machine (incremental decoding)")
        say(f"tree auto: cost model measured in {time.perf_counter() - start:.1f} s: {chosen}", "tuning", progress)
    if not result["tree"]:
        return None, []
    return TreeSpec(tuple(result["tree"]), budget), result["ssms"]
