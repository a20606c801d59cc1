"""Content features and the dedup walk on real images (scikit-learn digits, Fashion-MNIST)
with planted near-copies: grey-level noise and one-pixel translations."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch

from pipeline.config.select import DEDUP_EPS
from pipeline.errors import CurateError
from pipeline.ingest import read_idx_arrays
from stages.kernels.content import SHIFTS, shifted_thumbnails, thumbnails
from stages.kernels.coresets.dedup import Dedup, check_removed, content_dedup, nn_quantiles, semdedup_walk
from tests.helpers import FMNIST

EPS = DEDUP_EPS["content"]
KINDS = ("noise1", "noise3", "shift")


def digits_images() -> np.ndarray:
    """sklearn's 1,797 digits as uint8 [N, 8, 8], scaled to 0..255 the way `curate ingest digits` writes them."""
    from sklearn.datasets import load_digits

    return np.rint(load_digits().images * (255.0 / 16.0)).astype(np.uint8)


@lru_cache(maxsize=1)
def _fmnist_train() -> tuple[np.ndarray, np.ndarray]:
    return read_idx_arrays(str(FMNIST), "train")


def fmnist_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n Fashion-MNIST training images (uint8 [n, 28, 28]) and labels."""
    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not found at {FMNIST}")
    x, y = _fmnist_train()
    return x[:n], y[:n]


def translate(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """img moved by (dy, dx) pixels; the uncovered edge is black, what leaves the frame is lost."""
    h, w = img.shape
    out = np.zeros_like(img)
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = img[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def plant_copies(images: np.ndarray, labels: np.ndarray, n: int = 200, seed: int = 0):
    """The images plus n near-copies of n distinct ones, kinds in turn: +-1 grey levels per pixel,
    +-3 grey levels (clipped to 0..255), a one-pixel translation (one of 8 directions). The pool is
    shuffled, so a copy may come before its original. Returns (images, labels, pairs [n, 2] of
    (original, copy) positions, kind per pair)."""
    rng = np.random.default_rng(seed)
    src = rng.choice(len(images), n, replace=False)
    dirs = [d for d in SHIFTS if d != (0, 0)]
    copies, kinds = [], []
    for i, s in enumerate(src):
        kind = KINDS[i % 3]
        img = images[s].astype(np.int16)
        if kind == "shift":
            img = translate(img, *dirs[rng.integers(len(dirs))])
        else:
            k = 1 if kind == "noise1" else 3
            img = img + rng.integers(-k, k + 1, img.shape)
        copies.append(np.clip(img, 0, 255).astype(np.uint8))
        kinds.append(kind)
    pool = np.concatenate([images, np.stack(copies)])
    pool_labels = np.concatenate([labels, labels[src]])
    perm = rng.permutation(len(pool))
    where = np.argsort(perm)  # old position -> new
    pairs = np.stack([where[src], where[len(images) + np.arange(n)]], 1)
    return pool[perm], pool_labels[perm], pairs, np.array(kinds)


def planted_rates(removed: np.ndarray, dup_of: np.ndarray, pairs: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(share of planted pairs resolved: one member removed and matched to the other, share of all
    other images removed, caught flag per pair)."""
    a, b = pairs[:, 0], pairs[:, 1]
    caught = (removed[b] & (dup_of[b] == a)) | (removed[a] & (dup_of[a] == b))
    others = np.ones(len(removed), bool)
    others[pairs.ravel()] = False
    return float(caught.mean()), float(removed[others].mean()), caught


def run_content(images: np.ndarray, eps: float = EPS, block: int | None = None) -> Dedup:
    x = images[:, None]
    kw = {"block": block} if block else {}
    return content_dedup(thumbnails(x), eps=eps, views=lambda s, e: shifted_thumbnails(x[s:e]), **kw)


# ---------------------------------------------------------------- the features


def test_a_translated_copy_holds_the_original_centre_exactly():
    x, _ = fmnist_images(300)
    base = thumbnails(x[:, None])
    for dy, dx in SHIFTS[1:]:
        moved = np.stack([translate(im, dy, dx) for im in x])[:, None]
        plain = (thumbnails(moved) * base).sum(1)
        assert plain.median() < 0.98  # the plain thumbnails no longer match
        best = (shifted_thumbnails(moved) * base[None]).sum(2).max(0).values
        torch.testing.assert_close(best, torch.ones(len(x)), atol=1e-5, rtol=0)  # one view is the original's centre


def test_grey_noise_and_brightness_leave_the_feature_in_place_and_other_images_apart():
    x, _ = fmnist_images(2000)
    rng = np.random.default_rng(0)
    base = thumbnails(x[:, None])
    for k, floor in ((1, 0.9995), (3, 1 - EPS)):
        noisy = np.clip(x.astype(np.int16) + rng.integers(-k, k + 1, x.shape), 0, 255).astype(np.uint8)
        assert (thumbnails(noisy[:, None]) * base).sum(1).min() > floor
    brighter = (x.astype(np.float32) * 0.8 + 20).astype(np.uint8)  # brightness and contrast: same correlation
    assert (thumbnails(brighter[:, None]) * base).sum(1).min() > 0.9999
    sim = base @ base.T
    sim.fill_diagonal_(-1)
    assert (sim.max(1).values > 1 - EPS).float().mean() < 0.01  # distinct images rarely reach the threshold


def test_rgb_flat_and_tiny_images():
    x, _ = fmnist_images(20)
    grey = thumbnails(x[:, None])
    rgb = thumbnails(np.repeat(x[:, None], 3, axis=1))
    torch.testing.assert_close(rgb, grey, atol=1e-5, rtol=0)
    flat = thumbnails(np.stack([np.zeros((1, 28, 28)), np.full((1, 28, 28), 200)]).astype(np.uint8))
    torch.testing.assert_close(flat[0], flat[1])  # blank images of any shade are one another's duplicates
    assert (flat @ grey.T).abs().max() < 1e-5  # and nothing else's
    assert tuple(shifted_thumbnails(x[:3, None]).shape) == (9, 3, 256)
    with pytest.raises(CurateError, match="at least 3 x 3 px, got 2 x 5"):
        thumbnails(np.zeros((1, 1, 2, 5), np.uint8))
    with pytest.raises(CurateError, match=r"uint8 \[N, C, H, W\]"):
        thumbnails(np.zeros((1, 28, 28), np.uint8))


# ---------------------------------------------------------------- the walk on real images


@pytest.mark.parametrize("data", ["digits", "fmnist"])
def test_planted_copies_found_and_others_kept(data):
    if data == "digits":
        x = digits_images()
        y = np.zeros(len(x), np.int64)
    else:
        x, y = fmnist_images(3000)
    pool, _, pairs, kinds = plant_copies(x, y)
    res = run_content(pool)
    removed = ~res.keep
    found, others, caught = planted_rates(removed, res.dup_of, pairs)
    assert found >= 0.95 and others < 0.02
    for kind in KINDS:  # each kind of copy, not just the easy ones
        assert caught[kinds == kind].mean() >= 0.95, kind
    # the first occurrence is kept, and each removed image names a kept, earlier twin above the threshold
    gone = np.flatnonzero(removed)
    assert res.keep[res.dup_of[gone]].all() and (res.dup_of[gone] < gone).all()
    assert (res.dup_sim[gone] > 1 - EPS).all() and np.isnan(res.dup_sim[res.keep]).all()
    assert (res.dup_of[res.keep] == -1).all()
    assert (res.nn_sim[gone] >= res.dup_sim[gone] - 1e-6).all()


def test_blocks_do_not_change_the_answer():
    x, y = fmnist_images(600)
    pool, _, pairs, _ = plant_copies(x, y, n=60, seed=1)
    whole, blocked = run_content(pool), run_content(pool, block=97)
    np.testing.assert_array_equal(whole.keep, blocked.keep)
    np.testing.assert_array_equal(whole.dup_of, blocked.dup_of)
    np.testing.assert_allclose(whole.dup_sim, blocked.dup_sim, atol=1e-5)
    np.testing.assert_allclose(whole.nn_sim, blocked.nn_sim, atol=1e-5)


def _sequential(q: np.ndarray, base: np.ndarray, thr: float):
    """The rule spelled out: sim(i, j) for j < i is the best of i's views against j; walk in
    order, keep i unless a kept j < i is above thr; its twin is the most similar such j."""
    n = len(base)
    sim = np.einsum("vid,jd->vij", q, base).max(0)
    keep, dup_of = np.ones(n, bool), np.full(n, -1)
    for i in range(n):
        cand = [j for j in range(i) if keep[j] and sim[i, j] > thr]
        if cand:
            keep[i] = False
            dup_of[i] = max(cand, key=lambda j: (sim[i, j], -j))
    pair = np.where(np.tri(n, k=-1, dtype=bool), sim, sim.T)  # (i, j) as the later row's views give it
    np.fill_diagonal(pair, -np.inf)
    return keep, dup_of, pair.max(1)


def test_the_walk_is_the_sequential_rule_across_blocks():
    """Chains and clusters of duplicates (random unit vectors and their jittered views) against
    the rule written as a loop, with blocks far smaller than the data."""
    rng = np.random.default_rng(3)
    base = rng.normal(size=(60, 8))
    base[20:40] = base[:20] + 0.15 * rng.normal(size=(20, 8))  # near-copies, some chained
    base[40:45] = base[0]  # exact copies
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    q = np.concatenate([base[None], base[None] + 0.1 * rng.normal(size=(2, 60, 8))])
    q /= np.linalg.norm(q, axis=2, keepdims=True)
    thr = 0.97
    keep, dup_of, nn = _sequential(q, base, thr)
    assert 10 < (~keep).sum() < 40  # the case has duplicates, but not everything is one
    qt = torch.as_tensor(q, dtype=torch.float32)
    for block in (7, 16, 60):
        res = content_dedup(base.astype(np.float32), eps=1 - thr, views=lambda s, e: qt[:, s:e], block=block)
        np.testing.assert_array_equal(res.keep, keep)
        np.testing.assert_array_equal(res.dup_of, dup_of)
        np.testing.assert_allclose(res.nn_sim, nn, atol=1e-5)


def test_semdedup_names_twins_in_its_cluster():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(1500, 32)).astype(np.float32)
    emb[1000:1100] = emb[:100] + 1e-3 * rng.normal(size=(100, 32))
    res = semdedup_walk(emb, eps=0.01, clusters=3, seed=0)
    gone = np.flatnonzero(~res.keep)
    assert len(gone) == 100
    assert res.keep[res.dup_of[gone]].all() and (res.cluster[res.dup_of[gone]] == res.cluster[gone]).all()
    u = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    np.testing.assert_allclose(res.dup_sim[gone], (u[gone] * u[res.dup_of[gone]]).sum(1), atol=1e-5)
    assert set(np.minimum(gone, res.dup_of[gone]) % 1000) == set(range(100))  # each removal is a planted pair


def test_the_guard_stops_in_one_line_with_the_share_and_quantiles():
    x = digits_images()
    res = run_content(x, eps=0.1)  # 1 - eps = 0.9: most distinct digits correlate above that
    share = (~res.keep).mean()
    assert share > 0.5
    with pytest.raises(CurateError) as err:
        check_removed(res, eps=0.1, max_removed=0.2, what=" (content features)")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"dedup would remove {share:.1%} of its pool ({(~res.keep).sum()} of {len(x)}), "
                          "more than max_removed 0.2; nearest-neighbour similarity (content features): q50 ")
    q = nn_quantiles(res.nn_sim)
    assert f"q50 {q['q50']}, q90 {q['q90']}" in msg and "1 - eps = 0.9" in msg
    check_removed(res, eps=0.1, max_removed=float(np.ceil(share * 100) / 100))  # a raised limit lets it through
    check_removed(run_content(x), eps=EPS, max_removed=0.2)


def test_bad_eps_is_refused():
    for eps in (0.0, 2.0, True):
        with pytest.raises(CurateError, match="eps must be in"):
            content_dedup(np.eye(3, dtype=np.float32), eps=eps)
