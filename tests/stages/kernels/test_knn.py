"""stages.kernels.knn: the exact and faiss k-NN graphs and k-means on data with known structure.

Planted data: 20,000 points in 64-d drawn around 50 random centres, and real Fashion-MNIST
pixels projected on their top 64 principal components. The faiss graph's recall@32 against the
exact graph is asserted (the issue's goal: >= 0.9); k-means must recover planted clusters.
"""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from pipeline.errors import CurateError
from stages.kernels.knn import (GRAPH_OPTIONS, KMEANS_OPTIONS, choose_backend, graph_kwargs, kmeans, kmeans_kwargs,
                                knn_graph)

from tests.helpers import FMNIST

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small torch ops: one thread is faster here


def planted(n=20_000, d=64, clusters=50, spread=0.5, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d)).astype(np.float32)
    labels = rng.integers(clusters, size=n)
    return (centres[labels] + spread * rng.normal(size=(n, d))).astype(np.float32), labels


def recall(exact: np.ndarray, approx: np.ndarray) -> float:
    """Mean fraction of each row's exact neighbours the approximate graph found."""
    hits = sum(len(np.intersect1d(a, b, assume_unique=True)) for a, b in zip(exact, approx))
    return hits / exact.size


@pytest.fixture(scope="module")
def clustered():
    x, labels = planted()
    idx, sim = knn_graph(x, 32, backend="exact")
    return x, labels, idx, sim


def test_exact_graph_is_the_brute_force_answer(clustered):
    x, labels, idx, sim = clustered
    assert idx.shape == (len(x), 32) and idx.dtype == np.int64 and sim.dtype == np.float32
    assert not (idx == np.arange(len(x))[:, None]).any()  # never itself
    assert (np.diff(sim, axis=1) <= 0).all()  # most similar first
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    for r in (0, 777, 19_999):
        cos = xn @ xn[r]
        cos[r] = -np.inf
        want = np.sort(cos)[::-1][:32]
        np.testing.assert_allclose(sim[r], want, atol=1e-5)
        np.testing.assert_allclose(cos[idx[r]], sim[r], atol=1e-5)
    assert (labels[idx] == labels[:, None]).mean() > 0.99  # neighbours come from the same planted cluster


def test_faiss_ivf_recall_on_planted_clusters(clustered):
    x, _, exact, exact_sim = clustered
    idx, sim = knn_graph(x, 32, backend="faiss", index="ivf", nprobe=32)
    assert idx.shape == exact.shape and not (idx == np.arange(len(x))[:, None]).any()
    assert recall(exact, idx) >= 0.9
    assert (np.diff(sim, axis=1) <= 1e-6).all()
    # what it found are true similarities, never better than the exact k-th
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(sim[:50], np.einsum("nd,nkd->nk", xn[:50], xn[idx[:50]]), atol=1e-4)
    assert (sim[:, -1] <= exact_sim[:, -1] + 1e-5).all()
    # a sampled training set (fewer rows than N) and few probes: lower recall, same contract
    few, _ = knn_graph(x, 32, backend="faiss", nprobe=2, train_per_list=8)
    assert 0.2 < recall(exact, few) < recall(exact, idx)


def test_ivf_max_codes_stops_the_probing(clustered):
    """max_codes caps the candidate rows of a group of queries: at 1, each group sees only its own
    list (still k distinct other rows each, taken from every row where its list is too short), and
    recall falls; no cap at all probes the full nprobe lists."""
    x, _, exact, _ = clustered
    own, _ = knn_graph(x, 32, backend="faiss", nprobe=32, max_codes=1)
    full, _ = knn_graph(x, 32, backend="faiss", nprobe=32, max_codes=10**9)
    capped, _ = knn_graph(x, 32, backend="faiss", nprobe=32)
    for g in (own, full, capped):
        assert not (g == np.arange(len(x))[:, None]).any()
        assert (np.diff(np.sort(g, axis=1), axis=1) > 0).all()  # k distinct neighbours
    assert recall(exact, own) < 0.8 and min(recall(exact, capped), recall(exact, full)) >= 0.99


def test_faiss_graph_repeats_exactly(clustered):
    x = clustered[0][:8000]
    a = knn_graph(x, 16, backend="faiss", seed=3)
    b = knn_graph(x, 16, backend="faiss", seed=3)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@pytest.mark.skipif(not FMNIST.exists(), reason="needs ../shared/datasets/fashion-mnist")
def test_faiss_ivf_recall_on_fashion_mnist_pixels():
    raw = gzip.open(FMNIST / "train-images-idx3-ubyte.gz").read()
    x = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 784)[:8000].astype(np.float32) / 255
    x -= x.mean(0)
    pcs = np.linalg.eigh(x.T @ x)[1][:, ::-1][:, :64].T  # the top 64 principal axes
    p = np.ascontiguousarray(x @ pcs.T, dtype=np.float32)
    for metric in ("cosine", "l2"):
        exact, _ = knn_graph(p, 32, backend="exact", metric=metric)
        approx, _ = knn_graph(p, 32, backend="faiss", metric=metric)
        assert recall(exact, approx) >= 0.9, metric


def test_hnsw_recall_and_repeat():
    x, _ = planted(n=4000, d=32, clusters=20)
    exact, _ = knn_graph(x, 32, backend="exact")
    a, sa = knn_graph(x, 32, backend="faiss", index="hnsw", hnsw_m=16, ef_search=64)
    b, sb = knn_graph(x, 32, backend="faiss", index="hnsw", hnsw_m=16, ef_search=64)
    assert recall(exact, a) >= 0.9
    assert np.array_equal(a, b) and np.array_equal(sa, sb)  # built on one thread: the same graph


def test_metrics_l2_and_inner_product():
    x, _ = planted(n=3000, d=16, clusters=10)
    x[5] = x[9]  # an exact copy: its neighbour at distance 0, and itself still left out
    idx, sim = knn_graph(x, 8, backend="exact", metric="l2")
    d = np.sqrt(((x[:, None, :] - x[None, :20, :]) ** 2).sum(-1))[:20]
    np.fill_diagonal(d, np.inf)
    assert idx[5, 0] == 9 and idx[9, 0] == 5 and sim[5, 0] == 0
    np.testing.assert_allclose(-sim[17], np.sort(np.sqrt(((x - x[17]) ** 2).sum(1)))[1:9], rtol=1e-4, atol=1e-4)
    fi, fs = knn_graph(x, 8, backend="faiss", metric="l2", nlist=16, nprobe=16)  # every list probed: exact
    assert recall(idx, fi) > 0.999
    np.testing.assert_allclose(fs, sim, rtol=1e-3, atol=1e-3)
    ip_idx, ip_sim = knn_graph(x, 8, backend="exact", metric="ip")
    np.testing.assert_allclose(ip_sim[3], np.sort(np.delete(x @ x[3], 3))[::-1][:8], rtol=1e-4)


def test_small_inputs_memmaps_and_bad_rows(tmp_path):
    x, _ = planted(n=50, d=8, clusters=3)
    idx, sim = knn_graph(x, 100, backend="exact")
    assert idx.shape == (50, 49)  # k capped at N - 1: every other row
    assert (np.sort(idx, axis=1) == np.array([[j for j in range(50) if j != i] for i in range(50)])).all()
    fi, _ = knn_graph(x, 100, backend="faiss")
    assert (np.sort(fi, axis=1) == np.sort(idx, axis=1)).all()
    assert knn_graph(x[:1], 5)[0].shape == (1, 0)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert np.array_equal(knn_graph(mm, 10, backend="faiss")[0], knn_graph(x, 10, backend="faiss")[0])
    assert np.array_equal(knn_graph(torch.from_numpy(x), 10)[0], knn_graph(x, 10)[0])
    bad = x.copy()
    bad[31, 2] = np.nan
    for backend in ("exact", "faiss"):
        with pytest.raises(CurateError, match="row 31 is NaN"):
            knn_graph(bad, 5, backend=backend)
    with pytest.raises(CurateError, match="metric"):
        knn_graph(x, 5, metric="manhattan")
    with pytest.raises(CurateError, match="floating point"):
        knn_graph(x.astype(np.int64), 5)


def test_auto_rule():
    assert choose_backend(50_000) == "exact"
    assert choose_backend(50_001) == "faiss"
    assert choose_backend(10**6, device="cuda") == "exact"  # a GPU: exact torch blocks at any N
    assert choose_backend(100, exact_max_n=10) == "faiss"
    assert choose_backend(10**6, backend="exact") == "exact"
    with pytest.raises(CurateError, match="backend"):
        choose_backend(10, backend="annoy")


def purity(labels: np.ndarray, assign: np.ndarray) -> float:
    return sum(np.bincount(labels[assign == c]).max() for c in np.unique(assign)) / len(labels)


@pytest.mark.parametrize("backend", ["exact", "faiss"])
def test_kmeans_recovers_planted_clusters(backend):
    from sklearn.metrics import adjusted_rand_score

    x, labels = planted(n=10_000, d=32, clusters=20, spread=0.25)
    for seed, mppc in ((0, 256), (1, 256), (0, 40)):  # 40 per centroid: fitted on a sample of 800 rows
        cent, assign = kmeans(x, 20, backend=backend, seed=seed, max_points_per_centroid=mppc)
        assert cent.shape == (20, 32) and assign.shape == (10_000,) and assign.dtype == np.int64
        assert adjusted_rand_score(labels, assign) >= 0.9, (seed, mppc)
        assert purity(labels, assign) >= 0.9
        # the assignment is to the nearest of the returned centroids
        d = ((x[:500, None, :] - cent[None]) ** 2).sum(-1)
        assert (d.argmin(1) == assign[:500]).mean() > 0.999
    again = kmeans(x, 20, backend=backend, seed=1)
    assert np.array_equal(again[0], kmeans(x, 20, backend=backend, seed=1)[0])  # same seed, same centroids


def test_kmeans_edge_cases():
    x, _ = planted(n=30, d=4, clusters=2)
    cent, assign = kmeans(x, 100)
    assert cent.shape == (30, 4) and len(np.unique(assign)) == 30  # k capped at N: one row each
    same = np.ones((20, 3), np.float32)
    cent, assign = kmeans(same, 4)
    assert (assign == 0).all()  # identical rows: ties go to the lowest id
    with pytest.raises(CurateError, match="k must be"):
        kmeans(x, 0)


def test_config_section_names_the_kernel_options():
    from pipeline.config import load_config

    cfg = load_config({"run": "r", "dataset": "d", "knn": {"backend": "faiss", "nprobe": 8, "index": "hnsw"}})
    dump = cfg.knn.model_dump()
    assert set(dump) - {"k"} == set(GRAPH_OPTIONS) | set(KMEANS_OPTIONS)
    x, _ = planted(n=2000, d=8, clusters=5)
    assert knn_graph(x, dump["k"], **graph_kwargs(dump))[0].shape == (2000, 32)
    assert kmeans(x, 5, **kmeans_kwargs(dump))[1].shape == (2000,)
    with pytest.raises(CurateError, match="knn.nprobe"):
        load_config({"run": "r", "dataset": "d", "knn": {"nprobe": 0}})
    with pytest.raises(CurateError, match="knn.efsearch: Extra inputs"):
        load_config({"run": "r", "dataset": "d", "knn": {"efsearch": 10}})
