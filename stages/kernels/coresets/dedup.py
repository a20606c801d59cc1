"""Near-duplicate removal: SemDeDup on embeddings, and the same walk on content features.

The walk: visit the samples in a fixed order and drop a sample when its similarity to a sample
already kept exceeds 1 - eps; a dropped sample records that kept twin (`dup_of`, the most similar
one) and the similarity. Comparisons run in row blocks against a segment of the walk (one
k-means cluster for SemDeDup, the whole pool for content features), so memory is a few
BLOCK x BLOCK similarity matrices, never N x N.

- `semdedup` (Abbas et al. 2023): k-means the L2-normalised embeddings; within each cluster,
  walk from the least to the most similar to the centroid (SemDeDup keeps the least
  prototypical copy, ties by row index). Only pairs inside a cluster are compared.
- `content_dedup`: walk the pool in row order (the first occurrence is kept) and compare every
  pair, where a sample's similarity to an earlier one is the best over its query views (e.g.
  stages.kernels.content's one-pixel shifts) against the earlier one's plain feature.

Each sample's nearest-neighbour similarity (within what was compared) comes back too: the
guard (`check_removed`) quotes its quantiles when a threshold would remove too much.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pipeline.errors import CurateError
from stages.kernels.cluster import faiss_kmeans, kmeans, sampled_centroids

BLOCK = 4096  # rows handled at once: BLOCK x BLOCK similarity matrices (64 MiB fp32)
NN_QUANTILES = (0.5, 0.9, 0.99, 0.999)  # quoted by the guard

Views = Callable[[int, int], torch.Tensor]  # (start, stop) of the walk -> [V, stop - start, D] unit rows


@dataclass
class Dedup:
    """What a walk decided, per sample (positions in the input's order)."""

    keep: np.ndarray  # bool [N]
    dup_of: np.ndarray  # int64 [N]: the kept twin of a removed sample, -1 where kept
    dup_sim: np.ndarray  # float32 [N]: similarity to that twin, NaN where kept
    nn_sim: np.ndarray  # float32 [N]: highest similarity to any other sample compared with it (NaN: none)
    cluster: np.ndarray | None = None  # int64 [N], SemDeDup's k-means cluster


def _greedy_keep(sim: torch.Tensor, thr: float) -> torch.Tensor:
    """Sequential rule "keep i unless sim(i, j) > thr for a kept j < i", vectorised.

    Iterates keep <- ~any_j<i(dup[i, j] & keep[j]) from all-True to a fixed point. Row i depends
    only on rows before it, so after t rounds rows 0..t hold their sequential value and never
    change again: the iteration reaches the sequential answer within m rounds, and any fixed
    point is that answer. In practice rounds = the longest chain of duplicates, a handful.
    Only rows with a duplicate take part (usually few): the rest are always kept.
    """
    close = sim > thr
    close.fill_diagonal_(False)
    keep = torch.ones(len(sim), dtype=torch.bool, device=sim.device)
    cand = close.any(1).nonzero().flatten()  # duplicates pair up among these only
    if len(cand) == 0:
        return keep
    dup = torch.tril(close[cand][:, cand], diagonal=-1)
    sub_keep = torch.ones(len(cand), dtype=torch.bool, device=sim.device)
    while True:
        new = ~(dup & sub_keep[None, :]).any(1)
        if torch.equal(new, sub_keep):
            keep[cand] = new
            return keep
        sub_keep = new


def _similarity(q: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """[m, n]: for each query row, the best over its views [V, m, D] against base rows [n, D]."""
    s = q[0] @ base.T
    for v in q[1:]:
        s = torch.maximum(s, v @ base.T)
    return s


def _walk(x: torch.Tensor, thr: float, bounds, views: Views | None = None, block: int = BLOCK,
          order: torch.Tensor | None = None):
    """The walk over x (unit rows, in walk order; or x[order] where an order is given, read a block
    at a time), each segment [a, b) of `bounds` on its own.

    Rows are handled in blocks: a block is first compared with the earlier blocks of its segment
    (whose keep flags are final: a row duplicating a kept one there is dropped), then the greedy
    rule runs among its survivors. The similarity of a later row i to an earlier row j is
    views(i) against x[j]; that one number also stands for (j, i), for the nearest-neighbour
    similarities of both. Returns (keep, dup_of, dup_sim, nn_sim) tensors in walk order.
    """
    n, dev = len(x), x.device
    rows = (lambda s, e: x[s:e]) if order is None else (lambda s, e: x[order[s:e]])
    keep = torch.zeros(n, dtype=torch.bool, device=dev)
    dup_of = torch.full((n,), -1, dtype=torch.int64, device=dev)
    dup_sim = torch.full((n,), float("nan"), device=dev)
    nn = torch.full((n,), -float("inf"), device=dev)
    neg = torch.tensor(-float("inf"), device=dev)
    for a, b in bounds:
        for s in range(a, b, block):
            e = min(s + block, b)
            m = e - s
            q = views(s, e) if views is not None else rows(s, e)[None]
            best = torch.full((m,), -float("inf"), device=dev)
            best_j = torch.full((m,), -1, dtype=torch.int64, device=dev)
            for c in range(a, s, block):  # earlier blocks of the segment
                sim = _similarity(q, rows(c, min(c + block, b)))
                nn[s:e] = torch.maximum(nn[s:e], sim.max(1).values)
                nn[c:c + block] = torch.maximum(nn[c:c + block], sim.max(0).values)
                v, j = torch.where(keep[c:c + block][None, :], sim, neg).max(1)
                better = v > best
                best, best_j = torch.where(better, v, best), torch.where(better, j + c, best_j)
            raw = _similarity(q, rows(s, e))  # raw[i, j]: view of i against j
            lower = torch.ones(m, m, dtype=torch.bool, device=dev).tril(-1)
            sim = torch.where(lower, raw, raw.T)  # (i, j) and (j, i): the later row's views
            sim.fill_diagonal_(-float("inf"))
            nn[s:e] = torch.maximum(nn[s:e], sim.max(1).values)
            alive = (best <= thr).nonzero().flatten()
            k = torch.zeros(m, dtype=torch.bool, device=dev)
            k[alive[_greedy_keep(sim[alive][:, alive], thr)]] = True
            keep[s:e] = k
            v, j = torch.where(lower & k[None, :], sim, neg).max(1)  # kept earlier rows of the block
            better = v > best
            best, best_j = torch.where(better, v, best), torch.where(better, j + s, best_j)
            dup_of[s:e] = torch.where(k, -1, best_j)
            dup_sim[s:e] = torch.where(k, float("nan"), best)
    nn = torch.where(torch.isinf(nn), float("nan"), nn)
    return keep, dup_of, dup_sim, nn


def _dedup_ordered(x: torch.Tensor, thr: float, block: int = BLOCK) -> torch.Tensor:
    """Keep mask for the rows of x (one cluster, unit rows, already in walk order)."""
    return _walk(x, thr, [(0, len(x))], block=block)[0]


def _check_eps(eps: float, who: str) -> float:
    if isinstance(eps, bool) or not 0.0 < eps < 2.0:
        raise CurateError(f"{who}: eps must be in (0, 2), got {eps}")
    return 1.0 - eps


def _unit_rows(emb: np.ndarray, center: bool = False, overwrite: bool = False) -> np.ndarray:
    """Unit rows (after subtracting the mean where `center`), float32, made block by block: one
    [N, D] result and no temporaries of the whole; with `overwrite`, into emb itself where it is
    float32 (the caller hands its array over)."""
    x = np.asarray(emb)
    if x.ndim != 2:
        raise CurateError(f"semdedup: embeddings must be [N, D], got shape {x.shape}")
    out = x if overwrite and x.dtype == np.float32 and x.flags.writeable else np.empty(x.shape, np.float32)
    mean = np.zeros(x.shape[1], np.float32)
    if center and len(x):
        total = np.zeros(x.shape[1], np.float64)
        for s in range(0, len(x), 65536):
            total += x[s:s + 65536].astype(np.float64).sum(0)
        mean = (total / len(x)).astype(np.float32)
    for s in range(0, len(x), 65536):
        b = x[s:s + 65536].astype(np.float32)
        bad = ~np.isfinite(b).all(1)
        if bad.any():
            raise CurateError(f"semdedup: embedding row {s + int(np.flatnonzero(bad)[0])} is NaN or infinite")
        b -= mean
        norm = np.linalg.norm(b, axis=1, keepdims=True)
        if (norm == 0).any():
            what = "equals the mean embedding" if center else "has zero norm"
            raise CurateError(f"semdedup: embedding row {s + int(np.flatnonzero(norm[:, 0] == 0)[0])} {what}")
        out[s:s + 65536] = b / norm
    return out


def _unwalk(order: np.ndarray, keep, dup_of, dup_sim, nn) -> tuple[np.ndarray, ...]:
    """Walk-order results back in input order; dup_of as input positions."""
    n = len(order)
    out_keep, out_of = np.zeros(n, bool), np.full(n, -1, np.int64)
    out_sim, out_nn = np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32)
    out_keep[order] = keep.cpu().numpy()
    of = dup_of.cpu().numpy()
    out_of[order] = np.where(of >= 0, order[np.maximum(of, 0)], -1)
    out_sim[order] = dup_sim.cpu().numpy()
    out_nn[order] = nn.cpu().numpy()
    return out_keep, out_of, out_sim, out_nn


def semdedup_walk(emb: np.ndarray, *, eps: float, clusters: int | None = None, seed: int = 0,
                  device="cpu", center: bool = False, knn: dict | None = None, overwrite: bool = False) -> Dedup:
    """SemDeDup (Abbas et al. 2023) with each removed sample's kept twin.

    eps in (0, 2): pairs with cosine similarity > 1 - eps are duplicates. `clusters` defaults to
    max(1, N // 1000); k-means runs in faiss when installed and device is the CPU, else in torch;
    with `knn` (the run's `knn:` section) and N past its exact_max_n, on a sample (stages.kernels.cluster).
    center: subtract the mean embedding first. Non-negative features (a proxy's ReLU outputs)
    all sit in one orthant, where every cosine is high and a fixed eps removes far too much;
    centred, cosines spread over [-1, 1] as they do for CLIP embeddings.
    overwrite: emb (float32) may be overwritten by its unit rows, so that memory holds one [N, D]
    array (the walk reads each cluster's rows through the walk order, never a reordered copy).
    """
    thr = _check_eps(eps, "semdedup")
    x = _unit_rows(emb, center, overwrite)
    n = len(x)
    if n == 0:
        e = np.zeros(0, np.int64)
        return Dedup(np.zeros(0, bool), e, np.zeros(0, np.float32), np.zeros(0, np.float32), e)
    if clusters is None:
        clusters = max(1, n // 1000)
    if isinstance(clusters, bool) or int(clusters) != clusters or clusters < 1:
        raise CurateError(f"semdedup: clusters must be an integer >= 1, got {clusters}")
    clusters = min(int(clusters), n)
    dev = torch.device(device)
    cent = sampled_centroids(x, clusters, knn, seed=seed, device=dev)
    if cent is None and dev.type == "cpu":
        cent = faiss_kmeans(x, clusters, seed=seed)
    if cent is None:
        cent = kmeans(x, clusters, seed=seed, device=dev)
    cent = cent / np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-12)
    xt = torch.as_tensor(x, device=dev)
    ct = torch.as_tensor(np.ascontiguousarray(cent, dtype=np.float32), device=dev)
    assign = torch.empty(n, dtype=torch.int64, device=dev)
    cos = torch.empty(n, dtype=torch.float32, device=dev)
    for s in range(0, n, 65536):  # nearest centroid by cosine, in blocks
        best = (xt[s:s + 65536] @ ct.T).max(1)
        cos[s:s + 65536], assign[s:s + 65536] = best.values, best.indices
    assign_np, cos_np = assign.cpu().numpy(), cos.cpu().numpy()
    # walk order: by cluster, then least similar to the centroid first, then row index
    order = np.lexsort((np.arange(n), cos_np, assign_np))
    ends = np.cumsum(np.bincount(assign_np, minlength=clusters))
    bounds = [(int(a), int(b)) for a, b in zip(np.concatenate([[0], ends[:-1]]), ends) if b > a]
    res = _walk(xt, thr, bounds, order=torch.as_tensor(order, device=dev))
    return Dedup(*_unwalk(order, *res), cluster=assign_np.astype(np.int64))


def semdedup(emb: np.ndarray, *, eps: float, clusters: int | None = None, seed: int = 0,
             device="cpu", center: bool = False, knn: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """SemDeDup: (keep bool [N], cluster id int64 [N]); see semdedup_walk."""
    res = semdedup_walk(emb, eps=eps, clusters=clusters, seed=seed, device=device, center=center, knn=knn)
    return res.keep, res.cluster


def content_dedup(features, *, eps: float, views: Views | None = None, device="cpu",
                  block: int = BLOCK) -> Dedup:
    """Exact and near-exact duplicates among unit feature rows [N, D], first occurrence kept.

    Every pair is compared (O(N^2 D) work in BLOCK x BLOCK pieces, on `device`). `views(start,
    stop)` gives the query views of rows start..stop ([V, m, D], unit rows, view 0 the row's own
    feature); a later row's similarity to an earlier one is its best view against the earlier
    row's feature (without views: the plain cosine).
    """
    thr = _check_eps(eps, "dedup")
    x = torch.as_tensor(features, dtype=torch.float32, device=device)
    if x.ndim != 2:
        raise CurateError(f"dedup: features must be [N, D], got shape {tuple(x.shape)}")
    n = len(x)
    res = _walk(x, thr, [(0, n)] if n else [], views=views, block=block)
    return Dedup(*_unwalk(np.arange(n), *res))


def nn_quantiles(nn_sim: np.ndarray, qs=NN_QUANTILES) -> dict[str, float]:
    """Quantiles of the nearest-neighbour similarity ("q50" -> value), rows with none left out."""
    v = np.asarray(nn_sim, np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return {}
    return {f"q{100 * q:g}": round(float(np.quantile(v, q)), 5) for q in qs}


def check_removed(res: Dedup, *, eps: float, max_removed: float, what: str = "") -> None:
    """The guard: a walk that would drop more than `max_removed` of its pool stops here, in one
    line with the share and the nearest-neighbour similarity quantiles (what a threshold there
    would keep), instead of deleting most of a dataset on a bad threshold."""
    n = len(res.keep)
    removed = int((~res.keep).sum())
    if n and removed / n > max_removed:
        qs = ", ".join(f"{k} {v}" for k, v in nn_quantiles(res.nn_sim).items())
        raise CurateError(f"dedup would remove {removed / n:.1%} of its pool ({removed} of {n}), more than "
                          f"max_removed {max_removed:g}; nearest-neighbour similarity{what}: {qs}; "
                          f"it drops pairs above 1 - eps = {1 - eps:g}: lower eps, or raise max_removed if that is intended")


def removed_per_class(keep: np.ndarray, labels: np.ndarray) -> dict[int, int]:
    """Class id -> samples removed, every class present (0 where none): shows whether dedup
    thins some classes more than others."""
    keep, labels = np.asarray(keep, bool), np.asarray(labels)
    if keep.shape != labels.shape:
        raise CurateError(f"removed_per_class: {len(keep)} keep flags for {len(labels)} labels")
    classes, inv = np.unique(labels, return_inverse=True)
    removed = np.bincount(inv.reshape(-1), weights=~keep, minlength=len(classes))
    return {int(c): int(r) for c, r in zip(classes, removed)}
