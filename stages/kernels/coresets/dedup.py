"""SemDeDup (Abbas et al. 2023): remove semantic near-duplicates from embeddings.

k-means the L2-normalised embeddings; within each cluster, walk the samples from the least
to the most similar to the centroid (SemDeDup keeps the least prototypical copy, ties by row
index) and drop a sample when its cosine similarity to an already kept sample of the cluster
exceeds 1 - eps. Only pairs inside a cluster are compared, so memory stays per-cluster (and
per row block for large clusters), never N x N.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.errors import CurateError
from stages.kernels.cluster import faiss_kmeans, kmeans

BLOCK = 4096  # rows of a cluster handled at once: a BLOCK x BLOCK similarity matrix (64 MiB fp32)


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


def _dedup_ordered(x: torch.Tensor, thr: float, block: int = BLOCK) -> torch.Tensor:
    """Keep mask for the rows of x (one cluster, unit rows, already in walk order).

    Block by block: first drop rows duplicating a row kept in an earlier block (their status is
    final), then run the greedy rule among the survivors of the block.
    """
    m = len(x)
    keep = torch.zeros(m, dtype=torch.bool, device=x.device)
    for s in range(0, m, block):
        xb = x[s:s + block]
        alive = torch.ones(len(xb), dtype=torch.bool, device=x.device)
        kept = x[:s][keep[:s]]
        for c in range(0, len(kept), block):
            alive &= ~((xb @ kept[c:c + block].T) > thr).any(1)
        idx = alive.nonzero().flatten()
        xa = xb[idx]
        keep[s + idx[_greedy_keep(xa @ xa.T, thr)]] = True
    return keep


def _unit_rows(emb: np.ndarray, center: bool = False) -> np.ndarray:
    x = np.asarray(emb, dtype=np.float32)
    if x.ndim != 2:
        raise CurateError(f"semdedup: embeddings must be [N, D], got shape {x.shape}")
    bad = ~np.isfinite(x).all(1)
    if bad.any():
        raise CurateError(f"semdedup: embedding row {int(np.flatnonzero(bad)[0])} is NaN or infinite")
    if center and len(x):
        x = x - x.mean(0, dtype=np.float64).astype(np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    if (norm == 0).any():
        what = "equals the mean embedding" if center else "has zero norm"
        raise CurateError(f"semdedup: embedding row {int(np.flatnonzero(norm[:, 0] == 0)[0])} {what}")
    return x / norm


def semdedup(emb: np.ndarray, *, eps: float, clusters: int | None = None, seed: int = 0,
             device="cpu", center: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """SemDeDup (Abbas et al. 2023): returns (keep bool [N], cluster id int64 [N]).

    eps in (0, 2): pairs with cosine similarity > 1 - eps are duplicates. `clusters` defaults to
    max(1, N // 1000); k-means runs in faiss when installed and device is the CPU, else in torch.
    center: subtract the mean embedding first. Non-negative features (a proxy's ReLU outputs)
    all sit in one orthant, where every cosine is high and a fixed eps removes far too much;
    centred, cosines spread over [-1, 1] as they do for CLIP embeddings.
    """
    if not 0.0 < eps < 2.0:
        raise CurateError(f"semdedup: eps must be in (0, 2), got {eps}")
    x = _unit_rows(emb, center)
    n = len(x)
    if n == 0:
        return np.zeros(0, bool), np.zeros(0, np.int64)
    if clusters is None:
        clusters = max(1, n // 1000)
    if isinstance(clusters, bool) or int(clusters) != clusters or clusters < 1:
        raise CurateError(f"semdedup: clusters must be an integer >= 1, got {clusters}")
    clusters = min(int(clusters), n)
    dev = torch.device(device)
    cent = faiss_kmeans(x, clusters, seed=seed) if dev.type == "cpu" else None
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
    bounds = np.concatenate([[0], np.cumsum(np.bincount(assign_np, minlength=clusters))])
    xs = xt[torch.as_tensor(order, device=dev)]
    keep_sorted = torch.zeros(n, dtype=torch.bool, device=dev)
    thr = 1.0 - eps
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            keep_sorted[a:b] = _dedup_ordered(xs[a:b], thr)
    keep = np.zeros(n, bool)
    keep[order] = keep_sorted.cpu().numpy()
    return keep, assign_np.astype(np.int64)


def removed_per_class(keep: np.ndarray, labels: np.ndarray) -> dict[int, int]:
    """Class id -> samples removed, every class present (0 where none): shows whether dedup
    thins some classes more than others."""
    keep, labels = np.asarray(keep, bool), np.asarray(labels)
    if keep.shape != labels.shape:
        raise CurateError(f"removed_per_class: {len(keep)} keep flags for {len(labels)} labels")
    classes, inv = np.unique(labels, return_inverse=True)
    removed = np.bincount(inv.reshape(-1), weights=~keep, minlength=len(classes))
    return {int(c): int(r) for c, r in zip(classes, removed)}
