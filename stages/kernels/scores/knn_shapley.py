"""Exact K-nearest-neighbour Shapley values (Jia et al. 2019, closed-form recursion).

For one test point, sort training points by distance (nearest first, ties by index);
with m_i = 1[label of i-th nearest == test label] and N training points:

    s_N = m_N / N
    s_i = s_{i+1} + (m_i - m_{i+1}) / K * min(K, i) / i        (i = N-1 .. 1)

A sample's value is its s averaged over the test points. Here the recursion is a
reversed cumulative sum, computed for a block of test points at a time, so memory is
O(block * N) and never N x N_test.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.errors import CurateError


def _check(name: str, x: np.ndarray) -> None:
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise CurateError(f"knn_shapley: {name} row {bad} is NaN or infinite")


def knn_shapley(train_x, train_y, test_x, test_y, k: int = 10, *, block: int = 256,
                device: str | torch.device = "cpu", dtype=torch.float64) -> np.ndarray:
    """Shapley value of each training sample for a K-NN classifier's test accuracy, float64 [N]."""
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
