"""Verification of a token tree against the LLM: greedy, multi-step speculative sampling, naive.

Each returns the accepted drafted nodes (root-to-leaf order) and one more token from the LLM,
so every step yields ``len(accepted) + 1`` tokens.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from specinfer_dist.tree.device_verify import NonFiniteProbabilities, mss_draws, verify_greedy_batch, verify_mss_batch
from specinfer_dist.tree.sampling import sampling_probs
from specinfer_dist.tree.token_tree import TokenTree


def verify_tree(
    tree: TokenTree, logits: torch.Tensor, generator: torch.Generator, *, temperature: float, top_k: int,
    top_p: float, method: str = "mss",
) -> tuple[list[int], int]:
    """Verify one request's tree with its sampling settings: greedy at temperature 0, else
    ``method`` ("mss" or "naive") against the LLM's processed distribution."""
    # Refuse to verify against numbers that are not probabilities (a model producing NaN, or a
    # temperature so small that logits / temperature overflows): the caller fails this request.
    if logits.isnan().any() or logits.isposinf().any():
        raise FloatingPointError("the LLM's logits contain NaN or +inf")
    if temperature == 0:
        return verify_greedy(tree, logits)
    target = sampling_probs(logits, temperature, top_k, top_p)
    if not target.isfinite().all():
        raise FloatingPointError(f"temperature {temperature:g} turns the LLM's logits into non-finite probabilities")
    return SAMPLED_VERIFIERS[method](tree, target, generator)


def verify_greedy(tree: TokenTree, logits: torch.Tensor) -> tuple[list[int], int]:
    """VerifyGreedy: follow the child matching the LLM's argmax, then add the LLM's own token.

    ``logits[i]`` is the LLM's prediction after node i.
    """
    best = logits.argmax(dim=-1).tolist()
    kids = tree.children()
    accepted: list[int] = []
    node = 0
    while True:
        match = next((c for c in kids[node] if tree.tokens[c] == best[node]), None)
        if match is None:
            return accepted, best[node]
        accepted.append(match)
        node = match


def verify_mss(tree: TokenTree, target: torch.Tensor, generator: torch.Generator) -> tuple[list[int], int]:
    """Multi-step speculative sampling (SpecInfer, Algorithm 2): the output is distributed as p.

    ``target[i]`` is the LLM's processed distribution p after node i. At each node a random
    candidate s is accepted with probability min(1, p(x_s) / q_s(x_s)); otherwise p becomes
    norm(max(0, p - q_s)) and s is dropped. With no candidate left, sample from what p became.
    ``tree.probs[s]`` is the q that drew s; None means s was proposed deterministically (q = delta).
    """
    kids = tree.children()
    accepted: list[int] = []
    node = 0
    while True:
        p = target[node].clone()
        candidates = list(kids[node])
        chosen = None
        while candidates:
            s = candidates.pop(int(torch.randint(len(candidates), (1,), generator=generator)))
            x, q = tree.tokens[s], tree.probs[s]
            q_x = 1.0 if q is None else q[x].item()
            # Strict: a token the LLM gives probability 0 is never accepted, even when u or q(x) is 0.
            if torch.rand((), generator=generator, dtype=torch.float64).item() * q_x < p[x].item():
                chosen = s
                break
            p = _residual(p, x, q)
        if chosen is None:
            return accepted, int(torch.multinomial(p, 1, generator=generator))
        accepted.append(chosen)
        node = chosen


def _residual(p: torch.Tensor, x: int, q: torch.Tensor | None) -> torch.Tensor:
    if q is None:
        residual = p.clone()
        residual[x] = 0.0
    else:
        residual = (p - q.to(p.dtype)).clamp_min(0.0)
    total = residual.sum()
    # A zero residual means p <= q everywhere, i.e. p == q up to rounding: nothing left to correct.
    return residual / total if total > 0 else p


def verify_naive(tree: TokenTree, target: torch.Tensor, generator: torch.Generator) -> tuple[list[int], int]:
    """Naive sampling (baseline): sample from p at each node and descend while a child matches."""
    kids = tree.children()
    accepted: list[int] = []
    node = 0
    while True:
        token = int(torch.multinomial(target[node], 1, generator=generator))
        match = next((c for c in kids[node] if tree.tokens[c] == token), None)
        if match is None:
            return accepted, token
        accepted.append(match)
        node = match


SAMPLED_VERIFIERS = {"mss": verify_mss, "naive": verify_naive}


def verify_batch(
    trees: Sequence[TokenTree],
    logits: torch.Tensor,
    settings: Sequence[tuple[float, int, float]],
    generators: Sequence[torch.Generator],
    method: str = "mss",
) -> list[tuple[list[int], int]]:
    """Verify a batch where its logits are: greedy (temperature 0) and MSS as batched tensor ops
    (tree/device_verify.py), the naive baseline per request on the host. ``settings[i]`` is
    request i's (temperature, top_k, top_p); ``logits`` holds the trees' node rows one tree
    after another."""
    sizes = [len(tree) for tree in trees]
    per_tree = logits.split(sizes)
    out: list[tuple[list[int], int] | None] = [None] * len(trees)
    greedy = [i for i, (temperature, _, _) in enumerate(settings) if temperature == 0]
    if greedy:
        rows = logits if len(greedy) == len(trees) else torch.cat([per_tree[i] for i in greedy])
        got = verify_greedy_batch([trees[i] for i in greedy], rows)
        for i, result in zip(greedy, got):
            out[i] = result
    sampled = [i for i, (temperature, _, _) in enumerate(settings) if temperature != 0]
    if sampled and method == "naive":
        for i in sampled:
            temperature, top_k, top_p = settings[i]
            out[i] = verify_tree(trees[i], per_tree[i].float().cpu(), generators[i], temperature=temperature,
                                 top_k=top_k, top_p=top_p, method=method)
    elif sampled:
        # One processed-p call per distinct setting (most batches share one).
        target = torch.empty(sum(sizes[i] for i in sampled), logits.shape[1], dtype=torch.float64, device=logits.device)
        offsets = np.cumsum([0] + [sizes[i] for i in sampled])
        groups: dict[tuple[float, int, float], list[int]] = {}
        for j, i in enumerate(sampled):
            groups.setdefault(settings[i], []).append(j)
        for setting, members in groups.items():
            # Built where the logits are: a host index would be a blocking copy per setting.
            rows = torch.cat([torch.arange(offsets[j], offsets[j + 1], device=logits.device) for j in members])
            target[rows] = sampling_probs(torch.cat([per_tree[sampled[j]] for j in members]), *setting)
        draws = [mss_draws(trees[i], generators[i]) for i in sampled]
        try:
            got = verify_mss_batch([trees[i] for i in sampled], target, draws)
        except NonFiniteProbabilities as err:  # raise it for the whole batch, with the others' results
            for i, result in zip(sampled, err.results):
                out[i] = result
            raise NonFiniteProbabilities(out) from None
        for i, result in zip(sampled, got):
            out[i] = result
    return out  # type: ignore[return-value]
