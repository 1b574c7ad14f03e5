"""Batched verification as tensor ops (tree/device_verify.py) against the host reference
(tree/verify.py): the same accepted paths for greedy, the same distribution for MSS."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from scipy.stats import chi2_contingency
from test_mss import ALPHA, g_test

from specinfer_dist.tree.device_verify import _to_device, mss_draws, verify_greedy_batch, verify_mss_batch
from specinfer_dist.tree.token_tree import TokenTree
from specinfer_dist.tree.verify import verify_greedy, verify_mss

VOCAB = 6


def random_tree(gen: torch.Generator, size: int, vocab: int, probs=None) -> TokenTree:
    """A random tree whose siblings have distinct tokens (as greedy trees do)."""
    tree = TokenTree.from_root(int(torch.randint(vocab, (1,), generator=gen)))
    for _ in range(size - 1):
        parent = int(torch.randint(len(tree), (1,), generator=gen))
        taken = {tree.tokens[c] for c in tree.children()[parent]}
        free = [t for t in range(vocab) if t not in taken]
        if free:
            tree.add(parent, free[int(torch.randint(len(free), (1,), generator=gen))])
    return tree.dfs()


def test_greedy_batch_equals_host_walk():
    gen = torch.Generator().manual_seed(0)
    vocab = 5  # small, so argmaxes often match drafted tokens and paths get deep
    trees = [random_tree(gen, int(torch.randint(1, 12, (1,), generator=gen)), vocab) for _ in range(300)]
    logits = torch.randn(sum(map(len, trees)), vocab, generator=gen)
    got = verify_greedy_batch(trees, logits)
    want = [verify_greedy(tree, rows) for tree, rows in zip(trees, logits.split([len(t) for t in trees]))]
    assert got == want
    assert max(len(accepted) for accepted, _ in want) >= 3  # the test reached deep paths


def _mss_tree(gen: torch.Generator, q1: torch.Tensor, q2: torch.Tensor) -> TokenTree:
    """Root with two draws from q1, one from q2 and a point mass; the first child has children too."""
    tree = TokenTree.from_root(0)
    first = tree.add(0, int(torch.multinomial(q1, 1, generator=gen)), q1)
    tree.add(0, int(torch.multinomial(q1, 1, generator=gen)), q1)
    tree.add(0, int(torch.multinomial(q2, 1, generator=gen)), q2)
    tree.add(0, 3, None)
    tree.add(first, int(torch.multinomial(q2, 1, generator=gen)), q2)
    tree.add(first, 1, None)
    return tree.dfs()


def _outcome(tree: TokenTree, accepted: list[int], bonus: int) -> tuple[int, ...]:
    return (*(tree.tokens[n] for n in accepted), bonus)


def _targets(tree: TokenTree, p_root: torch.Tensor, p_other: torch.Tensor) -> torch.Tensor:
    return torch.stack([p_root if node == 0 else p_other for node in range(len(tree))])


def test_mss_batch_has_the_host_distribution_and_first_token_p():
    gen = torch.Generator().manual_seed(1)
    p = torch.tensor([0.05, 0.4, 0.25, 0.3, 0.0, 0.0], dtype=torch.float64)
    p2 = torch.tensor([0.2, 0.1, 0.3, 0.1, 0.2, 0.1], dtype=torch.float64)
    q1 = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.2, 0.0], dtype=torch.float64)
    q2 = torch.tensor([0.1, 0.1, 0.5, 0.1, 0.1, 0.1], dtype=torch.float64)
    trials = 12_000
    trees = [_mss_tree(gen, q1, q2) for _ in range(trials)]
    targets = [_targets(tree, p, p2) for tree in trees]
    device = verify_mss_batch(trees, torch.cat(targets), [mss_draws(tree, gen) for tree in trees])
    host = [verify_mss(tree, target, gen) for tree, target in zip(trees, targets)]
    dev_counts = Counter(_outcome(t, *r) for t, r in zip(trees, device))
    host_counts = Counter(_outcome(t, *r) for t, r in zip(trees, host))
    first = Counter()
    for outcome, n in dev_counts.items():
        first[outcome[:1]] += n
    assert g_test(first, {(t,): p[t].item() for t in range(VOCAB)}) > ALPHA
    assert _same_distribution(dev_counts, host_counts)
    assert any(len(o) == 3 for o in dev_counts)  # two accepted tokens happened

    # Negative control: a p off by 0.03 of mass on the second level only is seen.
    p2_wrong = p2 + torch.tensor([0.03, 0, 0, -0.03, 0, 0], dtype=torch.float64)
    wrong = verify_mss_batch(
        trees, torch.cat([_targets(tree, p, p2_wrong) for tree in trees]), [mss_draws(tree, gen) for tree in trees]
    )
    assert not _same_distribution(Counter(_outcome(t, *r) for t, r in zip(trees, wrong)), host_counts)


def _same_distribution(a: Counter, b: Counter) -> bool:
    """Two-sample G-test (outcomes seen fewer than 10 times in all pooled)."""
    keys = sorted(set(a) | set(b), key=lambda o: -(a[o] + b[o]))
    common = [k for k in keys if a[k] + b[k] >= 10]
    rare = [k for k in keys if a[k] + b[k] < 10]
    table = np.array([[a[k] for k in common] + [sum(a[k] for k in rare)],
                      [b[k] for k in common] + [sum(b[k] for k in rare)]])
    table = table[:, table.sum(axis=0) > 0]
    return chi2_contingency(table, lambda_="log-likelihood").pvalue > ALPHA


def test_mss_batch_result_depends_only_on_the_request_own_draws():
    gen = torch.Generator().manual_seed(2)
    q1 = torch.softmax(torch.randn(VOCAB, generator=gen, dtype=torch.float64), 0)
    q2 = torch.softmax(torch.randn(VOCAB, generator=gen, dtype=torch.float64), 0)
    p = torch.softmax(torch.randn(VOCAB, generator=gen, dtype=torch.float64), 0)
    trees = [_mss_tree(gen, q1, q2) for _ in range(20)] + [TokenTree.from_root(2)]
    targets = [_targets(tree, p, p) for tree in trees]
    draws = [mss_draws(tree, gen) for tree in trees]
    together = verify_mss_batch(trees, torch.cat(targets), draws)
    alone = [verify_mss_batch([t], target, [d])[0] for t, target, d in zip(trees, targets, draws)]
    assert together == alone


def test_one_copy_carries_every_dtype_and_shape():
    """The packed host->device copy gives back each array bit for bit, whatever its dtype and size."""
    gen = torch.Generator().manual_seed(3)
    arrays = [
        np.arange(7, dtype=np.int64).reshape(7, 1),
        np.array([[True, False, True]] * 3),  # 9 bytes: the next part starts 8-aligned anyway
        torch.rand(2, 5, generator=gen, dtype=torch.float64).numpy(),
        torch.rand(3, 3, generator=gen),  # float32, odd number of elements
        torch.rand(5, generator=gen).to(torch.bfloat16),  # no numpy dtype: travels as a tensor
        np.zeros((0, 4), dtype=np.int64),
    ]
    got = _to_device(arrays, torch.device("cpu"))
    for array, tensor in zip(arrays, got):
        want = torch.from_numpy(array) if isinstance(array, np.ndarray) else array
        assert tensor.dtype == want.dtype and tensor.shape == want.shape
        assert torch.equal(tensor, want)
    meta = _to_device(arrays, torch.device("meta"))
    assert [(t.dtype, t.shape) for t in meta] == [(t.dtype, t.shape) for t in got]


def test_mss_batch_takes_q_of_any_float_dtype_and_point_masses_only():
    gen = torch.Generator().manual_seed(4)
    p = torch.softmax(torch.randn(VOCAB, generator=gen, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(VOCAB, generator=gen), 0)  # float32, as a drafter might record
    trees = [_mss_tree(gen, q, q.double()) for _ in range(50)]
    point_masses = [TokenTree([0, 1, 2], [-1, 0, 0], [None, None, None]) for _ in range(3)]
    for batch in (trees, point_masses, trees + point_masses):
        targets = [_targets(tree, p, p) for tree in batch]
        draws = [mss_draws(tree, gen) for tree in batch]
        together = verify_mss_batch(batch, torch.cat(targets), draws)
        assert together == [verify_mss_batch([t], target, [d])[0] for t, target, d in zip(batch, targets, draws)]


def test_verify_batch_mixes_greedy_and_distinct_sampling_settings():
    """tree/verify.py's batch: greedy rows, and sampled rows grouped by setting (each group's
    rows indexed on the logits' device): each request's result is what it gets alone."""
    from specinfer_dist.tree.verify import verify_batch

    gen = torch.Generator().manual_seed(5)
    trees = [random_tree(gen, 5, VOCAB) for _ in range(4)]
    logits = torch.randn(sum(len(t) for t in trees), VOCAB, generator=gen)
    settings = [(0.0, 0, 1.0), (0.8, 0, 1.0), (1.0, 3, 0.9), (0.8, 0, 1.0)]
    together = verify_batch(trees, logits, settings, [torch.Generator().manual_seed(10 + i) for i in range(4)])
    alone = [
        verify_batch([tree], rows, [setting], [torch.Generator().manual_seed(10 + i)])[0]
        for i, (tree, rows, setting) in enumerate(zip(trees, logits.split([len(t) for t in trees]), settings))
    ]
    assert together == alone
