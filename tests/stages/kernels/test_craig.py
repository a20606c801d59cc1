"""CRAIG: facility location against apricot, the sparse graph, weights, degenerate classes."""

import numpy as np
import pytest
import torch

from pipeline.errors import CurateError
from stages.kernels.coresets.facility import (DenseSimilarity, SparseSimilarity, assignment_weights, craig, lazy_greedy,
                                      similarity, stochastic_greedy)
from stages.kernels.coresets.features import last_layer, plain
from pipeline.sampling import proportional_allocation


def clustered(n=1800, d=16, centres=24, classes=3, seed=0):
    """Gaussian blobs; each blob belongs to one class, so classes have structure to cover."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(centres, d)) * 3
    blob = rng.integers(0, centres, n)
    x = (mu[blob] + rng.normal(size=(n, d))).astype(np.float32)
    return x, blob % classes


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_objective_matches_apricot_per_class(metric):
    apricot = pytest.importorskip("apricot")
    x, y = clustered(n=1200)
    alloc = proportional_allocation(np.bincount(y), 60)
    feats = plain(x)
    members = [np.flatnonzero(y == c) for c in range(3)]
    sims = [similarity(feats.take(m), metric).s.double().numpy() for m in members]
    refs = [apricot.FacilityLocationSelection(int(a), metric="precomputed", optimizer="lazy").fit(s).ranking
            for a, s in zip(alloc, sims)]
    for optimizer, floor in (("lazy", 0.9999), ("stochastic", 0.99)):
        rows, _, info = craig(feats, y, alloc, metric=metric, optimizer=optimizer, seed=0)
        for c in range(3):
            ours = np.searchsorted(members[c], rows[np.isin(rows, members[c])])
            ours_obj, ref_obj = sims[c][:, ours].max(1).sum(), sims[c][:, refs[c]].max(1).sum()
            assert ours_obj >= floor * ref_obj, (optimizer, c, ours_obj / ref_obj)
            assert info["objective"][c] == pytest.approx(ours_obj, rel=1e-5)
            if optimizer == "lazy":  # exact greedy: the same picks in the same order
                assert ours.tolist() == refs[c].tolist()


def test_sparse_graph_memory_and_gains():
    x, _ = clustered(n=600)
    f = plain(x)
    sp = SparseSimilarity.build(f, "euclidean", k=10)
    assert len(sp.rows) == 600 * 10  # n * k entries, never n^2
    full = SparseSimilarity.build(f, "euclidean", k=600)  # every neighbour kept: the dense matrix again
    dense = DenseSimilarity.build(f, "euclidean")
    cand, cur = torch.arange(0, 600, 7), torch.rand(600)
    np.testing.assert_allclose(full.gains(cand, cur).numpy(), dense.gains(cand, cur).numpy(), rtol=1e-4)
    a, b = cur.clone(), cur.clone()
    full.cover(5, a)
    dense.cover(5, b)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5)


def test_sparse_picks_cover_nearly_as_well_as_dense():
    x, _ = clustered(n=3000, centres=30)
    f = plain(x)
    dense = similarity(f, "euclidean", graph="dense")
    s = dense.s.double().numpy()
    best = s[:, lazy_greedy(dense, 150)].max(1).sum()
    sparse = similarity(f, "euclidean", graph="sparse", knn=16)
    assert isinstance(sparse, SparseSimilarity)
    for picks in (lazy_greedy(sparse, 150), stochastic_greedy(sparse, 150, seed=0)):
        assert s[:, picks].max(1).sum() >= 0.99 * best


def test_weights_are_cluster_sizes_when_budget_equals_clusters():
    rng = np.random.default_rng(1)
    sizes = [50, 120, 30, 200]
    x = np.concatenate([c * 100 + rng.normal(size=(n, 8)) * 0.1 for c, n in enumerate(sizes)]).astype(np.float32)
    y = np.zeros(len(x), np.int64)
    rows, w, _ = craig(plain(x), y, np.array([4]), optimizer="lazy")
    cluster = np.repeat(np.arange(4), sizes)
    assert sorted(cluster[rows].tolist()) == [0, 1, 2, 3]  # one medoid per blob
    np.testing.assert_allclose(w, np.array(sizes)[cluster[rows]])


def test_factored_last_layer_gradients_equal_materialised():
    rng = np.random.default_rng(2)
    err, h = rng.normal(size=(40, 5)).astype(np.float32), rng.normal(size=(40, 7)).astype(np.float32)
    g = last_layer(err, h)
    dense = g.dense().numpy()
    assert dense.shape == (40, 5 * 8)
    np.testing.assert_allclose(g.gram(slice(3, 9)).numpy(), dense[3:9] @ dense.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g.sqnorms().numpy(), (dense ** 2).sum(1), rtol=1e-5)
    sub = g.take([4, 1])
    np.testing.assert_allclose(g.gram(slice(0, 40), sub).numpy(), dense @ dense[[4, 1]].T, rtol=1e-4, atol=1e-4)


def test_identical_features_and_empty_class_are_handled():
    x = np.ones((100, 4), np.float32)
    y = np.repeat([0, 2], 50)  # class 1 has no samples
    alloc = proportional_allocation(np.bincount(y, minlength=3), 10)
    assert alloc.tolist() == [5, 0, 5]
    rows, w, info = craig(plain(x), y, alloc)
    assert len(set(rows.tolist())) == 10 and sorted(set(y[rows].tolist())) == [0, 2]
    np.testing.assert_allclose(w, 10.0)  # ties split: each pick stands for 50 / 5 samples
    assert info["saturated"] == [0, 2]


def test_assignment_weights_sum_to_class_size_and_budget_errors():
    x, y = clustered(n=500)
    f = plain(x)
    picks = np.array([3, 77, 200, 401])
    w = assignment_weights(f, picks, "euclidean")
    assert w.sum() == pytest.approx(500)
    d = ((x[:, None] - x[picks][None]) ** 2).sum(-1)
    np.testing.assert_allclose(w, np.bincount(d.argmin(1), minlength=4))
    with pytest.raises(CurateError, match="class 0 has .* fewer than its budget"):
        craig(f, y, np.array([10_000, 0, 0]))


def test_deterministic_for_a_seed():
    x, y = clustered()
    alloc = proportional_allocation(np.bincount(y), 60)
    a = craig(plain(x), y, alloc, seed=3, graph="sparse", knn=8)
    b = craig(plain(x), y, alloc, seed=3, graph="sparse", knn=8)
    c = craig(plain(x), y, alloc, seed=4, graph="sparse", knn=8)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_saturation_is_reported_only_past_the_distinct_points_even_far_from_the_origin():
    rng = np.random.default_rng(0)
    distinct = rng.normal(size=(5, 8)).astype(np.float32) * 3 + 1000  # large norms, small distances
    which = rng.integers(0, 5, 200)
    y = np.zeros(200, np.int64)
    rows, w, info = craig(plain(distinct[which]), y, np.array([5]))
    assert info["saturated"] == [] and sorted(which[rows].tolist()) == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(sorted(w), sorted(np.bincount(which)))  # one pick per distinct point
    _, _, info = craig(plain(distinct[which]), y, np.array([8]))
    assert info["saturated"] == [0]


def test_unlabelled_pool_is_one_group_through_the_stage_helper():
    from stages.select import Pool

    groups, alloc = Pool(ctx=None, rows=np.arange(6), labels=np.full(6, -1)).class_alloc(3)
    assert groups.tolist() == [0] * 6 and alloc.tolist() == [3]
    with pytest.raises(CurateError, match=r"per-class selection needs a label on every sample \(row 1"):
        Pool(ctx=None, rows=np.arange(3), labels=np.array([0, -1, 1])).class_alloc(2)
