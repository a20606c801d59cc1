"""Facility location and CRAIG (Mirzasoleiman et al. 2020).

CRAIG picks, per class, the samples S maximising F(S) = sum_i max_{j in S} s_ij, the
facility-location function of a similarity s; each selected sample then weighs as
many samples of its class as it is the most similar selected one for, so that the
weighted subset's gradient sum approximates the class's.

Similarity, from a feature space (stages.kernels.coresets.features):
- `euclidean` (CRAIG): s_ij = c - ||x_i - x_j||, with c the largest distance in the
  class (dense) or the largest k-NN distance in the class (sparse), so s >= 0;
- `cosine`: s_ij = (1 + cos(x_i, x_j)) / 2.

Two similarity structures, chosen per class by size:
- `DenseSimilarity`: the class's n x n matrix, for small classes;
- `SparseSimilarity`: only each sample's k nearest neighbours (itself included), as a
  column-compressed graph, so memory grows with n * k and never n^2. Similarities to
  non-neighbours count as 0. The neighbours come from exact torch blocks, or from faiss
  (stages.kernels.knn) where the run's `knn:` rule picks it for the class's size.

Two greedy maximisers: `lazy_greedy` (exact greedy with a priority queue of stale
upper bounds; submodularity makes them valid) and `stochastic_greedy` ("lazier than
lazy", Mirzasoleiman et al. 2015: each step evaluates a random sample of
(n / k) log(1 / eps) remaining candidates in one batched call, (1 - 1/e - eps) in
expectation). Both work on CPU or GPU tensors; random draws come from a seeded numpy
generator, so picks do not depend on the device's RNG.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import CurateError

BLOCK = 4096  # rows per block when building similarities and assignments
ASSIGN_CANDIDATES = 4  # faiss assignment: each sample's nearest picks among which ties are split


# ----------------------------------------------------------------- similarities
def _distances(feats, a: slice, sq: torch.Tensor, other=None, sq_other=None) -> torch.Tensor:
    """Euclidean distances between rows a and every row of `other` (default: feats)."""
    so = sq if other is None else sq_other
    return (sq[a][:, None] + so[None, :] - 2 * feats.gram(a, other)).clamp_(min=0).sqrt_()


def _cosine(feats, a: slice, sq: torch.Tensor, other=None, sq_other=None) -> torch.Tensor:
    """(1 + cos) / 2 between rows a and every row of `other` (default: feats)."""
    so = sq if other is None else sq_other
    inv_a, inv_o = sq[a].clamp(min=1e-24).rsqrt(), so.clamp(min=1e-24).rsqrt()
    return (feats.gram(a, other) * inv_a[:, None] * inv_o[None, :]).add_(1).mul_(0.5).clamp_(0, 1)


def _centred(feats, metric: str):
    """Euclidean distances do not move with a shift: centring plain features first keeps
    |x|^2 + |y|^2 - 2<x, y> from cancelling away the distance between nearby points."""
    from stages.kernels.coresets.features import Plain

    if metric == "euclidean" and isinstance(feats, Plain) and len(feats):
        return Plain(feats.x - feats.x.mean(0, keepdim=True))
    return feats


def _blocks(n: int, block: int = BLOCK):
    for s in range(0, n, block):
        yield slice(s, min(n, s + block))


@dataclass
class DenseSimilarity:
    s: torch.Tensor  # [n, n], symmetric, >= 0

    @property
    def n(self) -> int:
        return len(self.s)

    @classmethod
    def build(cls, feats, metric: str) -> "DenseSimilarity":
        n, sq = len(feats), feats.sqnorms()
        if metric == "cosine":
            return cls(torch.cat([_cosine(feats, b, sq) for b in _blocks(n)]))
        d = torch.cat([_distances(feats, b, sq) for b in _blocks(n)])
        d = torch.minimum(d, d.T)  # exact symmetry despite rounding
        d.fill_diagonal_(0)  # and an exact zero to itself
        return cls(d.max() - d)

    def gains(self, cand: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
        return (self.s[cand] - cur).clamp_(min=0).sum(1)

    def cover(self, j: int, cur: torch.Tensor) -> None:
        """cur <- max(cur, s[:, j]) in place."""
        torch.maximum(cur, self.s[j], out=cur)

    def top(self) -> float:
        return float(self.s.max())

    def initial_gains(self) -> torch.Tensor:
        return self.s.sum(1)


@dataclass
class SparseSimilarity:
    """Column-compressed k-NN graph: column j lists the samples i that have j among their
    k nearest neighbours, with s_ij; a candidate's gain is a sum over its column."""

    indptr: torch.Tensor  # [n + 1] int64
    rows: torch.Tensor  # [nnz] int64
    vals: torch.Tensor  # [nnz] float32

    @property
    def n(self) -> int:
        return len(self.indptr) - 1

    @classmethod
    def build(cls, feats, metric: str, k: int, knn: dict | None = None, seed: int = 0) -> "SparseSimilarity":
        """k nearest neighbours of each row, itself included: exact torch blocks, or faiss where the
        `knn:` options' rule (stages.kernels.knn.choose_backend, on the class size) says so."""
        from stages.kernels.knn import EXACT_MAX_N, choose_backend

        n, sq = len(feats), feats.sqnorms()
        k = min(k, n)
        opts = {"backend": "exact"} if knn is None else knn
        if k > 1 and choose_backend(n, opts.get("backend", "auto"), sq.device,
                                    opts.get("exact_max_n", EXACT_MAX_N)) == "faiss":
            nbr, val = _faiss_neighbours(feats, metric, k, opts, seed)
        else:
            nbr, val = [], []
            for b in _blocks(n, max(1, min(BLOCK, (1 << 26) // max(n, 1)))):  # a block holds <= 64M entries
                if metric == "cosine":
                    v, i = _cosine(feats, b, sq).topk(k, dim=1)
                else:
                    v, i = _distances(feats, b, sq).topk(k, dim=1, largest=False)
                nbr.append(i)
                val.append(v)
            nbr, val = torch.cat(nbr), torch.cat(val)
        src = torch.arange(n, device=nbr.device).repeat_interleave(k)
        if metric != "cosine":
            val = val.masked_fill(nbr == src.view(n, k), 0)  # an exact zero to itself
            val = val.max() - val  # c - d with c the largest k-NN distance of the class
        col = nbr.reshape(-1)
        order = torch.argsort(col * n + src)  # by column, then row: a deterministic layout
        counts = torch.bincount(col, minlength=n)
        indptr = torch.zeros(n + 1, dtype=torch.int64, device=nbr.device)
        indptr[1:] = torch.cumsum(counts, 0)
        return cls(indptr, src[order], val.reshape(-1)[order].float())

    def _flat(self, cand: torch.Tensor):
        start, end = self.indptr[cand], self.indptr[cand + 1]
        lens = end - start
        seg = torch.repeat_interleave(torch.arange(len(cand), device=cand.device), lens)
        offsets = torch.cumsum(lens, 0) - lens
        flat = start[seg] + torch.arange(int(lens.sum()), device=cand.device) - offsets[seg]
        return flat, lens

    def gains(self, cand: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
        flat, lens = self._flat(cand)
        v = (self.vals[flat] - cur[self.rows[flat]]).clamp_(min=0).double()
        # segment sums from a float64 cumulative sum: deterministic on CPU and CUDA (no atomics)
        cs = torch.cat([torch.zeros(1, dtype=v.dtype, device=v.device), torch.cumsum(v, 0)])
        ends = torch.cumsum(lens, 0)
        return (cs[ends] - cs[ends - lens]).float()

    def cover(self, j: int, cur: torch.Tensor) -> None:
        """cur <- max(cur, s[:, j]) in place (a column lists each row once)."""
        a, b = int(self.indptr[j]), int(self.indptr[j + 1])
        r = self.rows[a:b]
        cur[r] = torch.maximum(cur[r], self.vals[a:b])

    def top(self) -> float:
        return float(self.vals.max())

    def initial_gains(self) -> torch.Tensor:
        return self.gains(torch.arange(self.n, device=self.indptr.device), torch.zeros(self.n, device=self.vals.device))


def _faiss_neighbours(feats, metric: str, k: int, opts: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(neighbours [n, k], values [n, k]) as the exact blocks give them (the row itself first, then
    k - 1 others from faiss): (1 + cos) / 2 for cosine, the Euclidean distance otherwise."""
    from stages.kernels.knn import graph_kwargs, knn_graph

    x = feats.dense().detach().cpu().numpy()
    kw = {**graph_kwargs(opts), "backend": "faiss"}
    idx, sim = knn_graph(x, k - 1, metric="cosine" if metric == "cosine" else "l2", seed=seed, **kw)
    n, dev = len(x), feats.sqnorms().device
    nbr = torch.from_numpy(np.concatenate([np.arange(n)[:, None], idx], 1)).to(dev)
    if metric == "cosine":
        val = np.concatenate([np.ones((n, 1), np.float32), ((1 + sim) * 0.5).clip(0, 1)], 1)
    else:
        val = np.concatenate([np.zeros((n, 1), np.float32), -sim], 1)  # knn_graph's l2 sim is minus the distance
    return nbr, torch.from_numpy(val).to(dev)


def similarity(feats, metric: str, *, graph: str = "auto", dense_max: int = 10000, knn: int = 32,
               knn_options: dict | None = None, seed: int = 0):
    """The class's similarity structure: dense below `dense_max` samples (graph=auto), else sparse k-NN
    (built as the `knn:` section's options say: stages.kernels.knn)."""
    if metric not in ("euclidean", "cosine"):
        raise CurateError(f"craig: metric must be euclidean or cosine, got {metric!r}")
    feats = _centred(feats, metric)
    use_dense = graph == "dense" or (graph == "auto" and len(feats) <= dense_max)
    if use_dense:
        return DenseSimilarity.build(feats, metric)
    return SparseSimilarity.build(feats, metric, knn, knn_options, seed)


# ----------------------------------------------------------------- maximisers
def lazy_greedy(sim, k: int) -> np.ndarray:
    """Exact greedy picks (ties to the lower index) using stale gains as upper bounds."""
    cur = torch.zeros(sim.n, dtype=torch.float32, device=_device(sim))
    init = sim.initial_gains().cpu().numpy().astype(np.float64)
    heap = [(-g, j) for j, g in enumerate(init)]
    heapq.heapify(heap)
    picks: list[int] = []
    while len(picks) < k:
        _, j = heapq.heappop(heap)
        fresh = float(sim.gains(torch.tensor([j], device=cur.device), cur)[0])
        if not heap or fresh >= -heap[0][0]:
            picks.append(j)
            sim.cover(j, cur)
        else:
            heapq.heappush(heap, (-fresh, j))
    return np.asarray(picks, np.int64)


def stochastic_greedy(sim, k: int, *, eps: float = 0.01, seed: int = 0) -> np.ndarray:
    """Each step: the best of a random sample of (n / k) log(1 / eps) remaining candidates."""
    if not 0 < eps < 1:
        raise CurateError(f"craig: eps must be in (0, 1), got {eps}")
    n, dev = sim.n, _device(sim)
    rng = np.random.default_rng(seed)
    size = max(1, math.ceil(n / k * math.log(1 / eps)))
    pool = np.arange(n)  # remaining candidates live in pool[:left]
    left = n
    cur = torch.zeros(n, dtype=torch.float32, device=dev)
    picks = np.empty(k, np.int64)
    for t in range(k):
        pos = np.arange(left) if size >= left else rng.choice(left, size, replace=False)
        gains = sim.gains(torch.as_tensor(pool[pos], device=dev), cur)
        best = int(pos[int(torch.argmax(gains))])
        j = int(pool[best])
        picks[t] = j
        sim.cover(j, cur)
        left -= 1
        pool[best], pool[left] = pool[left], pool[best]
    return picks


def _device(sim) -> torch.device:
    return sim.s.device if isinstance(sim, DenseSimilarity) else sim.vals.device


def objective(sim, picks) -> float:
    """F(S) = sum_i max_{j in S} s_ij under this similarity structure."""
    cur = torch.zeros(sim.n, dtype=torch.float32, device=_device(sim))
    for j in picks:
        sim.cover(int(j), cur)
    return float(cur.double().sum())


# ----------------------------------------------------------------- weights
def assignment_weights(feats, picks: np.ndarray, metric: str, knn_options: dict | None = None,
                       seed: int = 0) -> np.ndarray:
    """CRAIG weights: how many samples each pick is the most similar pick for (a sample tied
    between picks splits its unit evenly, so all-identical features give equal weights).

    Exact from the features (O(n k D) for k picks, in blocks), whatever graph the picks came from;
    where the `knn:` rule takes faiss for the class (as for its graph), each sample's nearest picks
    come from a faiss index of the picks instead (the ASSIGN_CANDIDATES nearest, similarities
    recomputed from the rows, ties split among those): k = 10% of a 100,000-sample class costs
    seconds instead of most of craig's time."""
    from stages.kernels.knn import EXACT_MAX_N, choose_backend, graph_kwargs, knn_search

    feats = _centred(feats, metric)
    sel = feats.take(picks)
    sq, sq_sel = feats.sqnorms(), sel.sqnorms()
    opts = {"backend": "exact"} if knn_options is None else knn_options
    if len(picks) > 1 and choose_backend(len(feats), opts.get("backend", "auto"), sq.device,
                                         opts.get("exact_max_n", EXACT_MAX_N)) == "faiss":
        x = feats.dense().detach().cpu().numpy()
        idx, sim = knn_search(x[np.asarray(picks)], x, min(ASSIGN_CANDIDATES, len(picks)),
                              metric="cosine" if metric == "cosine" else "l2", seed=seed,
                              **{**graph_kwargs(opts), "backend": "faiss"})
        tie = sim >= sim[:, :1]  # sorted most similar first
        share = tie / tie.sum(1, keepdims=True)
        return np.bincount(idx[tie], weights=share[tie], minlength=len(picks)).astype(np.float32)
    w = torch.zeros(len(picks), dtype=torch.float64, device=sq.device)
    for b in _blocks(len(feats), max(1, min(BLOCK, (1 << 26) // max(len(picks), 1)))):
        if metric == "cosine":
            s = _cosine(feats, b, sq, sel, sq_sel)
        else:
            s = -_distances(feats, b, sq, sel, sq_sel)
        tie = (s >= s.max(1, keepdim=True).values).float()
        w += (tie / tie.sum(1, keepdim=True)).sum(0, dtype=torch.float64)
    return w.float().cpu().numpy()


# ----------------------------------------------------------------- CRAIG
def craig(feats, labels: np.ndarray, alloc: np.ndarray, *, metric: str = "euclidean", optimizer: str = "stochastic",
          eps: float = 0.01, graph: str = "auto", dense_max: int = 10000, knn: int = 32,
          knn_options: dict | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """Per-class facility location: alloc[c] picks from class c. Returns (rows in selection
    order, weights, info). Classes are visited in id order; within a class, greedy order.
    knn_options: the run's `knn:` section as a dict (backend of a sparse graph); None: exact."""
    labels = np.asarray(labels)
    rows_out, w_out, info = [], [], {"objective": {}, "graph": {}, "saturated": []}
    for c in np.flatnonzero(alloc):
        members = np.flatnonzero(labels == c)
        k = int(alloc[c])
        if k > len(members):
            raise CurateError(f"craig: class {c} has {len(members)} samples, fewer than its budget {k}")
        f = feats.take(members)
        sim = similarity(f, metric, graph=graph, dense_max=dense_max, knn=knn, knn_options=knn_options,
                         seed=seed + int(c))
        if optimizer == "lazy":
            picks = lazy_greedy(sim, k)
        elif optimizer == "stochastic":
            picks = stochastic_greedy(sim, k, eps=eps, seed=seed + int(c))
        else:
            raise CurateError(f"craig: optimizer must be lazy or stochastic, got {optimizer!r}")
        info["objective"][int(c)] = objective(sim, picks)
        info["graph"][int(c)] = "dense" if isinstance(sim, DenseSimilarity) else "sparse"
        # every sample is its own most similar point, so F(all) = n * max s; reaching it before
        # the last pick means the class has fewer distinct points than picks
        if k > 1 and objective(sim, picks[:-1]) >= sim.n * sim.top() * (1 - 1e-6):
            info["saturated"].append(int(c))
        rows_out.append(members[picks])
        w_out.append(assignment_weights(f, picks, metric, knn_options, seed=seed + int(c)))
        del sim
    if not rows_out:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), info
    return np.concatenate(rows_out), np.concatenate(w_out).astype(np.float32), info
