import numpy as np
import pytest

from pipeline.errors import CurateError
from stages.kernels.scores.knn_shapley import knn_shapley


def naive_knn_shapley(train_x, train_y, test_x, test_y, k):
    """Direct loop over the Jia et al. recursion, one test point at a time."""
    n = len(train_x)
    values = np.zeros(n)
    for q, yq in zip(test_x, test_y):
        dist = ((train_x - q) ** 2).sum(1)
        order = sorted(range(n), key=lambda i: (dist[i], i))
        s = np.zeros(n)
        s[order[n - 1]] = float(train_y[order[n - 1]] == yq) / n
        for i in range(n - 2, -1, -1):  # 0-based i is rank i+1
            a, b = order[i], order[i + 1]
            s[a] = s[b] + (float(train_y[a] == yq) - float(train_y[b] == yq)) / k * min(k, i + 1) / (i + 1)
        values += s
    return values / len(test_x)


@pytest.mark.parametrize("k", [1, 3, 5, 10, 40])
def test_matches_naive_recursion(k):
    rng = np.random.default_rng(k)
    tx, ty = rng.normal(size=(37, 4)), rng.integers(0, 3, 37)
    qx, qy = rng.normal(size=(11, 4)), rng.integers(0, 3, 11)
    got = knn_shapley(tx, ty, qx, qy, k=k, block=4)
    np.testing.assert_allclose(got, naive_knn_shapley(tx, ty, qx, qy, k), atol=1e-6)


def test_values_sum_to_knn_accuracy_and_flag_mislabelled():
    # efficiency: values sum to the K-NN utility of the full set (mean of top-K label matches)
    rng = np.random.default_rng(0)
    centers = np.array([[0, 0], [6, 0], [0, 6]])
    ty = np.repeat(np.arange(3), 40)
    tx = centers[ty] + rng.normal(size=(120, 2))
    flipped = rng.choice(120, 12, replace=False)
    noisy = ty.copy()
    noisy[flipped] = (ty[flipped] + 1) % 3
    qy = np.repeat(np.arange(3), 20)
    qx = centers[qy] + rng.normal(size=(60, 2))
    v = knn_shapley(tx, noisy, qx, qy, k=5)
    d = ((qx[:, None] - tx[None]) ** 2).sum(-1)
    top = np.argsort(d, axis=1, kind="stable")[:, :5]
    utility = (noisy[top] == qy[:, None]).mean()
    assert v.sum() == pytest.approx(utility, abs=1e-9)
    lowest = set(np.argsort(v)[:12].tolist())
    assert len(lowest & set(flipped.tolist())) >= 11


def test_bad_input_is_named():
    x = np.zeros((3, 2))
    x[1, 0] = np.nan
    with pytest.raises(CurateError, match="training embedding row 1 is NaN"):
        knn_shapley(x, [0, 1, 0], np.zeros((1, 2)), [0])
    with pytest.raises(CurateError, match="without labels"):
        knn_shapley(np.zeros((3, 2)), [0, 1, 0], np.zeros((1, 2)), [-1])
