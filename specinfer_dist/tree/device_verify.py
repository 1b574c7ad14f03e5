"""Verification of a whole batch of token trees as tensor ops on the device of the logits.

What comes back to the host per request is two integers: the last accepted node (the root
when nothing was accepted) and the bonus token; the accepted path is rebuilt from the tree's
parents. The host implementations in tree/verify.py are the reference these are tested
against (tests/test_device_verify.py).

Copies: a verification crosses between host and device exactly twice (tests/test_hot_path.py
counts them). Everything the host knows (the trees' integers, MSS's uniforms and the drafters'
q vectors when they are on the host) goes to the device in ONE copy, packed into one buffer
that is pinned and reused on CUDA; the two integers per request come back in one copy.

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
import itertools
import threading
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


class _Staging(threading.local):
    """This thread's reusable pinned host buffer (pinning is slow: done once, then grown by
    doubling) and the event of the last copy out of it, which must end before it is rewritten."""

    def __init__(self) -> None:
        self.host = torch.empty(0, dtype=torch.int64)
        self.copied: torch.cuda.Event | None = None


_STAGING = _Staging()


def _to_device(arrays: Sequence[np.ndarray | torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host arrays on ``device`` in ONE copy: their bytes packed into one int64 buffer, each
    part 8-byte aligned so it can be viewed back as its own dtype and shape on the device. On
    CUDA the buffer is pinned and reused and the copy does not block the host."""
    parts = [_host_bytes(array) for array in arrays]
    offsets = list(itertools.accumulate((-(-len(data) // 8) for data, _, _ in parts), initial=0))  # in int64 words
    if device.type == "cuda":
        if _STAGING.copied is not None:
            _STAGING.copied.synchronize()
        if _STAGING.host.numel() < offsets[-1]:
            _STAGING.host = torch.empty(max(offsets[-1], 2 * _STAGING.host.numel()), dtype=torch.int64, pin_memory=True)
        host = _STAGING.host[: offsets[-1]]
    else:
        host = torch.empty(offsets[-1], dtype=torch.int64)
    packed = host.numpy().view(np.uint8)
    for (data, _, _), start in zip(parts, offsets):
        packed[8 * start : 8 * start + len(data)] = data
    flat = host.to(device, non_blocking=True)
    if device.type == "cuda":
        _STAGING.copied = torch.cuda.Event()
        _STAGING.copied.record(torch.cuda.current_stream(device))
    out = []
    for (data, dtype, shape), start, end in zip(parts, offsets, offsets[1:]):
        chunk = flat[start:end]  # slices: a split into many parts costs more host time
        out.append((chunk if dtype == torch.int64 else chunk.view(torch.uint8)[: len(data)].view(dtype)).view(shape))
    return out


_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.bool_): torch.bool, np.dtype(np.float64): torch.float64}


def _host_bytes(array: np.ndarray | torch.Tensor) -> tuple[np.ndarray, torch.dtype, tuple[int, ...]]:
    """An array's bytes (uint8, C order), dtype and shape; tensors of dtypes numpy lacks (bfloat16) too."""
    if isinstance(array, np.ndarray):
        array = np.ascontiguousarray(array)
        return array.reshape(-1).view(np.uint8), _TORCH_DTYPES[array.dtype], array.shape
    tensor = array.contiguous()
    return tensor.view(-1).view(torch.uint8).numpy(), tensor.dtype, tuple(tensor.shape)


class _Batch:
    """The trees of a batch padded to [B, T] (and [B, T, W] children), as device tensors, with
    ``extra`` host arrays of the caller: all in one host->device copy."""

    def __init__(
        self, trees: Sequence[TokenTree], device: torch.device, extra: Sequence[np.ndarray | torch.Tensor] = ()
    ) -> None:
        shapes = [tree_shape(tuple(tree.parents)) for tree in trees]
        self.shapes = shapes
        b, t = len(trees), max(len(tree) for tree in trees)
        w = max(s.width for s in shapes)
        nodes = np.zeros((4, b, t), dtype=np.int64)  # tokens, parents, rows, depth: one part, fewer views
        tokens, parents, rows, depth = nodes
        parents[:] = -1
        ancestors = np.zeros((b, t, t), dtype=bool)  # padding rows stay False, even on the diagonal
        children = np.full((b, t, w), -1, dtype=np.int64)
        start = 0
        for i, (tree, shape) in enumerate(zip(trees, shapes)):
            n = len(tree)
            tokens[i, :n] = tree.tokens
            parents[i, :n] = shape.parents
            rows[i, :n] = np.arange(start, start + n)  # padding points at row 0
            ancestors[i, :n, :n] = shape.ancestors
            depth[i, :n] = shape.depth
            children[i, :n, : shape.width] = shape.children
            start += n
        nodes_t, self.ancestors, self.children, *self.extra = _to_device([nodes, ancestors, children, *extra], device)
        self.tokens, self.parents, self.rows, self.depth = nodes_t.unbind(0)
        self.valid = self.ancestors.diagonal(dim1=1, dim2=2)  # a node is its own ancestor; padding is not
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
    q_index, q_all = _distinct_qs(trees)
    b = len(trees)
    n_draws = max(len(d) for d in draws)
    u = np.ones((b, n_draws), dtype=np.float64)
    for i, d in enumerate(draws):
        u[i, : len(d)] = d.numpy()
    last_u = u[np.arange(b), [len(d) - 1 for d in draws]]
    width = np.array([tree_shape(tuple(tree.parents)).width for tree in trees], dtype=np.int64)
    q_on_host = q_all is not None and q_all.device.type == "cpu"  # then it travels in the batch's one copy
    batch = _Batch(trees, device, [q_index, width, u, last_u, *([q_all] if q_on_host else [])])
    q_index_t, width_t, u_t, last_u_t = batch.extra[:4]
    if q_on_host:
        q_all = batch.extra[4]
    elif q_all is None:
        q_all = target.new_zeros(1, vocab)  # never read: every candidate is a point mass
    q_all = q_all.to(device, target.dtype)
    arange_b = torch.arange(b, device=device)

    node = torch.zeros(b, dtype=torch.long, device=device)
    active = torch.ones(b, dtype=torch.bool, device=device)
    leaf, bonus = torch.zeros_like(node), torch.zeros_like(node)
    p = target[batch.rows[:, 0]]
    for depth in range(max(int(shape.depth.max()) for shape in batch.shapes) + 1):
        kids, accept_u = _candidate_order(batch.children[arange_b, node], u_t, depth, width_t)
        chosen = torch.full_like(node, -1)
        for k in range(batch.width):
            trying = active & (chosen < 0) & (kids[:, k] >= 0)
            candidate = kids[:, k].clamp_min(0)
            x = batch.tokens[arange_b, candidate]
            qi = q_index_t[arange_b, candidate]
            point_mass = torch.zeros_like(p).scatter_(1, x[:, None], 1.0)  # (one_hot may sync to check x)
            q = torch.where((qi >= 0)[:, None], q_all[qi.clamp_min(0)], point_mass)
            accepted, p = _try_candidate(p, q, x, accept_u[:, k], trying, arange_b)
            chosen = torch.where(accepted, candidate, chosen)
        stop = active & (chosen < 0)
        cdf = p.cumsum(dim=1)
        drawn = torch.searchsorted(cdf, (last_u_t * cdf[:, -1])[:, None], right=True)[:, 0].clamp_max(vocab - 1)
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


def _distinct_qs(trees: Sequence[TokenTree]) -> tuple[np.ndarray, torch.Tensor | None]:
    """Each distinct q of the trees once (a node's children drawn from one q share it), stacked
    where they are, and per node [B, T] the index of its q (-1: a point mass); None: no q at all."""
    qs: dict[int, int] = {}
    stacked: list[torch.Tensor] = []
    q_index = np.full((len(trees), max(map(len, trees))), -1, dtype=np.int64)
    for i, tree in enumerate(trees):
        for node, q in enumerate(tree.probs):
            if q is not None:
                key = q.data_ptr()
                if key not in qs:
                    qs[key] = len(stacked)
                    stacked.append(q)
                q_index[i, node] = qs[key]
    return q_index, torch.stack(stacked) if stacked else None


def _candidate_order(
    kids: torch.Tensor, u: torch.Tensor, depth: int, width: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The current nodes' children ``kids`` [B, W] (-1 padded) in a uniformly random order (argsort
    of this depth's key uniforms; padding last) and an acceptance uniform per trial [B, W]."""
    slots = torch.arange(kids.shape[1], device=kids.device)
    base = depth * 2 * width[:, None]
    last = u.shape[1] - 1
    keys = u.gather(1, (base + slots).clamp_max(last))
    keys = torch.where((kids >= 0) & (slots < width[:, None]), keys, 2.0)  # no candidate: tried last
    return kids.gather(1, keys.argsort(dim=1)), u.gather(1, (base + width[:, None] + slots).clamp_max(last))


def _try_candidate(
    p: torch.Tensor, q: torch.Tensor, x: torch.Tensor, u: torch.Tensor, trying: torch.Tensor, arange_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One MSS trial per tree (where ``trying``): the candidate token ``x`` [B], drawn from ``q``
    [B, vocab], is accepted when u * q(x) < p(x); when rejected, p becomes norm(max(0, p - q)).
    Returns (accepted [B], the new p)."""
    q_x, p_x = q[arange_b, x], p[arange_b, x]
    # Strict, as the host: a token the LLM gives probability 0 is never accepted.
    accepted = trying & (u * q_x < p_x)
    residual = (p - q).clamp_min(0.0)
    total = residual.sum(dim=1, keepdim=True)
    # A zero residual means p <= q everywhere, i.e. p == q up to rounding: keep p.
    residual = torch.where(total > 0, residual / total.clamp_min(1e-300), p)
    return accepted, torch.where((trying & ~accepted)[:, None], residual, p)
