import numpy as np
import pytest
import scipy.optimize
import torch

from pipeline.errors import CurateError
from stages.kernels.coresets import gradmatch
from stages.kernels.coresets.gradmatch import gradmatch_per_batch, gradmatch_per_class, matching_error, omp_nonneg


def ridge_objective(A, b, idx, w, lam):
    a = np.asarray(A, np.float64)[idx]
    return float(np.sum((a.T @ w - b) ** 2) + lam * np.sum(np.asarray(w, np.float64) ** 2))


def scipy_ridge_nnls(A, b, idx, lam):
    """Reference: NNLS on the stacked system [A_S^T; sqrt(lam) I] w ~ [b; 0]."""
    a = np.asarray(A, np.float64)[idx]
    m = len(idx)
    w, _ = scipy.optimize.nnls(np.vstack([a.T, np.sqrt(lam) * np.eye(m)]), np.concatenate([b, np.zeros(m)]),
                               maxiter=50 * m)
    return w


def unconstrained_omp(A, b, k, lam):
    """Plain OMP without the sign constraint: the ridge solution on the greedy support."""
    idx, r = [], b.copy()
    for _ in range(k):
        corr = A @ r
        corr[idx] = -np.inf
        idx.append(int(np.argmax(corr)))
        a = A[idx]
        w = np.linalg.solve(a @ a.T + lam * np.eye(len(idx)), a @ b)
        r = b - a.T @ w
    return idx, w


@pytest.fixture(scope="module")
def clustered():
    """3 classes x 300 samples of 20-d 'gradients': a class mean plus noise, with a few outliers."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 300)
    centers = rng.normal(size=(3, 20)) * 2
    g = centers[labels] + rng.normal(size=(900, 20)) * 1.5
    g[rng.choice(900, 30, replace=False)] *= 4
    return g.astype(np.float32), labels


def test_recovers_planted_sparse_nonnegative_combination():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(200, 50))
    b = A[[3, 17, 42]].T @ np.array([2.0, 0.5, 1.0])
    idx, w, res = omp_nonneg(A, b, 10, lam=1e-6, tol=1e-6)
    assert idx.dtype == np.int64 and w.dtype == np.float32
    assert set(idx.tolist()) == {3, 17, 42}
    got = dict(zip(idx.tolist(), w.tolist()))
    np.testing.assert_allclose([got[3], got[17], got[42]], [2.0, 0.5, 1.0], rtol=1e-4)
    assert res < 1e-6


def test_weights_stay_positive_where_plain_omp_goes_negative():
    # strongly correlated atoms (a common positive mean) and a target off their cone:
    # the unconstrained ridge fit on an OMP support needs negative weights
    rng = np.random.default_rng(1)
    A = 1.0 + 0.3 * rng.normal(size=(60, 10))
    b = rng.normal(size=10) + 2.0
    lam = 1e-3
    plain_idx, plain_w = unconstrained_omp(A, b, 8, lam)
    assert (plain_w < 0).any()  # the case is meaningful

    idx, w, res = omp_nonneg(A, b, 8, lam=lam, tol=1e-9)
    assert len(idx) >= 1 and (w > 0).all()
    assert len(set(idx.tolist())) == len(idx)
    # the weights are the constrained optimum on the support: stationary there (KKT, w > 0)
    a = A[idx]
    np.testing.assert_allclose(a @ (b - a.T @ w.astype(np.float64)), lam * w, atol=1e-4)
    np.testing.assert_allclose(res, np.linalg.norm(a.T @ w - b) / np.linalg.norm(b), rtol=1e-5)
    # and better than simply clipping plain OMP's negative weights on its own support
    clipped = np.clip(plain_w, 0, None)
    assert ridge_objective(A, b, idx, w, lam) < ridge_objective(A, b, plain_idx, clipped, lam)


def test_nnls_weights_match_scipy_nnls():
    rng = np.random.default_rng(2)
    A = 1.0 + 0.5 * rng.normal(size=(80, 15))
    b = rng.normal(size=15) + 1.5
    lam = 0.5
    idx, w, _ = omp_nonneg(A, b, 12, lam=lam, tol=1e-9)
    ours = ridge_objective(A, b, idx, w.astype(np.float64), lam)
    ref = ridge_objective(A, b, idx, scipy_ridge_nnls(A, b, idx, lam), lam)
    assert abs(ours - ref) <= 1e-6 * ref


@pytest.mark.parametrize("pdas_steps", [30, 0])  # warm-started, and plain Lawson-Hanson from zero
def test_nnls_kernel_is_exact_with_active_constraints(monkeypatch, pdas_steps):
    monkeypatch.setattr(gradmatch, "_PDAS_STEPS", pdas_steps)
    for seed in range(20):
        rng = np.random.default_rng(seed)
        m, d, lam = 25, 30, [1e-6, 0.5][seed % 2]
        X = rng.normal(size=(m, d)) + 1.0
        b = rng.normal(size=d)
        G, h = X @ X.T + lam * np.eye(m), X @ b
        w0 = np.linalg.solve(G, h)
        w = gradmatch._nnls_gram(torch.tensor(G), torch.tensor(h), torch.tensor(w0)).numpy()
        ref = scipy_ridge_nnls(X, b, np.arange(m), lam)
        assert (w >= 0).all() and (w == 0).any() and (w0 < 0).any()
        f = lambda v: 0.5 * v @ G @ v - h @ v  # noqa: E731
        assert f(w) <= f(ref) + 1e-9 * abs(f(ref))


def test_zero_target_and_bad_settings():
    A = np.ones((5, 3))
    idx, w, res = omp_nonneg(A, np.zeros(3), 3)
    assert len(idx) == 0 and len(w) == 0 and res == 0.0
    with pytest.raises(CurateError, match="lam must be >= 0, got -1"):
        omp_nonneg(A, np.ones(3), 3, lam=-1)
    with pytest.raises(CurateError, match="tol must be >= 0"):
        omp_nonneg(A, np.ones(3), 3, tol=-0.1)


def test_per_class_matches_gradients_better_than_random(clustered):
    g, labels = clustered
    alloc = np.array([30, 30, 30])
    rows, w, info = gradmatch_per_class(g, labels, alloc, seed=0)
    assert rows.dtype == np.int64 and w.dtype == np.float32
    assert len(np.unique(rows)) == len(rows) == 90
    np.testing.assert_array_equal(np.bincount(labels[rows], minlength=3), alloc)
    assert (w > 0).all()
    for c in range(3):  # weight-normalised training keeps each class's share
        assert abs(w[labels[rows] == c].sum() - 300) < 30
    assert info["omp_selected"] + info["topped_up"] == 90 and info["omp_selected"] > 0
    assert set(info["residual_per_class"]) == {0, 1, 2}

    ours = matching_error(g, rows, w)
    rand = []
    for s in range(20):  # stratified random subsets of the same size, weight 1
        rng = np.random.default_rng(100 + s)
        pick = np.concatenate([rng.choice(np.flatnonzero(labels == c), 30, replace=False) for c in range(3)])
        rand.append(matching_error(g, pick, np.ones(90)))
    assert ours < 0.5 * np.mean(rand)


def test_large_tol_stops_early_and_tops_up_to_exact_count(clustered):
    g, labels = clustered
    alloc = np.array([40, 0, 25])
    rows, w, info = gradmatch_per_class(g, labels, alloc, tol=0.3)
    assert info["topped_up"] > 0 and info["omp_selected"] < 65
    assert all(r <= 0.3 for r in info["residual_per_class"].values())
    assert set(info["residual_per_class"]) == {0, 2}
    np.testing.assert_array_equal(np.bincount(labels[rows], minlength=3), alloc)
    assert len(np.unique(rows)) == 65 and (w > 0).all()
    # order: class by class, OMP picks first, then top-ups, which share one weight
    assert (np.diff(labels[rows]) >= 0).all()
    m0 = info["omp_per_class"][0]
    assert m0 < 40 and len(np.unique(w[m0:40])) == 1
    # top-ups included, each class's weights sum to its size: classes keep their share
    np.testing.assert_allclose(np.bincount(labels[rows], weights=w, minlength=3), [300, 0, 300], rtol=1e-5)


def test_gradient_scale_does_not_change_the_selection(clustered):
    g, labels = clustered
    alloc = np.array([20, 20, 20])
    base = gradmatch_per_class(g, labels, alloc)
    for scale in (0.01, 100.0):
        rows, w, _ = gradmatch_per_class(g * scale, labels, alloc)
        assert np.array_equal(rows, base[0])
        np.testing.assert_allclose(w, base[1], rtol=1e-3)


def test_deterministic_and_seed_only_moves_top_ups(clustered):
    g, labels = clustered
    alloc = np.array([30, 30, 30])
    a = gradmatch_per_class(g, labels, alloc, tol=0.2, seed=3)
    b = gradmatch_per_class(g, labels, alloc, tol=0.2, seed=3)
    c = gradmatch_per_class(g, labels, alloc, tol=0.2, seed=4)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert a[2] == b[2]
    assert a[2]["topped_up"] > 0
    assert a[2]["omp_per_class"] == c[2]["omp_per_class"]
    omp = np.concatenate([np.arange(m) + 30 * cls for cls, m in a[2]["omp_per_class"].items()])
    assert np.array_equal(a[0][omp], c[0][omp]) and not np.array_equal(a[0], c[0])  # seed moves top-ups only


def test_per_batch_returns_whole_batches_and_beats_random_batches(clustered):
    g, labels = clustered
    n, bs, k = len(g), 16, 150  # 10 batches, the last cut to 6 rows
    rows, w, info = gradmatch_per_batch(g, k, batch_size=bs, seed=0)
    assert len(rows) == k and len(np.unique(rows)) == k and (w > 0).all()
    batches = np.random.default_rng(0).permutation(n)
    batches = [set(batches[s:s + bs].tolist()) for s in range(0, n, bs)]
    chunks = [rows[s:s + bs] for s in range(0, k, bs)]
    for i, ch in enumerate(chunks):
        owner = [b for b in batches if set(ch.tolist()) <= b]
        assert len(owner) == 1  # one batch per chunk ...
        assert len(ch) == len(owner[0]) or i == len(chunks) - 1  # ... whole, except the cut last one
        assert len(np.unique(w[i * bs:i * bs + len(ch)])) == 1  # one weight per batch
    assert info["omp_selected"] + info["topped_up"] == k
    assert info["omp_batches"] + info["topped_up_batches"] == len(chunks)
    assert info["omp_batches"] <= -(-k // bs)

    ours = matching_error(g, rows, w)
    rand = []
    for s in range(20):
        perm = np.random.default_rng(100 + s).permutation(n)
        rand.append(matching_error(g, perm[:k], np.ones(k)))  # k rows of random batches, weight 1
    assert ours < 0.5 * np.mean(rand)
    again = gradmatch_per_batch(g, k, batch_size=bs, seed=0)
    assert np.array_equal(rows, again[0]) and np.array_equal(w, again[1])


def test_bad_gradients_and_alloc_raise(clustered):
    g, labels = clustered
    bad = g.copy()
    bad[17, 3] = np.nan
    bad[40, 0] = np.inf
    with pytest.raises(CurateError, match="gradmatch: gradient row 17 is NaN or infinite"):
        gradmatch_per_class(bad, labels, np.array([5, 5, 5]))
    with pytest.raises(CurateError, match="gradient row 17"):
        gradmatch_per_batch(bad, 10, batch_size=4)
    with pytest.raises(CurateError, match="alloc for class 1 is 301 but the class has only 300"):
        gradmatch_per_class(g, labels, np.array([5, 301, 5]))
    with pytest.raises(CurateError, match="labels must be in 0..1"):
        gradmatch_per_class(g, labels, np.array([5, 5]))
    with pytest.raises(CurateError, match="batch_size must be >= 1"):
        gradmatch_per_batch(g, 10, batch_size=0)


def test_identical_gradients_are_handled():
    grads = np.ones((300, 8), np.float32)
    rows, w, info = gradmatch_per_class(grads, np.zeros(300, np.int64), np.array([30]))
    assert len(set(rows.tolist())) == 30 and (w > 0).all() and w.sum() == pytest.approx(300, rel=1e-5)
    assert info["residual_per_class"][0] <= 1e-3  # identical atoms still match the target
    # a strong ridge spreads the class evenly over identical atoms instead of stopping early
    rows, w, info = gradmatch_per_class(grads, np.zeros(300, np.int64), np.array([30]), lam=0.5)
    np.testing.assert_allclose(w, 10.0, rtol=1e-4)


def test_factored_gradients_give_the_same_selection_class_by_class():
    from stages.kernels.coresets.features import last_layer

    rng = np.random.default_rng(0)
    feats = last_layer(rng.normal(size=(600, 4)), rng.normal(size=(600, 6)))
    labels = rng.integers(0, 3, 600)
    dense = feats.dense().numpy()
    a = gradmatch_per_class(dense, labels, np.array([10, 10, 10]))
    b = gradmatch_per_class(feats, labels, np.array([10, 10, 10]))  # never builds all 600 x 28 at once
    assert np.array_equal(a[0], b[0]) and np.allclose(a[1], b[1])
    assert matching_error(feats, a[0], a[1], block=7) == pytest.approx(matching_error(dense, a[0], a[1]), rel=1e-9)
