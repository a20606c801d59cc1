"""Exact K-nearest-neighbour Shapley values (Jia et al. 2019, closed-form recursion).

For one test point, sort training points by distance (nearest first, ties by index);
with m_i = 1[label of i-th nearest == test label] and N training points:

    s_N = m_N / N
    s_i = s_{i+1} + (m_i - m_{i+1}) / K * min(K, i) / i        (i = N-1 .. 1)

A sample's value is its s averaged over the test points. Here the recursion is a
reversed cumulative sum, computed for a block of test points at a time, so memory is
O(block * N) and never N x N_test.

At scale (`knn.backend: faiss`, or auto past EXACT_PAIRS training x test pairs) each test point ranks only
its L = max(K, knn.k) nearest training points (stages.kernels.knn.knn_search), the truncation of
Jia et al. 2019 (for i >= K, |s_i| <= 1 / i). What lies past rank L is estimated instead of
dropped: with q the fraction of training labels equal to the test label, the exact tail
s_i = m_i / i - sum_{j>i} m_j / (j (j - 1)) is about (m_i - q) / i + q / N, which starts the
recursion at s_L; a training point outside the L gets (m_i - q) E[1 / i] + q / N with i uniform
over L+1 .. N, so it keeps the sign of its label agreement. Memory: O(N_test * L).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.errors import CurateError


# Under `backend: auto` the exact values are kept while N x N_test is at most this many pairs
# (60,000 x 10,000 took 48 s on 2 CPU cores): a sort per test point costs far less than the
# N x N graph that exact_max_n bounds, and the truncated estimate loses recall (54,000 Fashion-MNIST
# images with 10% flipped: 71% of the flips in the lowest-valued 10% at depth 32, 77% at 128,
# against 83% exact).
EXACT_PAIRS = 10**9


def _check(name: str, x: np.ndarray) -> None:
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise CurateError(f"knn_shapley: {name} row {bad} is NaN or infinite")


def knn_shapley(train_x, train_y, test_x, test_y, k: int = 10, *, block: int = 256,
                device: str | torch.device = "cpu", dtype=torch.float64, knn: dict | None = None) -> np.ndarray:
    """Shapley value of each training sample for a K-NN classifier's test accuracy, float64 [N].
    knn: the run's `knn:` section; None or its rule picking exact: every test point ranks all N."""
    train_x, test_x = np.asarray(train_x), np.asarray(test_x)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    n = len(train_x)
    if n == 0 or len(test_x) == 0:
        raise CurateError("knn_shapley: needs at least one training and one test sample")
    if k < 1:
        raise CurateError(f"knn_shapley: k must be >= 1, got {k}")
    if (test_y < 0).any():
        raise CurateError("knn_shapley: the validation split has samples without labels")
    _check("training embedding", train_x)
    _check("validation embedding", test_x)
    if knn is not None:
        from stages.kernels.knn import EXACT_MAX_N, choose_backend

        backend = knn.get("backend", "auto")
        affordable = backend == "auto" and n * len(test_x) <= EXACT_PAIRS
        if not affordable and choose_backend(n, backend, device, knn.get("exact_max_n", EXACT_MAX_N)) == "faiss":
            return _truncated(train_x, train_y, test_x, test_y, k, knn)
    dev = torch.device(device)
    xt = torch.as_tensor(train_x, dtype=torch.float32, device=dev)
    yt = torch.as_tensor(train_y, device=dev)
    ranks = torch.arange(1, n, device=dev, dtype=dtype)  # i = 1 .. N-1
    coef = torch.clamp(ranks, max=k) / (k * ranks)
    total = torch.zeros(n, dtype=dtype, device=dev)
    sq_train = (xt * xt).sum(1)
    for start in range(0, len(test_x), block):
        xq = torch.as_tensor(test_x[start:start + block], dtype=torch.float32, device=dev)
        yq = torch.as_tensor(test_y[start:start + block], device=dev)
        d = sq_train[None, :] - 2.0 * xq @ xt.T  # + |q|^2, constant per row: order unchanged
        order = torch.sort(d, dim=1, stable=True).indices
        match = (yt[order] == yq[:, None]).to(dtype)  # [B, N], nearest first
        diff = (match[:, :-1] - match[:, 1:]) * coef  # term i for i = 1 .. N-1
        s = match[:, -1:] / n + torch.flip(torch.cumsum(torch.flip(diff, [1]), 1), [1])
        s = torch.cat([s, match[:, -1:] / n], dim=1)  # s_1 .. s_N in sorted order
        # each row of `order` is a permutation: un-sort per row, then sum in a fixed order
        # (a scatter_add over all rows would use atomics on CUDA and vary in the last bits)
        total += torch.empty_like(s).scatter_(1, order, s).sum(0)
    return (total / len(test_x)).cpu().numpy()


# The truncated estimate ranks well only from enough neighbours: on digits, Spearman against the exact
# values is 0.907 at depth 32 and 0.991 at 128 (tests/stages/kernels/test_knn_consumers.py); 60,000
# Fashion-MNIST images at depth 32 lost the flipped-label recall the exact values have.
MIN_DEPTH = 128


def _truncated(train_x, train_y, test_x, test_y, k: int, knn: dict) -> np.ndarray:
    """knn_shapley from each test point's L nearest training points (faiss), the rest estimated."""
    from stages.kernels.knn import graph_kwargs, knn_search

    n, nt = len(train_x), len(test_x)
    depth = min(n, max(int(k), int(knn.get("k", 32)), MIN_DEPTH))
    idx, _ = knn_search(train_x, test_x, depth, metric="l2", **{**graph_kwargs(knn), "backend": "faiss"})
    classes, train_code = np.unique(train_y, return_inverse=True)
    prior = np.bincount(train_code, minlength=len(classes)) / n
    pos = np.searchsorted(classes, test_y)
    known = (pos < len(classes)) & (classes[np.minimum(pos, len(classes) - 1)] == test_y)
    q = np.where(known, prior[np.minimum(pos, len(classes) - 1)], 0.0)  # [T]
    a = math.log(n / depth) / (n - depth) if n > depth else 0.0  # E[1 / i], i uniform over depth+1 .. n
    # every (train, test) pair as if outside the L: (m - q) a + q / N, summed over the test points
    test_per_class = np.array([np.sum(test_y == c) for c in classes], np.float64)
    total = a * test_per_class[train_code] + (1.0 / n - a) * q.sum()
    # the L nearest: the recursion from the tail estimate at rank L
    m = (train_y[idx] == test_y[:, None]).astype(np.float64)  # [T, L], nearest first
    ranks = np.arange(1, depth + 1, dtype=np.float64)
    s = np.empty_like(m)
    s[:, -1] = (m[:, -1] - q) / depth + q / n if n > depth else m[:, -1] / n
    coef = np.minimum(ranks[:-1], k) / (k * ranks[:-1])  # i = 1 .. L-1
    diff = (m[:, :-1] - m[:, 1:]) * coef
    s[:, :-1] = s[:, -1:] + np.flip(np.cumsum(np.flip(diff, 1), 1), 1)
    outside = (m - q[:, None]) * a + q[:, None] / n
    total += np.bincount(idx.reshape(-1), weights=(s - outside).reshape(-1), minlength=n)
    return total / nt
