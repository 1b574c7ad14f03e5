"""Choosing a tree from measurements: what a verify pass costs for n tree tokens on this
device, what a draft depth costs, and how often the LLM's token is among an SSM's top-k.

With A(k) = P(the LLM's next token is among the SSMs' top-k guesses), measured teacher-forced
on the LLM's own outputs, and depths taken as independent, a width config <k1..km> accepts on
average sum_d prod_{i<=d} A(k_i) drafted tokens. Each of s merged SSMs hangs its own children
below every node, so depth d costs up to s * prod_{i<=d} k_i verified tokens (the upper bound:
SSMs that agree share a node). Dividing the expected tokens per step by the measured step
time ranks every config; ``choose_tree`` searches them all (widths up to 4, depth up to 8,
within the token budget), and ``tune.py`` does so for every subset of the SSMs.
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass
from math import prod
from typing import Sequence

import torch

from specinfer_dist.models.transformer import Transformer
from specinfer_dist.runtime.block_pool import KVCapacity
from specinfer_dist.runtime.model_runner import ModelRunner, RunItem, chain_parents
from specinfer_dist.tuning.budget import Deadline

SWEEP_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


def forward_cost(model: Transformer, sizes: Sequence[int], context: int, repeats: int = 3,
                 deadline: Deadline | None = None) -> dict[int, float]:
    """Median seconds of one forward over n new tokens (all with logits, left on the device, as a
    verify step leaves them) after ``context`` cached ones. The pool is fixed, as the LLM's, so on
    a GPU the forwards replay CUDA graphs like the engine's. With a ``deadline``: sizes in
    increasing order, each warmed up and timed once, while time is left (at least two, so costs
    extrapolate), then more repeats round-robin while time is left."""
    block_size = 16
    runner = ModelRunner(model, KVCapacity(-(-(context + max(sizes)) // block_size), block_size))
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    cache = runner.new_cache()
    prefix = torch.randint(vocab, (context,), generator=gen).tolist()
    runner.run([RunItem(cache, prefix, chain_parents(context), [context - 1])])
    cache.commit(range(context))

    def timed(item: RunItem) -> float:
        synchronize(runner.device)
        start = time.perf_counter()
        runner.run([item])
        synchronize(runner.device)
        seconds = time.perf_counter() - start
        cache.rollback()
        return seconds

    times: dict[int, list[float]] = {}
    items: dict[int, RunItem] = {}
    for n in sizes:
        if len(times) >= 2 and deadline is not None and deadline.passed():
            break
        tokens = torch.randint(vocab, (n,), generator=gen).tolist()
        items[n] = RunItem(cache, tokens, chain_parents(n), list(range(n)))  # cost does not depend on shape
        timed(items[n])  # warms up (and captures a graph)
        times[n] = [timed(items[n])]
    for _ in range(repeats - 1):
        for n in times:
            if deadline is not None and deadline.passed():
                break
            times[n].append(timed(items[n]))
    return {n: statistics.median(t) for n, t in times.items()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interpolate(costs: dict[int, float], n: float) -> float:
    """Piecewise-linear cost for any n (linear extrapolation past the largest size)."""
    sizes = sorted(costs)
    if n <= sizes[0]:
        return costs[sizes[0]]
    for lo, hi in itertools.pairwise(sizes):
        if n <= hi:
            return costs[lo] + (costs[hi] - costs[lo]) * (n - lo) / (hi - lo)
    lo, hi = sizes[-2], sizes[-1]
    return costs[hi] + (costs[hi] - costs[lo]) * (n - hi) / (hi - lo)


@torch.inference_mode()
def token_ranks(ssm: Transformer, sequences: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """For every ``output[i]`` of every sequence: how many tokens the SSM ranks above it after
    ``prompt + output[:i]`` (0: its top-1 guess), teacher-forced."""
    runner, ranks = ModelRunner(ssm), []
    for prompt, output in sequences:
        tokens = prompt + output
        rows = list(range(len(prompt) - 1, len(tokens) - 1))
        logits = runner.forward([RunItem(runner.new_cache(), tokens, chain_parents(len(tokens)), rows)])[0]
        ranks.append((logits > logits.gather(1, torch.tensor(output)[:, None])).sum(dim=1))
    return torch.cat(ranks)


def topk_coverage(ranks: Sequence[torch.Tensor], max_k: int = 4) -> list[float]:
    """coverage[k-1]: how often the LLM's token is among the top-k guesses of at least one of
    these SSMs (``token_ranks`` of each): the union is what their merged tree offers."""
    best = torch.stack(list(ranks)).min(dim=0).values
    return [float((best < k).float().mean()) for k in range(1, max_k + 1)]


@dataclass
class TreeChoice:
    widths: tuple[int, ...]  # () = incremental decoding
    tokens_per_step: float
    step_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s


def evaluate(widths: Sequence[int], coverage: Sequence[float], verify_cost: dict[int, float],
             draft_cost: dict[int, float], num_ssms: int = 1) -> TreeChoice:
    """Expected tokens per step and step time of one width config (see module docstring).
    ``draft_cost`` is one forward of every SSM over n tokens."""
    covered = [coverage[k - 1] for k in widths]
    accepted = sum(prod(covered[: d + 1]) for d in range(len(widths)))
    frontier = [prod(widths[: d + 1]) for d in range(len(widths))]
    step_s = interpolate(verify_cost, 1 + num_ssms * sum(frontier))
    if widths:  # catch-up + root, then one SSM forward per depth but the last
        step_s += interpolate(draft_cost, 1 + accepted) + sum(interpolate(draft_cost, f) for f in frontier[:-1])
    return TreeChoice(tuple(widths), 1 + accepted, step_s)


def choose_tree(coverage: Sequence[float], verify_cost: dict[int, float], draft_cost: dict[int, float],
                max_depth: int = 8, budget: int = 64, num_ssms: int = 1) -> TreeChoice:
    """The width config (or none) with the most expected tokens per second."""
    best = evaluate((), coverage, verify_cost, draft_cost)
    for depth in range(1, max_depth + 1):
        for widths in itertools.product(range(1, len(coverage) + 1), repeat=depth):
            if num_ssms * sum(prod(widths[: d + 1]) for d in range(depth)) > budget:
                continue
            choice = evaluate(widths, coverage, verify_cost, draft_cost, num_ssms)
            if choice.tokens_per_s > best.tokens_per_s:
                best = choice
    return best
