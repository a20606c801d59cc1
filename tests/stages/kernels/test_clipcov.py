"""ClipCov, SAS, CLIP-score filtering and k-means pseudo-classes on generated image-caption data."""

import numpy as np
import pytest

from pipeline.errors import CurateError
from stages.kernels.coresets import clipcov as cc
from stages.kernels.coresets.clipcov import (clipcov, clipscore, clipscore_filter, cross_cov_error, cross_covariance,
                                     kmeans_groups, sas)
from pipeline.sampling import proportional_allocation

SIZES = (120, 150, 180, 135)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def pairs(sizes=SIZES, d=24, spread=0.9, text_noise=0.3, gap=0.0, mismatch=0.0, seed=0):
    """Image-caption pairs with known structure: group g's images lie around a direction m_g
    (noise of norm ~spread), each caption is a fixed near-identity linear map M of its image's
    vector plus noise, so every group's cross-covariance is ~E[u u^T] M^T. `gap` adds a common
    offset per modality (CLIP's modality gap). `mismatch`: that share of pairs gets the caption
    of a random pair from another group. Returns img, txt (float32, unit rows), groups, planted."""
    rng = np.random.default_rng(seed)
    m = unit(rng.normal(size=(len(sizes), d)))
    mix = np.eye(d) + 0.3 * rng.normal(size=(d, d)) / np.sqrt(d)
    g = np.repeat(np.arange(len(sizes)), sizes)
    z = m[g] + spread * rng.normal(size=(len(g), d)) / np.sqrt(d)
    off_i, off_t = unit(rng.normal(size=(2, d))) * gap
    img = unit(off_i + z)
    txt = unit(off_t + z @ mix.T + text_noise * rng.normal(size=(len(g), d)) / np.sqrt(d))
    planted = np.zeros(len(g), bool)
    if mismatch:
        idx = rng.choice(len(g), int(mismatch * len(g)), replace=False)
        for i in idx:
            txt[i] = txt[rng.choice(np.flatnonzero(g != g[i]))]
        planted[idx] = True
    return img.astype(np.float32), txt.astype(np.float32), g, planted


def alloc_for(g, frac):
    return proportional_allocation(np.bincount(g), int(round(frac * len(g))))


def stratified_random(g, alloc, seed):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(np.flatnonzero(g == c), a, replace=False) for c, a in enumerate(alloc)])


def reference_greedy(u, v, k, lam):
    """The objective's greedy written out in float64 from the n x n matrices (no gate)."""
    u, v = u.astype(np.float64), v.astype(np.float64)
    kmat = (u @ u.T) * (v @ v.T)
    gain = kmat.mean(1)  # c_j = (1/n) sum_i <u_i, u_j><v_i, v_j>
    picks = []
    for _ in range(k):
        j = int(np.argmax(np.where(np.isin(np.arange(len(u)), picks), -np.inf, gain)))
        picks.append(j)
        gain = gain - lam / k * kmat[:, j]
    return np.asarray(picks)


# ----------------------------------------------------------------- ClipCov
@pytest.mark.parametrize("gap", [0.0, 1.5])
def test_clipcov_preserves_cross_covariance_better_than_random(gap):
    img, txt, g, _ = pairs(gap=gap, text_noise=0.3 if gap == 0 else 0.9, seed=1)
    alloc = alloc_for(g, 0.1)
    rows, w, info = clipcov(img, txt, g, alloc)
    ours = cross_cov_error(img, txt, rows)
    rand = np.mean([cross_cov_error(img, txt, stratified_random(g, alloc, s)) for s in range(10)])
    assert ours < 0.85 * rand, (ours, rand)
    assert sum(info["misaligned"].values()) <= 0.02 * len(g)  # clean data: the gate leaves it alone


def test_greedy_is_exact_and_objective_is_the_frobenius_error():
    # a group smaller than D (n x n path) and groups larger than D (D x D path)
    img, txt, g, _ = pairs(sizes=(12, 60, 90), d=24, seed=2)
    alloc = np.array([5, 20, 30])
    rows, _, info = clipcov(img, txt, g, alloc, lam=1.0, gate=None)
    for c, k in enumerate(alloc):
        m = np.flatnonzero(g == c)
        picks = rows[g[rows] == c]
        assert picks.tolist() == m[reference_greedy(img[m], txt[m], k, 1.0)].tolist()
        u, v = img[m].astype(np.float64), txt[m].astype(np.float64)
        cl = u.T @ v / len(m)
        cs = u[np.searchsorted(m, picks)].T @ v[np.searchsorted(m, picks)] / k
        expect = k / 2 * (cl ** 2).sum() + 0.5 - k / 2 * ((cs - cl) ** 2).sum()
        assert info["objective"][c] == pytest.approx(expect, rel=1e-4)
    # lam changes the trade-off, and the greedy follows it
    rows2, _, _ = clipcov(img, txt, g, alloc, lam=3.0, gate=None)
    m = np.flatnonzero(g == 1)
    assert rows2[g[rows2] == 1].tolist() == m[reference_greedy(img[m], txt[m], 20, 3.0)].tolist()


def test_quality_pool_greedy_runs_on_its_candidates_only(monkeypatch):
    # pool_factor 1.5: each group picks among its ceil(1.5 k) best-scored pairs, with the linear term
    # from all of the group's pairs; the greedy written out on the pool agrees, with the candidates'
    # redundancy matrix (default) and with per-step mat-vecs (GRAM_ELEMS 0) alike
    img, txt, g, _ = pairs(sizes=(40, 300, 420), d=24, seed=7)
    alloc = np.array([4, 30, 42])
    rows, _, info = clipcov(img, txt, g, alloc, lam=1.0, gate=None, pool_factor=1.5)
    for c, k in enumerate(alloc):
        m = np.flatnonzero(g == c)
        u, v = img[m].astype(np.float64), txt[m].astype(np.float64)
        kmat = (u @ u.T) * (v @ v.T)
        gain = kmat.mean(1)
        pool = np.argsort(-(u * v).sum(1), kind="stable")[:int(np.ceil(1.5 * k))]
        picks = []
        for _ in range(k):
            j = int(pool[np.argmax(np.where(np.isin(pool, picks), -np.inf, gain[pool]))])
            picks.append(j)
            gain = gain - 1.0 / k * kmat[:, j]
        assert rows[g[rows] == c].tolist() == m[picks].tolist()
    monkeypatch.setattr(cc, "GRAM_ELEMS", 0)
    again, _, info2 = clipcov(img, txt, g, alloc, lam=1.0, gate=None, pool_factor=1.5)
    assert again.tolist() == rows.tolist()
    assert info2["objective"] == pytest.approx(info["objective"], rel=1e-5)


def test_budget_beyond_the_aligned_pairs_falls_back_to_every_pair(monkeypatch):
    # 30% mismatched captions and a 90% budget: the aligned pairs cannot fill it, so each group's
    # greedy runs on all its pairs and takes the misaligned ones last
    img, txt, g, planted = pairs(text_noise=0.3, mismatch=0.3, seed=3)
    alloc = alloc_for(g, 0.9)
    rows, _, info = clipcov(img, txt, g, alloc, pool_factor=1.5)
    for c, k in enumerate(alloc):
        picks = rows[g[rows] == c]
        bad = info["misaligned"][c]
        assert len(picks) == k and bad > 0
        assert not planted[picks[:k - bad]].any() or planted[picks[:k - bad]].mean() < 0.05
    monkeypatch.setattr(cc, "GRAM_ELEMS", 0)
    assert clipcov(img, txt, g, alloc, pool_factor=1.5)[0].tolist() == rows.tolist()


def test_mismatched_pairs_are_left_out():
    img, txt, g, planted = pairs(text_noise=0.3, mismatch=0.3, seed=3)
    alloc = alloc_for(g, 0.3)
    rows, _, info = clipcov(img, txt, g, alloc)
    rate = planted.mean()
    rand = np.mean([planted[stratified_random(g, alloc, s)].mean() for s in range(10)])
    assert rand > 0.8 * rate
    assert planted[rows].mean() < 0.5 * rate, planted[rows].mean()
    assert planted[rows].mean() < 0.05
    flagged = sum(info["misaligned"].values())
    assert 0.8 * planted.sum() <= flagged <= 1.1 * planted.sum()
    # without the quality rule, matching the group's covariance keeps them in proportion
    rows_ng, _, _ = clipcov(img, txt, g, alloc, gate=None)
    assert planted[rows_ng].mean() > 0.6 * rate
    # the CLIP-score filter drops them too
    keep = clipscore_filter(clipscore(img, txt), k=len(rows))
    assert planted[keep].mean() < 0.05


def test_redundancy_term_limits_near_copies():
    img, txt, g, _ = pairs(text_noise=0.3, seed=4)
    m = np.flatnonzero(g == 0)
    cl = img[m].T.astype(np.float64) @ txt[m] / len(m)
    src = m[np.argmax(((img[m] @ cl) * txt[m]).sum(1))]  # the pair most aligned with its group
    copies = m[m != src][:39]
    img[copies], txt[copies] = img[src], txt[src]
    dup = np.zeros(len(g), bool)
    dup[copies] = dup[src] = True
    alloc = alloc_for(g, 0.3)
    k0 = alloc[0]
    counts = {lam: int(dup[clipcov(img, txt, g, alloc, lam=lam)[0]].sum()) for lam in (0.0, 1.0, 3.0)}
    assert counts[0.0] >= 0.8 * k0  # alignment alone fills the budget with the copies
    share = dup[m].mean()  # covariance matching keeps them near their share of the group
    assert counts[1.0] <= 1.5 * share * k0 and counts[1.0] <= 0.5 * counts[0.0], counts
    assert 1 <= counts[3.0] < counts[1.0], counts


def test_determinism_counts_and_buckets():
    img, txt, g, _ = pairs(sizes=(12, 60, 90, 150), seed=5)
    alloc = alloc_for(g, 0.2)
    a = clipcov(img, txt, g, alloc, seed=0, device="cpu")
    b = clipcov(img, txt, g, alloc, seed=0)
    assert a[0].tolist() == b[0].tolist()
    rows, w, info = a
    assert rows.dtype == np.int64 and w.dtype == np.float32 and (w == 1).all()
    assert len(np.unique(rows)) == len(rows)
    assert np.bincount(g[rows], minlength=len(alloc)).tolist() == alloc.tolist()
    assert (np.diff(g[rows]) >= 0).all()  # groups in id order
    assert sorted(info["objective"]) == [0, 1, 2, 3]
    # one group per bucket gives the same picks as one padded bucket for all
    singles = cc.bucket_plan(np.bincount(g), alloc, img.shape[1], block_elems=1)
    assert [b.tolist() for b in singles] == [[0], [1], [2], [3]]  # by size: 12, 60, 90, 150
    one = clipcov(img, txt, g, alloc, buckets=singles)
    assert one[0].tolist() == rows.tolist()
    with pytest.raises(CurateError, match="every group with a budget exactly once"):
        clipcov(img, txt, g, alloc, buckets=singles[:3])
    # float16 input runs and honours the allocation
    r16, _, _ = clipcov(img.astype(np.float16), txt.astype(np.float16), g, alloc)
    assert np.bincount(g[r16], minlength=len(alloc)).tolist() == alloc.tolist()
    # a zero allocation selects nothing from that group
    z = alloc.copy()
    z[1] = 0
    assert not (g[clipcov(img, txt, g, z)[0]] == 1).any()


def test_a_group_with_too_few_aligned_pairs_takes_misaligned_ones_last():
    img, txt, g, planted = pairs(sizes=(40, 40), mismatch=0.0, seed=6)
    rng = np.random.default_rng(0)
    bad = rng.choice(np.flatnonzero(g == 0), 10, replace=False)
    txt[bad] = txt[np.flatnonzero(g == 1)[:10]]
    rows, _, info = clipcov(img, txt, g, np.array([35, 5]))
    assert info["misaligned"][0] == 10
    picked0 = rows[g[rows] == 0]
    assert set(picked0[:30]).isdisjoint(bad) and set(picked0[30:]) <= set(bad)


def test_bad_inputs_name_the_problem():
    img, txt, g, _ = pairs(sizes=(20, 30, 25), seed=7)
    alloc = np.array([5, 5, 5])
    with pytest.raises(CurateError, match="group 2 has 25 samples, fewer than its allocation 26"):
        clipcov(img, txt, g, np.array([5, 5, 26]))
    t = txt.copy()
    t[37, 3] = np.nan
    with pytest.raises(CurateError, match="txt row 37 is NaN"):
        clipcov(img, t, g, alloc)
    i = img.copy()
    i[41, 0] = np.inf
    with pytest.raises(CurateError, match="img row 41 is NaN or infinite"):
        clipcov(i, txt, g, alloc)
    with pytest.raises(CurateError, match=r"img \(75, 24\) and txt \(75, 23\)"):
        clipcov(img, txt[:, :23], g, alloc)
    with pytest.raises(CurateError, match="groups must be"):
        clipcov(img, txt, g[:-1], alloc)
    with pytest.raises(CurateError, match="group 2 has no entry in alloc"):
        clipcov(img, txt, g, alloc[:2])
    with pytest.raises(CurateError, match="lam"):
        clipcov(img, txt, g, alloc, lam=-1)
    with pytest.raises(CurateError, match="group 1 has 30 samples"):
        sas(img, g, np.array([1, 31, 1]))
    with pytest.raises(CurateError, match="feats row 37 is NaN"):
        sas(t, g, alloc)


# ----------------------------------------------------------------- SAS
def sas_data(seed=0, d=16, groups=3, members=60, outliers=4):
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(groups, d)))
    xs, gs, out = [], [], []
    for c in range(groups):
        xs += [unit(centres[c] + 0.35 * rng.normal(size=(members, d))), unit(rng.normal(size=(outliers, d)))]
        gs.append(np.full(members + outliers, c))
        out += [np.zeros(members, bool), np.ones(outliers, bool)]
    return np.concatenate(xs).astype(np.float32), np.concatenate(gs), np.concatenate(out)


@pytest.mark.parametrize("optimizer", ["lazy", "stochastic"])
def test_sas_keeps_central_members_over_outliers(optimizer):
    x, g, out = sas_data()
    for k in (6, 20, 40):
        rows, w, info = sas(x, g, np.full(3, k), optimizer=optimizer, seed=0)
        assert not out[rows].any(), (k, out[rows].sum())
        assert np.bincount(g[rows]).tolist() == [k] * 3 and (w == 1).all()
    if optimizer == "lazy":  # the member most similar to its class comes first
        m = np.flatnonzero(g == 0)
        xs = unit(x[m].astype(np.float64))
        assert rows[0] == m[np.argmax((0.5 * (1 + xs @ xs.T)).sum(1))]


def test_sas_lazy_greedy_is_exact_on_its_objective():
    x, g, _ = sas_data(seed=1)
    k = 15
    rows, _, info = sas(x, g, np.full(3, k), optimizer="lazy")
    for c in range(3):
        m = np.flatnonzero(g == c)
        xs = unit(x[m].astype(np.float64))
        s = 0.5 * (1 + xs @ xs.T)
        gain, picks = s.sum(0), []
        for _ in range(k):
            j = int(np.argmax(np.where(np.isin(np.arange(len(m)), picks), -np.inf, gain)))
            picks.append(j)
            gain = gain - s[:, j]
        assert rows[g[rows] == c].tolist() == m[picks].tolist()
        p = np.asarray(picks)
        expect = s[:, p].sum() - np.triu(s[np.ix_(p, p)], 1).sum()
        assert info["objective"][c] == pytest.approx(expect, rel=1e-5)


# ----------------------------------------------------------------- covariance and scores
def test_cross_covariance_matches_numpy():
    img, txt, g, _ = pairs(sizes=(300, 200), seed=8)
    direct = img.astype(np.float64).T @ txt.astype(np.float64) / len(img)
    np.testing.assert_allclose(cross_covariance(img, txt), direct, rtol=1e-5, atol=1e-7)
    rows = np.array([3, 17, 17, 250, 499])
    w = np.array([1.0, 2.0, 0.5, 3.0, 1.5])
    expect = sum(wi * np.outer(img[r], txt[r]).astype(np.float64) for r, wi in zip(rows, w)) / w.sum()
    np.testing.assert_allclose(cross_covariance(img, txt, rows, w), expect, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(cross_covariance(img.astype(np.float16), txt.astype(np.float16)), direct, atol=2e-3)
    assert cross_cov_error(img, txt, np.arange(len(img))) == pytest.approx(0, abs=1e-6)
    sub = np.arange(0, 500, 7)
    cs = img[sub].astype(np.float64).T @ txt[sub] / len(sub)
    assert cross_cov_error(img, txt, sub) == pytest.approx(np.linalg.norm(cs - direct) / np.linalg.norm(direct),
                                                           rel=1e-4)
    with pytest.raises(CurateError, match="weights"):
        cross_covariance(img, txt, rows, w[:3])


def test_clipscore_is_the_pair_cosine():
    rng = np.random.default_rng(9)
    img, txt = rng.normal(size=(50, 8)).astype(np.float32), rng.normal(size=(50, 8)).astype(np.float32)
    s = clipscore(img, txt)
    assert s.dtype == np.float32 and s.shape == (50,)
    np.testing.assert_allclose(s, (unit(img) * unit(txt)).sum(1), rtol=1e-5, atol=1e-6)
    txt[7] = 0
    with pytest.raises(CurateError, match="row 7 has a zero-norm"):
        clipscore(img, txt)


def test_clipscore_filter_k_and_threshold():
    s = np.array([0.5, 0.9, 0.5, 0.9, 0.1, 0.7], np.float32)
    assert clipscore_filter(s, k=3).tolist() == [1, 3, 5]
    assert clipscore_filter(s, k=5).tolist() == [1, 3, 5, 0, 2]  # ties by row index
    assert clipscore_filter(s, k=0).tolist() == []
    assert clipscore_filter(s, threshold=0.5).tolist() == [1, 3, 5, 0, 2]  # >=, descending
    assert clipscore_filter(s, threshold=0.9).tolist() == [1, 3]  # float32 scores against a float threshold
    assert clipscore_filter([0.5, 0.9, 0.5, 0.9, 0.1, 0.7], threshold=0.7).tolist() == [1, 3, 5]
    with pytest.raises(CurateError, match="exactly one of k and threshold"):
        clipscore_filter(s)
    with pytest.raises(CurateError, match="exactly one of k and threshold"):
        clipscore_filter(s, k=2, threshold=0.5)
    with pytest.raises(CurateError, match=r"keeps nothing \(the highest score is 0.9000\)"):
        clipscore_filter(s, threshold=0.95)
    with pytest.raises(CurateError, match="k must be"):
        clipscore_filter(s, k=7)


# ----------------------------------------------------------------- pseudo-classes
@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_kmeans_groups_recovers_planted_groups(backend, monkeypatch):
    if backend == "faiss":
        pytest.importorskip("faiss")
    else:
        from stages.kernels.scores import prototype
        monkeypatch.setattr(prototype, "faiss_kmeans", lambda *a, **k: None)
    img, _, g, _ = pairs(sizes=(100, 80, 120), d=16, spread=0.2, seed=10)
    ids = kmeans_groups(img, 3, seed=0)
    assert ids.dtype == np.int64 and ids.shape == g.shape and ids.min() >= 0 and ids.max() < 3
    for c in range(3):  # each planted group is one pseudo-class, and no two share one
        assert len(np.unique(ids[g == c])) == 1
    assert len(np.unique(ids)) == 3
    assert kmeans_groups(img, 3, seed=0).tolist() == ids.tolist()
    # usable as clipcov groups straight away
    alloc = proportional_allocation(np.bincount(ids, minlength=3), 30)
    rows, _, _ = clipcov(img, img, ids, alloc)
    assert len(rows) == 30


def test_module_imports_no_prefect_or_polars():
    import subprocess
    import sys
    code = ("import sys, stages.kernels.coresets.clipcov; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'polars'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(cc.__file__).resolve().parents[3]))
    assert out.stdout.strip() == "[]"
    assert '"cuda"' not in open(cc.__file__).read()  # the device is always the caller's
