"""SemDeDup: planted near-duplicates, the sequential "duplicate of a kept one" rule, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import stages.kernels.coresets.dedup as dedup
from pipeline.errors import CurateError
from stages.kernels.coresets.dedup import _dedup_ordered, _greedy_keep, removed_per_class, semdedup


def _planted(seed: int = 0):
    """2000 Gaussian base points (labels 0..4) + 200 near-copies (rows 2000..) of distinct bases."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(2000, 64))
    labels = rng.integers(0, 5, 2000)
    src = rng.choice(2000, 200, replace=False)
    noise = rng.normal(size=(200, 64))
    noise *= 1e-3 * np.linalg.norm(base[src], axis=1, keepdims=True) / np.linalg.norm(noise, axis=1, keepdims=True)
    emb = np.concatenate([base, base[src] + noise]).astype(np.float32)
    return emb, np.concatenate([labels, labels[src]]), src


def _check_planted(keep: np.ndarray, src: np.ndarray) -> None:
    first, copy = keep[src], keep[2000:]
    one_left = (first ^ copy).mean()
    assert one_left >= 0.95  # a pair losing one member, the other one staying
    assert not (~first & ~copy).any()  # never both: neither has another duplicate
    others = np.setdiff1d(np.arange(2000), src)
    assert (~keep[others]).mean() < 0.01


def test_planted_near_duplicates():
    emb, labels, src = _planted()
    keep, cid = semdedup(emb, eps=0.01, seed=0)
    assert keep.dtype == bool and cid.dtype == np.int64 and keep.shape == cid.shape == (2200,)
    assert set(np.unique(cid)) == {0, 1}  # default: N // 1000 clusters
    _check_planted(keep, src)
    counts = removed_per_class(keep, labels)
    assert counts == {c: int(((labels == c) & ~keep).sum()) for c in range(5)}
    assert sum(counts.values()) == (~keep).sum() >= 190


def test_planted_near_duplicates_torch_kmeans(monkeypatch):
    monkeypatch.setattr(dedup, "faiss_kmeans", lambda *a, **k: None)
    emb, _, src = _planted(1)
    keep, _ = semdedup(emb, eps=0.01, clusters=3, seed=1)
    _check_planted(keep, src)


def _unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_chain_keeps_the_ends():
    # a, b, c on an arc 0.1 rad apart: sim(a,b) = sim(b,c) = 0.995 > 0.99, sim(a,c) = 0.980
    a, b, c = (_unit([np.cos(t), np.sin(t), 0]) for t in (0.0, 0.1, 0.2))
    far = _unit([0.0, 0.3, 0.95])  # pulls the centroid so the walk order is far, a, b, c
    x = np.stack([c, far, a, b])
    cen = _unit(x.mean(0))
    assert np.all(np.diff((x @ cen)[[1, 2, 3, 0]]) > 0)  # the construction's walk order
    keep, cid = semdedup(x, eps=0.01, clusters=1)
    np.testing.assert_array_equal(cid, 0)
    np.testing.assert_array_equal(keep, [True, True, True, False])  # b dropped; c kept (a naive rule drops it)
    # the kernel with the order given explicitly: a, b, c
    sim = torch.as_tensor(np.stack([a, b, c]) @ np.stack([a, b, c]).T)
    assert _greedy_keep(sim, 0.99).tolist() == [True, False, True]
    # a longer chain, where each round of the fixed point settles a little more
    t = np.arange(9) * 0.1
    pts = torch.as_tensor(_unit(np.stack([np.cos(t), np.sin(t), np.zeros(9)], 1)))
    expect = [i % 2 == 0 for i in range(9)]
    assert _greedy_keep(pts @ pts.T, 0.99).tolist() == expect
    assert _dedup_ordered(pts, 0.99, block=2).tolist() == expect  # across row blocks too


def test_the_least_prototypical_copy_is_kept():
    u, v = _unit([1.0, 0.05, 0.0]), _unit([1.0, 0.1, 0.0])  # sim 0.9989: duplicates
    others = _unit([[1.0, -0.6, 0.0], [1.0, -0.5, 0.5]])  # pull the centroid to negative y
    keep, _ = semdedup(np.concatenate([[u, v], others]), eps=0.01, clusters=1)
    np.testing.assert_array_equal(keep, [False, True, True, True])


def test_all_identical_keeps_exactly_one():
    keep, _ = semdedup(np.ones((300, 8), np.float32), eps=0.01)
    assert keep.sum() == 1
    keep = _dedup_ordered(torch.ones(300, 8) / np.sqrt(8), 0.99, block=64)
    assert keep.tolist() == [True] + [False] * 299


def test_deterministic_for_a_seed():
    emb, _, _ = _planted(2)
    k1, c1 = semdedup(emb, eps=0.01, clusters=4, seed=7)
    k2, c2 = semdedup(emb, eps=0.01, clusters=4, seed=7)
    np.testing.assert_array_equal(k1, k2)
    np.testing.assert_array_equal(c1, c2)


def test_removed_per_class_counts():
    keep = np.array([True, False, False, True, False])
    assert removed_per_class(keep, np.array([0, 0, 1, 2, 0])) == {0: 2, 1: 1, 2: 0}


def test_errors():
    emb = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    bad = emb.copy()
    bad[7, 2] = np.nan
    with pytest.raises(CurateError, match="row 7"):
        semdedup(bad, eps=0.01)
    bad = emb.copy()
    bad[5] = 0
    with pytest.raises(CurateError, match="row 5 has zero norm"):
        semdedup(bad, eps=0.01)
    for eps in (0.0, 2.0):
        with pytest.raises(CurateError, match="eps"):
            semdedup(emb, eps=eps)
    with pytest.raises(CurateError, match="clusters"):
        semdedup(emb, eps=0.01, clusters=0)


def test_centring_keeps_one_orthant_features_apart():
    """Non-negative features (ReLU outputs) all have high cosine; centred, only true copies do."""
    rng = np.random.default_rng(0)
    x = (np.abs(rng.normal(size=(1000, 16))) + 1).astype(np.float32)
    x[900:] = x[:100] + rng.normal(size=(100, 16)).astype(np.float32) * 1e-4  # 100 planted copies
    raw, _ = semdedup(x, eps=0.05, center=False)
    centred, _ = semdedup(x, eps=0.05, center=True)
    assert (~raw).sum() > 500  # most distinct samples would be thrown away
    assert (~centred).sum() == 100 and (centred[:100] | centred[900:]).all()
