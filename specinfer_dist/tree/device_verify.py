"""Verification of a whole batch of token trees as tensor ops on the device of the logits.

What comes back to the host per request is two integers: the last accepted node (the root
when nothing was accepted) and the bonus token; the accepted path is rebuilt from the tree's
parents. The host implementations in tree/verify.py are the reference these are tested
against (tests/test_device_verify.py).

Greedy: a node matches when its token is its parent's argmax; the accepted path ends at the
deepest node whose ancestors all match. Greedy trees carry distinct tokens among siblings (top-k
children; merge_trees keeps the union of sequences), so at most one child matches and this is
exactly the host's walk.

MSS (multi-step speculative sampling): every request walks down its tree in lockstep with the
others, one depth per round and one candidate per inner round. Its randomness is drawn up front
from its own generator on the host (a number of uniforms fixed by its tree's depth and width),
so a seeded request's output does not depend on its batchmates. Candidates are tried in a
uniformly random order (argsort of uniform keys), accepted when u * q(x) < p(x), and the
residual sample is an inverse-CDF draw: the same distribution as the host's, not the same draws.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from specinfer_dist.tree.token_tree import TokenTree, ancestor_mask, depths


@dataclass(frozen=True)
class TreeShape:
    parents: np.ndarray  # [t]
    ancestors: np.ndarray  # bool [t, t]
    depth: np.ndarray  # [t]
    children: np.ndarray  # [t, width], -1 padded
    width: int  # most children of a node (at least 1)


@functools.lru_cache(maxsize=1024)
def tree_shape(parents: tuple[int, ...]) -> TreeShape:
    kids: list[list[int]] = [[] for _ in parents]
    for node, parent in enumerate(parents[1:], start=1):
        kids[parent].append(node)
    width = max(1, *map(len, kids))
    children = np.full((len(parents), width), -1, dtype=np.int64)
    for node, k in enumerate(kids):
        children[node, : len(k)] = k
    return TreeShape(
        np.asarray(parents), ancestor_mask(list(parents)).numpy(), np.asarray(depths(list(parents))), children, width
    )


class NonFiniteProbabilities(FloatingPointError):
    """Some trees' processed probabilities were not finite (e.g. a tiny temperature overflowed).
    ``results`` holds every other tree's verified (path, bonus) and None for those: the others
    were verified with their own random draws, exactly as without the bad ones."""

    def __init__(self, results: list[tuple[list[int], int] | None]) -> None:
        bad = [i for i, r in enumerate(results) if r is None]
        super().__init__(f"non-finite sampling probabilities in the trees at batch positions {bad}")
        self.results = results


class _Batch:
    """The trees of a batch padded to [B, T] (and [B, T, W] children), as device tensors."""

    def __init__(self, trees: Sequence[TokenTree], device: torch.device) -> None:
        shapes = [tree_shape(tuple(tree.parents)) for tree in trees]
        self.shapes = shapes
        b, t = len(trees), max(len(tree) for tree in trees)
        w = max(s.width for s in shapes)
        tokens = np.zeros((b, t), dtype=np.int64)
        parents = np.full((b, t), -1, dtype=np.int64)
        rows = np.zeros((b, t), dtype=np.int64)  # padding points at row 0
        valid = np.zeros((b, t), dtype=bool)
        ancestors = np.zeros((b, t, t), dtype=bool)
        depth = np.zeros((b, t), dtype=np.int64)
        children = np.full((b, t, w), -1, dtype=np.int64)
        start = 0
        for i, (tree, shape) in enumerate(zip(trees, shapes)):
            n = len(tree)
            tokens[i, :n] = tree.tokens
            parents[i, :n] = shape.parents
            rows[i, :n] = np.arange(start, start + n)
            valid[i, :n] = True
            ancestors[i, :n, :n] = shape.ancestors
            depth[i, :n] = shape.depth
            children[i, :n, : shape.width] = shape.children
            start += n
        as_tensor = functools.partial(torch.as_tensor, device=device)
        self.tokens, self.parents, self.rows = as_tensor(tokens), as_tensor(parents), as_tensor(rows)
        self.valid, self.ancestors, self.depth = as_tensor(valid), as_tensor(ancestors), as_tensor(depth)
        self.children = as_tensor(children)
        self.size, self.max_nodes, self.width = b, t, w


def _paths(trees: Sequence[TokenTree], result: torch.Tensor) -> list[tuple[list[int], int]]:
    """(accepted nodes root-to-leaf, bonus) from [2, B] (leaf, bonus): the one host copy."""
    out = []
    for tree, (leaf, bonus) in zip(trees, result.t().cpu().tolist()):
        path = []
        while leaf > 0:
            path.append(leaf)
            leaf = tree.parents[leaf]
        out.append((path[::-1], bonus))
    return out


@torch.inference_mode()
def verify_greedy_batch(trees: Sequence[TokenTree], logits: torch.Tensor) -> list[tuple[list[int], int]]:
    """VerifyGreedy for every tree; ``logits`` holds the trees' node rows one tree after another."""
    batch = _Batch(trees, logits.device)
    best = logits.argmax(dim=-1)[batch.rows]  # [B, T]
    parent_best = best.gather(1, batch.parents.clamp_min(0))
    match = (batch.tokens == parent_best) | (batch.parents < 0)
    ok = ~(batch.ancestors & ~match[:, None, :]).any(dim=-1) & batch.valid
    t = batch.max_nodes
    order = torch.arange(t - 1, -1, -1, device=logits.device)  # ties (never with distinct siblings): lowest index
    leaf = torch.where(ok, batch.depth * t + order, -1).argmax(dim=1)
    bonus = best.gather(1, leaf[:, None])[:, 0]
    return _paths(trees, torch.stack((leaf, bonus)))


def mss_draws(tree: TokenTree, generator: torch.Generator) -> torch.Tensor:
    """The uniforms one request's MSS verification uses (float64, on the host): per depth
    round, a key and an acceptance uniform per candidate slot, then one for the last sample."""
    shape = tree_shape(tuple(tree.parents))
    return torch.rand(_num_draws(shape), generator=generator, dtype=torch.float64)


def _num_draws(shape: TreeShape) -> int:
    return (int(shape.depth.max()) + 1) * 2 * shape.width + 1


@torch.inference_mode()
def verify_mss_batch(
    trees: Sequence[TokenTree], target: torch.Tensor, draws: Sequence[torch.Tensor]
) -> list[tuple[list[int], int]]:
    """Multi-step speculative sampling for every tree. ``target`` [rows, vocab] holds the LLM's
    processed p of the trees' nodes, one tree after another; ``draws[i]`` = ``mss_draws`` of tree i."""
    device, vocab = target.device, target.shape[1]
    batch = _Batch(trees, device)
    b, w = batch.size, batch.width
    # Each distinct q once (a node's children drawn from one q share it), then an index per node.
    qs: dict[int, int] = {}
    stacked: list[torch.Tensor] = []
    q_index = np.full((b, batch.max_nodes), -1, dtype=np.int64)
    for i, tree in enumerate(trees):
        for node, q in enumerate(tree.probs):
            if q is not None:
                key = q.data_ptr()
                if key not in qs:
                    qs[key] = len(stacked)
                    stacked.append(q)
                q_index[i, node] = qs[key]
    q_all = torch.stack(stacked).to(device, target.dtype) if stacked else target.new_zeros(1, vocab)
    q_index_t = torch.as_tensor(q_index, device=device)
    width_b = torch.as_tensor([s.width for s in batch.shapes], device=device)
    n_draws = max(len(d) for d in draws)
    u = torch.ones(b, n_draws, dtype=torch.float64)
    for i, d in enumerate(draws):
        u[i, : len(d)] = d
    u = u.to(device)
    last_u = u.gather(1, torch.as_tensor([len(d) - 1 for d in draws], device=device)[:, None])[:, 0]
    slots = torch.arange(w, device=device)
    arange_b = torch.arange(b, device=device)

    node = torch.zeros(b, dtype=torch.long, device=device)
    active = torch.ones(b, dtype=torch.bool, device=device)
    leaf, bonus = torch.zeros_like(node), torch.zeros_like(node)
    p = target[batch.rows[:, 0]]
    for depth in range(max(int(shape.depth.max()) for shape in batch.shapes) + 1):
        kids = batch.children[arange_b, node]  # [B, W]
        base = depth * 2 * width_b[:, None]
        keys = u.gather(1, (base + slots).clamp_max(n_draws - 1))
        keys = torch.where((kids >= 0) & (slots < width_b[:, None]), keys, 2.0)  # no candidate: tried last
        kids = kids.gather(1, keys.argsort(dim=1))
        accept_u = u.gather(1, (base + width_b[:, None] + slots).clamp_max(n_draws - 1))
        chosen = torch.full_like(node, -1)
        for k in range(w):
            s = kids[:, k]
            trying = active & (chosen < 0) & (s >= 0)
            s = s.clamp_min(0)
            x = batch.tokens[arange_b, s]
            qi = q_index_t[arange_b, s]
            point_mass = torch.zeros_like(p).scatter_(1, x[:, None], 1.0)  # (one_hot may sync to check x)
            q = torch.where((qi >= 0)[:, None], q_all[qi.clamp_min(0)], point_mass)
            q_x, p_x = q[arange_b, x], p[arange_b, x]
            # Strict, as the host: a token the LLM gives probability 0 is never accepted.
            accepted = trying & (accept_u[:, k] * q_x < p_x)
            chosen = torch.where(accepted, s, chosen)
            residual = (p - q).clamp_min(0.0)
            total = residual.sum(dim=1, keepdim=True)
            # A zero residual means p <= q everywhere, i.e. p == q up to rounding: keep p.
            residual = torch.where(total > 0, residual / total.clamp_min(1e-300), p)
            p = torch.where((trying & ~accepted)[:, None], residual, p)
        stop = active & (chosen < 0)
        cdf = p.cumsum(dim=1)
        drawn = torch.searchsorted(cdf, (last_u * cdf[:, -1])[:, None], right=True)[:, 0].clamp_max(vocab - 1)
        bonus = torch.where(stop, drawn, bonus)
        leaf = torch.where(stop, node, leaf)
        active = active & ~stop
        node = torch.where(active, chosen, node)
        p = torch.where(active[:, None], target[batch.rows[arange_b, node]], p)
    # A tree with a non-finite probability (e.g. a tiny temperature overflowed) gets bonus -1:
    # flagged within the one host copy, refused below.
    finite = (target.isfinite().all(dim=1)[batch.rows] | ~batch.valid).all(dim=1)
    paths = _paths(trees, torch.stack((leaf, torch.where(finite, bonus, -1))))
    if any(token < 0 for _, token in paths):
        raise NonFiniteProbabilities([None if token < 0 else (path, token) for path, token in paths])
    return paths
