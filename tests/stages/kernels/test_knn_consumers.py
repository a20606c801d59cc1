"""The run's `knn:` section reaches every consumer: craig's sparse graph, knn_shapley, the k-means of
SemDeDup, clipcov / sas pseudo-classes and prototype scores; and it is in the fingerprint of exactly
the units that use it. Approximate results are compared with the exact ones on structured data."""

from __future__ import annotations

import numpy as np
import pytest

import stages.kernels.knn as knn_mod
from stages.kernels.coresets.clipcov import kmeans_groups
from stages.kernels.coresets.dedup import semdedup_walk
from stages.kernels.coresets.facility import assignment_weights, craig, objective, similarity, stochastic_greedy
from stages.kernels.coresets.features import plain
from stages.kernels.scores.knn_shapley import knn_shapley
from stages.kernels.scores.prototype import prototype_distance

from tests.helpers import load_bench

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAISS = {"backend": "faiss"}
EXACT = {"backend": "exact"}
# Gaussian clusters, each along its own low-dimensional subspace: neighbours mean something
manifold_clusters = load_bench("knn_quality").manifold_clusters


def spy(monkeypatch, name):
    calls = []
    real = getattr(knn_mod, name)

    def wrapped(*a, **kw):
        calls.append(kw.get("backend"))
        return real(*a, **kw)

    monkeypatch.setattr(knn_mod, name, wrapped)
    return calls


def graph_pairs(sim) -> set:
    """(row, neighbour) pairs of a SparseSimilarity."""
    cols = np.repeat(np.arange(sim.n), np.diff(sim.indptr.numpy()))
    return set(zip(sim.rows.tolist(), cols.tolist()))


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_craig_objective_on_the_faiss_graph(monkeypatch, metric):
    """CRAIG's picks from a faiss graph reach >= 0.99 of the exact graph's picks' facility-location
    objective, both measured on the exact k-NN graph (20,000 x 64, 40 clusters, 10% picked). nprobe 12
    (of 566 lists) keeps the graph's recall below 0.99, so the two graphs and their picks differ."""
    x, _ = manifold_clusters(latent=16, noise=0.3)
    feats, labels, alloc = plain(x), np.zeros(len(x), np.int64), np.array([2000])
    opts = {**FAISS, "nprobe": 12}
    calls = spy(monkeypatch, "knn_graph")
    rows_a, w_a, info_a = craig(feats, labels, alloc, metric=metric, graph="sparse", knn_options=opts, seed=0)
    assert calls == ["faiss"] and info_a["graph"] == {0: "sparse"}
    exact = similarity(feats, metric, graph="sparse", knn=32, knn_options=EXACT)
    assert calls == ["faiss"]  # the exact graph is the torch blocks, as before
    rows_e = stochastic_greedy(exact, 2000, seed=0)  # what craig picks on the exact graph (seed + class 0)
    recall = len(graph_pairs(similarity(feats, metric, graph="sparse", knn=32, knn_options=opts))
                 & graph_pairs(exact)) / (len(x) * 32)
    assert 0.9 <= recall < 0.99, recall
    assert len(set(rows_a.tolist()) ^ set(rows_e.tolist())) > 100  # different picks
    ratio = objective(exact, rows_a) / objective(exact, rows_e)
    assert ratio >= 0.99, ratio
    assert len(np.unique(rows_a)) == 2000 and w_a.sum() == pytest.approx(len(x), rel=1e-4)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_craig_weights_from_faiss_agree_with_the_exact_assignment(metric):
    """Past exact_max_n each sample's nearest pick comes from a faiss index of the picks: on 20,000 x 64
    in 40 clusters with 2,000 picks, at most 1% of the samples go to another pick than the exact
    assignment's, and every sample still counts once."""
    x, _ = manifold_clusters(latent=16, noise=0.3)
    feats, picks = plain(x), np.sort(np.random.default_rng(0).choice(len(x), 2000, replace=False))
    exact = assignment_weights(feats, picks, metric)
    approx = assignment_weights(feats, picks, metric, {**FAISS, "nprobe": 12}, seed=0)
    assert approx.dtype == np.float32 and approx.sum() == pytest.approx(len(x), rel=1e-5)
    moved = np.abs(approx.astype(np.float64) - exact).sum() / 2  # each moved sample shifts one unit
    assert moved <= 0.01 * len(x), moved
    below = {"backend": "auto", "exact_max_n": 50_000}  # the auto rule below exact_max_n: the exact weights
    assert np.array_equal(assignment_weights(feats, picks, metric, below), exact)


def test_sparse_graph_faiss_matches_exact_layout():
    """The faiss graph has the exact graph's shape and values: self first at similarity max, the
    same columns for every row the approximate search found fully (recall >= 0.9 overall)."""
    x, _ = manifold_clusters(n=6000, clusters=10)
    for metric in ("euclidean", "cosine"):
        e = similarity(plain(x), metric, graph="sparse", knn=16, knn_options=EXACT)
        a = similarity(plain(x), metric, graph="sparse", knn=16, knn_options={**FAISS, "nprobe": 16})
        assert a.n == e.n and len(a.rows) == len(e.rows) == 6000 * 16
        pairs_e = set(zip(e.rows.tolist(), np.repeat(np.arange(e.n), np.diff(e.indptr.numpy())).tolist()))
        pairs_a = set(zip(a.rows.tolist(), np.repeat(np.arange(a.n), np.diff(a.indptr.numpy())).tolist()))
        assert len(pairs_a & pairs_e) / len(pairs_e) >= 0.9
        assert a.top() == pytest.approx(e.top(), rel=1e-3)
    # auto picks exact below exact_max_n: byte-identical to no options at all
    e = similarity(plain(x), "euclidean", graph="sparse", knn=16)
    d = similarity(plain(x), "euclidean", graph="sparse", knn=16, knn_options={"backend": "auto"})
    assert all(np.array_equal(getattr(e, f).numpy(), getattr(d, f).numpy()) for f in ("indptr", "rows", "vals"))


def digits_split(flip=0.1, seed=0):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    p = rng.permutation(len(x))
    tr, te = p[:1400], p[1400:]
    ytr = y[tr].copy()
    flipped = rng.choice(len(tr), int(flip * len(tr)), replace=False)
    ytr[flipped] = (ytr[flipped] + 1 + rng.integers(9, size=len(flipped))) % 10
    return x[tr].astype(np.float32), ytr, x[te].astype(np.float32), y[te], flipped


def test_knn_shapley_faiss_agrees_with_exact():
    """Digits with 10% of the training labels flipped: the truncated faiss values rank like the exact
    ones and find the same harmful samples (bottom 10%), which hold the flipped labels."""
    from scipy.stats import spearmanr

    xtr, ytr, xte, yte, flipped = digits_split()
    ex = knn_shapley(xtr, ytr, xte, yte, k=10)
    assert np.array_equal(knn_shapley(xtr, ytr, xte, yte, k=10, knn={"backend": "auto"}), ex)  # small N: exact
    bottom = int(0.1 * len(ex))
    worst_e = set(np.argsort(ex, kind="stable")[:bottom].tolist())
    for depth, rho, overlap in ((32, 0.98, 0.95), (128, 0.98, 0.95)):  # a depth below MIN_DEPTH (128) is lifted
        ap = knn_shapley(xtr, ytr, xte, yte, k=10, knn={**FAISS, "k": depth})
        worst_a = set(np.argsort(ap, kind="stable")[:bottom].tolist())
        assert spearmanr(ex, ap).correlation > rho
        assert len(worst_a & worst_e) / bottom >= overlap
        assert len(worst_a & set(flipped.tolist())) >= 0.95 * len(worst_e & set(flipped.tolist()))


def test_knn_shapley_truncation_is_exact_when_it_keeps_every_neighbour():
    rng = np.random.default_rng(1)
    xtr, xte = rng.normal(size=(300, 8)).astype(np.float32), rng.normal(size=(40, 8)).astype(np.float32)
    ytr, yte = rng.integers(3, size=300), rng.integers(3, size=40)
    ex = knn_shapley(xtr, ytr, xte, yte, k=5)
    ap = knn_shapley(xtr, ytr, xte, yte, k=5, knn={**FAISS, "k": 300, "nlist": 4, "nprobe": 4})
    np.testing.assert_allclose(ap, ex, atol=1e-5)  # values ~1e-3; float32 near-ties may swap far ranks


def test_kmeans_consumers_take_the_faiss_path(monkeypatch):
    """Past exact_max_n the k-means of SemDeDup, pseudo-classes and prototype scores fit on a sample
    with faiss (stages.kernels.knn.kmeans) and still recover planted structure; below it they are
    byte-identical to no `knn:` at all."""
    from sklearn.metrics import adjusted_rand_score

    x, labels = manifold_clusters(n=8000, clusters=8)
    calls = spy(monkeypatch, "kmeans")
    small = {"backend": "auto", "exact_max_n": 50_000}
    big = {"backend": "auto", "exact_max_n": 1000, "max_points_per_centroid": 64}

    assert np.array_equal(kmeans_groups(x, 8, knn=small), kmeans_groups(x, 8))
    groups = kmeans_groups(x, 8, knn=big)
    assert calls == ["faiss"] and adjusted_rand_score(labels, groups) > 0.9

    # SemDeDup: 300 planted near-copies are found with the sampled k-means too
    rng = np.random.default_rng(3)
    src = rng.choice(len(x), 300, replace=False)
    xd = np.concatenate([x, x[src] + 1e-3 * rng.normal(size=(300, x.shape[1])).astype(np.float32)])
    res = semdedup_walk(xd, eps=1e-5, clusters=16, knn=big)
    assert calls == ["faiss", "faiss"]
    a, b = src, len(x) + np.arange(300)
    assert (~res.keep).sum() == 300 and (res.keep[a] ^ res.keep[b]).all()  # one of each planted pair goes
    gone, kept = np.where(res.keep[a], b, a), np.where(res.keep[a], a, b)
    assert np.array_equal(res.dup_of[gone], kept)  # and names the other as its twin
    same = semdedup_walk(xd, eps=1e-5, clusters=16, knn=small)
    ref = semdedup_walk(xd, eps=1e-5, clusters=16)
    assert np.array_equal(same.keep, ref.keep) and np.array_equal(same.cluster, ref.cluster)

    d_exact = prototype_distance(x, 8)
    assert np.array_equal(prototype_distance(x, 8, knn=small), d_exact)
    d_faiss = prototype_distance(x, 8, knn=big)
    assert calls == ["faiss"] * 3
    # the k-means objective (mean squared distance to the nearest centroid) is no worse on a sample
    # (here much better: the full-data faiss.Kmeans start merges two planted clusters)
    assert (d_faiss ** 2).mean() <= 1.02 * (d_exact ** 2).mean()


def test_knn_settings_are_in_the_fingerprint_of_the_units_that_use_them():
    from pipeline.config import load_config
    from stages.score import ScoreStage
    from stages.select import SelectStage

    base = {"run": "r", "dataset": "d", "select": [
        {"method": "craig", "budget": 0.1}, {"method": "craig", "budget": 0.1, "graph": "dense", "name": "dense"},
        {"method": "random", "budget": 0.1}, {"method": "dedup", "features": "embeddings"},
        {"method": "dedup", "name": "content"}, {"method": "clipcov", "budget": 0.1},
        {"method": "clipcov", "budget": 0.1, "groups": "labels", "name": "by-label"}],
        "score": {"methods": ["knn_shapley"]}}
    a, b = load_config(base), load_config({**base, "knn": {"backend": "faiss"}})
    changed = {s.sel_name for s, t in zip(a.select, b.select)
               if SelectStage().config(a, s) != SelectStage().config(b, t)}
    assert changed == {"craig-0.1", "dedup-embeddings-eps0.05", "clipcov-0.1"}
    assert ScoreStage().config(a, None)["knn"]["backend"] == "auto"
    assert ScoreStage().config(b, None)["knn"]["backend"] == "faiss"
    el2n = {**base, "score": {"methods": ["el2n"]}}
    assert "knn" not in ScoreStage().config(load_config(el2n), None)


def test_a_run_passes_knn_to_craig_and_reruns_only_its_users(make_runner, tmp_path, monkeypatch):
    """Through the select stage: `knn: {backend: faiss}` reaches craig's sparse graph; switching it to
    exact reruns that unit only, and the two selections agree (tiny classes: every IVF list is probed)."""
    import pyarrow.parquet as pq

    sel = [{"method": "craig", "budget": 0.1, "features": "embeddings", "graph": "sparse"},
           {"method": "random", "budget": 0.1}]
    calls = spy(monkeypatch, "knn_graph")
    a = make_runner(tmp_path / "run", select=sel, knn={"backend": "faiss"})
    for unit in ("index", "embed", "select/craig-0.1", "select/random-0.1"):
        assert a.run(unit)["status"] == "computed"
    assert calls and set(calls) == {"faiss"}  # one graph per class
    picked = pq.read_table(a.run_dir / "select" / "craig-0.1" / "selection.parquet").column("selected").to_numpy()
    b = make_runner(tmp_path / "run", select=sel, knn={"backend": "exact"})
    assert [b.run(u)["status"] for u in ("index", "embed", "select/random-0.1")] == ["cached"] * 3
    n = len(calls)
    assert b.run("select/craig-0.1")["status"] == "computed" and len(calls) == n  # exact: no faiss graph
    again = pq.read_table(b.run_dir / "select" / "craig-0.1" / "selection.parquet").column("selected").to_numpy()
    assert picked.sum() == again.sum() and (picked & again).sum() >= 0.9 * picked.sum()
