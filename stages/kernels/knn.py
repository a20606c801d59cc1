"""Nearest neighbours and k-means at any scale: exact torch blocks, or faiss on the CPU.

One rule picks the backend (`backend="auto"`, `choose_backend`): **exact** when the device is
a GPU or N <= `exact_max_n` (50,000 by default), else **faiss** (exact too where faiss is not
installed). Exact work is O(N^2 D) but runs in row blocks of at most 64M similarities (on a
GPU, up to a sixteenth of its free memory), so its memory is the [N, D] float32 copy of the
data plus one block; on a GPU that copy is on the GPU
and is filled chunk by chunk from the (possibly memory-mapped) input. The IVF search holds one
[N, D] float32 copy sorted by list (filled chunk by chunk), an HNSW index its own.

- `knn_graph`: each row's k most similar other rows (itself excluded), with the similarity.
  faiss: an inverted file searched in dense blocks (`_ivf_search`: nlist = round(4 sqrt N) lists
  from faiss k-means on a seeded sample of at most `train_per_list` rows per list; each list's rows
  compared by one matrix product with the rows of the `nprobe` lists nearest to it, fewer once
  `max_codes` candidate rows are reached) or faiss HNSW (`hnsw_m` links, `ef_construction`,
  `ef_search`). The similarities of the neighbours found are recomputed from the rows, so both
  backends report the same value for the same pair.
- `knn_search`: each query's k most similar rows of a base set (knn_shapley's validation points
  against the training pool), from the same exact blocks, IVF lists (queries grouped by their
  nearest list) or HNSW index.
- `kmeans`: greedy k-means++ seeding and Lloyd's algorithm (torch, or faiss.Kmeans from the
  same start) fitted on a seeded sample of at most `max_points_per_centroid` rows per
  centroid, then every row assigned to its nearest centroid in blocks.

Determinism: the same input, options and seed give the same arrays. Exact: torch on one device.
IVF and k-means: the training sample is drawn by numpy from `seed` and faiss's clustering
is seeded; measured on 20,000 x 64, repeated runs with 2 OpenMP threads and runs with 1 thread
gave identical arrays (the tests assert repeats). HNSW inserts in parallel under locks, so its
graph may depend on thread timing (3 repeated 2-thread builds of 20,000 rows agreed here, which
proves nothing): `knn_graph` builds HNSW on one thread (slower; IVF is the default).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch

from pipeline.errors import CurateError

EXACT_MAX_N = 50_000
METRICS = ("cosine", "ip", "l2")
CHUNK = 16_384  # rows per chunk read from the input (a memmap stays mostly on disk)
BLOCK_ENTRIES = 1 << 26  # similarities per exact block (256 MB in float32)
SEED_ROWS = 8192  # k-means++ seeds from at most max(2k, this) rows: its cost is k passes over them

# the option names of each function, as the `knn:` config section spells them
GRAPH_OPTIONS = ("backend", "exact_max_n", "index", "nlist", "nprobe", "max_codes", "train_per_list", "hnsw_m",
                 "ef_search", "ef_construction")
KMEANS_OPTIONS = ("backend", "exact_max_n", "max_points_per_centroid")


def graph_kwargs(knn: dict) -> dict:
    """The knn_graph keyword arguments of a `knn:` section (a plain dict: kernels read no pydantic)."""
    return {k: knn[k] for k in GRAPH_OPTIONS if k in knn}


def kmeans_kwargs(knn: dict) -> dict:
    """The kmeans keyword arguments of a `knn:` section."""
    return {k: knn[k] for k in KMEANS_OPTIONS if k in knn}


def have_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(n: int, backend: str = "auto", device="cpu", exact_max_n: int = EXACT_MAX_N) -> str:
    """"exact" or "faiss": auto is exact on a GPU or for n <= exact_max_n, else faiss where installed."""
    if backend not in ("auto", "exact", "faiss"):
        raise CurateError(f"knn: backend must be auto, exact or faiss, got {backend!r}")
    if backend == "faiss" and not have_faiss():
        raise CurateError("knn: backend faiss, but faiss is not installed (pip install faiss-cpu)")
    if backend != "auto":
        return backend
    if torch.device(device).type != "cpu" or n <= exact_max_n or not have_faiss():
        return "exact"
    return "faiss"


def _matrix(x, name: str = "x"):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        raise CurateError(f"knn: {name} must be a 2-d array [N, D], got shape {getattr(x, 'shape', None)}")
    if x.dtype.kind != "f":
        raise CurateError(f"knn: {name} must be floating point, got {x.dtype}")
    return x


def _chunk(x: np.ndarray, s: int, e: int, metric: str) -> np.ndarray:
    """Rows s:e as contiguous float32, unit-normalised for cosine; non-finite rows refused."""
    return _checked(np.array(x[s:e], dtype=np.float32), np.arange(s, e), metric)  # a copy: memmaps are read-only


def _take(x: np.ndarray, rows: np.ndarray, metric: str) -> np.ndarray:
    """Rows `rows` (sorted) as one float32 array, read chunk by chunk."""
    parts = [_checked(np.array(x[rows[s:s + CHUNK]], dtype=np.float32), rows[s:s + CHUNK], metric)
             for s in range(0, len(rows), CHUNK)]
    return np.concatenate(parts) if parts else np.zeros((0, x.shape[1]), np.float32)


def _checked(c: np.ndarray, rows: np.ndarray, metric: str) -> np.ndarray:
    bad = ~np.isfinite(c).all(1)
    if bad.any():
        raise CurateError(f"knn: row {int(rows[np.flatnonzero(bad)[0]])} is NaN or infinite")
    if metric == "cosine":
        c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    return c


def _on_device(x: np.ndarray, metric: str, dev: torch.device) -> torch.Tensor:
    out = torch.empty((len(x), x.shape[1]), dtype=torch.float32, device=dev)
    for s in range(0, len(x), CHUNK):
        out[s:s + CHUNK] = torch.from_numpy(_chunk(x, s, min(len(x), s + CHUNK), metric)).to(dev)
    return out


@contextmanager
def _faiss_threads(n: int):
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


# ----------------------------------------------------------------- k-NN graph
def knn_graph(x, k: int, *, backend: str = "auto", metric: str = "cosine", device="cpu",
              exact_max_n: int = EXACT_MAX_N, index: str = "ivf", nlist: int | None = None, nprobe: int = 32,
              max_codes: int | None = None, train_per_list: int = 32, hnsw_m: int = 32, ef_search: int = 128,
              ef_construction: int = 80, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(idx [N, k] int64, sim [N, k] float32): each row's k most similar other rows, most
    similar first. sim is the cosine (`cosine`), the inner product (`ip`) or minus the
    Euclidean distance (`l2`), so larger is nearer for every metric. k is capped at N - 1.
    x: numpy (a memmap is read in chunks) or torch, float, [N, D]."""
    x = _matrix(x)
    if metric not in METRICS:
        raise CurateError(f"knn: metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise CurateError(f"knn: k must be a positive integer, got {k}")
    n = len(x)
    k = min(int(k), max(n - 1, 0))
    if k == 0:
        return np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32)
    if choose_backend(n, backend, device, exact_max_n) == "exact":
        return _exact_graph(x, k, metric, torch.device(device))
    if index == "ivf":
        idx = _ivf_search(x, None, k, metric, nlist=nlist, nprobe=nprobe, max_codes=max_codes,
                          train_per_list=train_per_list, seed=seed)
    elif index == "hnsw":
        ix = _hnsw_index(x, k, metric, hnsw_m=hnsw_m, ef_search=ef_search, ef_construction=ef_construction)
        idx = np.empty((n, k), np.int64)
        for s in range(0, n, CHUNK):
            e = min(n, s + CHUNK)
            idx[s:e] = _drop_self(_hnsw_search(ix, _chunk(x, s, e, metric), k + 1, s), np.arange(s, e))
    else:
        raise CurateError(f"knn: index must be ivf or hnsw, got {index!r}")
    return _rescored(x, idx, metric)


def knn_search(base, queries, k: int, *, backend: str = "auto", metric: str = "cosine", device="cpu",
               exact_max_n: int = EXACT_MAX_N, index: str = "ivf", nlist: int | None = None, nprobe: int = 32,
               max_codes: int | None = None, train_per_list: int = 32, hnsw_m: int = 32, ef_search: int = 128,
               ef_construction: int = 80, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(idx [Q, k] int64, sim [Q, k] float32): each query's k most similar rows of `base` (the
    backend rule on len(base)), most similar first, ties to the lower row; sim as in knn_graph,
    recomputed from the rows. k is capped at len(base)."""
    base, queries = _matrix(base, "base"), _matrix(queries, "queries")
    if metric not in METRICS:
        raise CurateError(f"knn: metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if queries.shape[1] != base.shape[1]:
        raise CurateError(f"knn: queries have {queries.shape[1]} dimensions, base rows {base.shape[1]}")
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise CurateError(f"knn: k must be a positive integer, got {k}")
    n, nq = len(base), len(queries)
    k = min(int(k), n)
    if k == 0 or nq == 0:
        return np.zeros((nq, k), np.int64), np.zeros((nq, k), np.float32)
    idx = np.empty((nq, k), np.int64)
    if choose_backend(n, backend, device, exact_max_n) == "exact":
        dev = torch.device(device)
        bt = _on_device(base, metric, dev)
        sq = (bt * bt).sum(1) if metric == "l2" else None
        step = max(1, min(4096, _block_entries(dev) // n))
        for s in range(0, nq, step):
            e = min(nq, s + step)
            blk = torch.from_numpy(_chunk(queries, s, e, metric)).to(dev) @ bt.T
            if metric == "l2":
                blk.mul_(2).sub_(sq[None, :])  # minus |b|^2 - 2<q, b>: the same order as the distance
            idx[s:e] = blk.topk(k, dim=1).indices.cpu().numpy()
    elif index == "ivf":
        idx[:] = _ivf_search(base, queries, k, metric, nlist=nlist, nprobe=nprobe, max_codes=max_codes,
                             train_per_list=train_per_list, seed=seed)
    elif index == "hnsw":
        ix = _hnsw_index(base, k - 1, metric, hnsw_m=hnsw_m, ef_search=ef_search, ef_construction=ef_construction)
        for s in range(0, nq, CHUNK):
            e = min(nq, s + CHUNK)
            idx[s:e] = _hnsw_search(ix, _chunk(queries, s, e, metric), k, s)
    else:
        raise CurateError(f"knn: index must be ivf or hnsw, got {index!r}")
    return _rescored_queries(base, queries, idx, metric)


def _rescored_queries(base: np.ndarray, queries: np.ndarray, idx: np.ndarray, metric: str):
    """(idx, sim) with sim from the rows themselves, each query's row sorted by (-sim, row)."""
    nq, k = idx.shape
    sim = np.empty((nq, k), np.float32)
    step = max(1, (BLOCK_ENTRIES // 4) // max(k * base.shape[1], 1))
    for s in range(0, nq, step):
        e = min(nq, s + step)
        q = np.asarray(queries[s:e], np.float32)
        nb = np.take(base, idx[s:e].reshape(-1), axis=0).astype(np.float32, copy=False).reshape(e - s, k, -1)
        if metric == "l2":
            sim[s:e] = -np.sqrt(((nb - q[:, None, :]) ** 2).sum(-1))
        else:
            sim[s:e] = (nb @ q[:, :, None])[:, :, 0]
            if metric == "cosine":
                sim[s:e] /= np.maximum(np.linalg.norm(nb, axis=2), 1e-12) * np.maximum(
                    np.linalg.norm(q, axis=1), 1e-12)[:, None]
    by_row = np.argsort(idx, axis=1, kind="stable")  # then a stable sort by similarity: ties to the lower row
    idx, sim = np.take_along_axis(idx, by_row, 1), np.take_along_axis(sim, by_row, 1)
    order = np.argsort(-sim, axis=1, kind="stable")
    return np.take_along_axis(idx, order, 1), np.take_along_axis(sim, order, 1)


def _exact_graph(x: np.ndarray, k: int, metric: str, dev: torch.device):
    xt = _on_device(x, metric, dev)
    n = len(xt)
    sq = (xt * xt).sum(1) if metric == "l2" else None
    idx = np.empty((n, k), np.int64)
    sim = np.empty((n, k), np.float32)
    step = max(1, min(4096, _block_entries(dev) // n))
    for s in range(0, n, step):
        e = min(n, s + step)
        blk = xt[s:e] @ xt.T
        if metric == "l2":
            blk.mul_(2).sub_(sq[s:e, None]).sub_(sq[None, :]).clamp_(max=0)  # minus the squared distance, in place
        blk[torch.arange(e - s, device=dev), torch.arange(s, e, device=dev)] = -math.inf  # never itself
        v, i = blk.topk(k, dim=1)
        del blk
        if metric == "l2":  # |x|^2 + |y|^2 - 2<x, y> cancels for near rows: the distances themselves
            v, i = _l2_resorted(xt, s, i)
        idx[s:e], sim[s:e] = i.cpu().numpy(), v.cpu().numpy()
    return idx, sim


def _block_entries(dev: torch.device) -> int:
    """Similarities per exact block: 64M on the CPU; on a GPU up to a sixteenth of its free memory
    in float32 (a block and topk's work space), so that 1M rows take 4096-row blocks, not 64-row ones
    that would reread the whole [N, D] matrix for every 64 rows."""
    if dev.type != "cuda":
        return BLOCK_ENTRIES
    try:
        free, _ = torch.cuda.mem_get_info(dev)
    except (RuntimeError, AssertionError):
        return BLOCK_ENTRIES
    return max(BLOCK_ENTRIES, free // 16)


def _l2_resorted(xt: torch.Tensor, s: int, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minus the Euclidean distance from rows s.. to their neighbours i, from the differences
    (an exact copy is at 0), re-sorted (stable); in sub-blocks of at most 16M floats."""
    b, k = i.shape
    v = torch.empty(b, k, dtype=xt.dtype, device=xt.device)
    sub = max(1, (BLOCK_ENTRIES // 4) // (k * xt.shape[1]))
    for a in range(0, b, sub):
        v[a:a + sub] = -(xt[s + a:s + min(b, a + sub), None, :] - xt[i[a:a + sub]]).norm(dim=-1)
    v, order = v.sort(dim=1, descending=True, stable=True)
    return v, i.gather(1, order)


def default_nlist(n: int) -> int:
    """IVF lists: about 4 sqrt(N), and never so many that a list averages under 8 rows."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // 8))


def _hnsw_search(ix, q: np.ndarray, k: int, first_row: int) -> np.ndarray:
    """Neighbour ids [len(q), k] from a faiss HNSW index."""
    _, nbr = ix.search(q, k)
    if (nbr < 0).any():
        r = first_row + int(np.flatnonzero((nbr < 0).any(1))[0])
        raise CurateError(f"knn: faiss hnsw found fewer than {k} neighbours for row {r}; raise ef_search")
    return nbr


def _hnsw_index(x: np.ndarray, k: int, metric: str, *, hnsw_m: int, ef_search: int, ef_construction: int):
    """A faiss HNSW-Flat index of the rows of x (added chunk by chunk, on one thread), ready to search k + 1."""
    import faiss

    n, d = x.shape
    fmetric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    ix = faiss.IndexHNSWFlat(d, int(hnsw_m), fmetric)
    ix.hnsw.efConstruction = int(ef_construction)
    ix.hnsw.efSearch = max(int(ef_search), k + 1)
    with _faiss_threads(1):  # a multi-threaded build depends on thread timing
        for s in range(0, n, CHUNK):
            ix.add(_chunk(x, s, min(n, s + CHUNK), metric))
    return ix


def _ivf_lists(x: np.ndarray, metric: str, nlist, train_per_list: int, seed: int):
    """(centroids [L, D] float32, list of each row [N] int64): faiss k-means (seeded, 10 iterations) on
    a seeded sample of at most train_per_list rows per list, rows assigned to the nearest centroid
    (Euclidean, ties to the lower list) in blocks."""
    import faiss

    n, d = x.shape
    lists = max(1, min(int(nlist) if nlist else default_nlist(n), n))
    rows = np.arange(n)
    if n > train_per_list * lists:
        rows = np.sort(np.random.default_rng(seed).choice(n, train_per_list * lists, replace=False))
    km = faiss.Kmeans(d, lists, niter=10, seed=int(seed) % 2**31, verbose=False,
                      max_points_per_centroid=len(rows) // lists + 1, min_points_per_centroid=1)
    km.train(_take(x, rows, metric))
    cent = np.asarray(km.centroids, np.float32)
    return cent, assign(x, cent, metric=metric)


def _probe_order(cent: np.ndarray, width: int) -> np.ndarray:
    """[L, width] int64: each list's `width` nearest lists by centroid distance, itself first
    (ties to the lower list), computed in row blocks (never the L x L matrix at once)."""
    c = torch.from_numpy(cent)
    sq = (c * c).sum(1)
    lists = len(c)
    out = np.empty((lists, width), np.int64)
    step = max(1, BLOCK_ENTRIES // lists)
    for s in range(0, lists, step):
        e = min(lists, s + step)
        d = (sq[s:e, None] - 2 * c[s:e] @ c.T + sq[None, :]).clamp_(min=0)
        d[torch.arange(e - s), torch.arange(s, e)] = -1.0  # itself first, even beside a duplicate centroid
        order = torch.sort(d, dim=1, stable=True).indices[:, :width]
        out[s:e] = order.numpy()
    return out


def _ivf_search(base: np.ndarray, queries: np.ndarray | None, k: int, metric: str, *, nlist, nprobe: int,
                max_codes: int | None, train_per_list: int, seed: int) -> np.ndarray:
    """Neighbour ids [Q, k] (unsorted by similarity; callers rescore) of an inverted-file search
    done as dense blocks: the base rows are split into lists by k-means, the queries grouped by
    their nearest list, and each group is compared with BLAS to the rows of the lists nearest to
    its own (its own first, at most `nprobe` lists, and no more once `max_codes` candidate rows are
    reached; None: nprobe x N / L, the mean). queries None: the base's own k-NN graph (each row's
    k nearest other rows). A group whose probed lists hold too few rows is compared with them all.

    One matrix product per group instead of faiss's per-query scans: on 100,000 x 512 (2 cores)
    about 4x the candidates per second. The cap keeps the cost near N x mean work where k-means
    leaves a few lists long (high-dimensional data): the probing stops earlier in dense regions."""
    graph = queries is None
    n = len(base)
    cent, lst = _ivf_lists(base, metric, nlist, train_per_list, seed)
    lists = len(cent)
    order = np.argsort(lst, kind="stable")  # the base sorted by list: each list a contiguous run
    starts = np.searchsorted(lst[order], np.arange(lists + 1))
    sizes = np.diff(starts)
    xs = _permuted(base, order, metric)
    sq = (xs * xs).sum(1) if metric == "l2" else None
    width = max(1, min(int(nprobe), lists))
    probes = _probe_order(cent, width)
    budget = int(max_codes) if max_codes else math.ceil(width * n / lists)
    if graph:
        q_order, q_starts, nq = order, starts, n
    else:
        q_lst = assign(queries, cent, metric=metric)
        q_order = np.argsort(q_lst, kind="stable")  # within a group, rows ascending
        q_starts = np.searchsorted(q_lst[q_order], np.arange(lists + 1))
        nq = len(queries)
    out = np.empty((nq, k), np.int64)
    for lid in np.flatnonzero(np.diff(q_starts)):
        qa, qb = int(q_starts[lid]), int(q_starts[lid + 1])
        take, total = [], 0
        for p in probes[lid]:
            if take and total >= budget:
                break
            take.append(p)
            total += int(sizes[p])
        whole = total < (k + 1 if graph else k)  # too few rows near this group: compare it with every row
        cand = np.arange(n) if whole else np.concatenate([np.arange(starts[p], starts[p + 1]) for p in take])
        ct = torch.from_numpy(cand)
        xc = xs if whole else xs[ct]  # (every row: no gathered copy)
        csq = sq if whole or sq is None else sq[ct]
        qx = xs[qa:qb] if graph else torch.from_numpy(_take(queries, q_order[qa:qb], metric))
        step = max(1, BLOCK_ENTRIES // len(cand))
        for a in range(0, qb - qa, step):
            b = min(qb - qa, a + step)
            s = qx[a:b] @ xc.T
            if csq is not None:
                s.mul_(2).sub_(csq[None, :])  # minus |c|^2 - 2<q, c>: the order of the distance
            if graph:  # never itself: its own list comes first, so sorted row qa + i is candidate qa - cand[0] + i
                s[torch.arange(b - a), torch.arange(a, b) + (qa - int(cand[0]))] = -math.inf
            rows = order[cand[s.topk(k, dim=1).indices.numpy()]]
            out[(order if graph else q_order)[qa + a:qa + b]] = rows
    return out


def _permuted(x: np.ndarray, order: np.ndarray, metric: str) -> torch.Tensor:
    """Rows x[order] as one float32 tensor, filled chunk by chunk from the (possibly mapped) input."""
    inv = np.empty(len(order), np.int64)
    inv[order] = np.arange(len(order))
    out = torch.empty((len(x), x.shape[1]), dtype=torch.float32)
    for s in range(0, len(x), CHUNK):
        e = min(len(x), s + CHUNK)
        out[torch.from_numpy(inv[s:e])] = torch.from_numpy(_chunk(x, s, e, metric))
    return out


def _rescored(x: np.ndarray, idx: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(idx, sim) with sim computed from the rows themselves and each row re-sorted by it (stable):
    faiss's own distances vary in the last bits with its SIMD code path, and the l2 expansion
    cancels for near rows (an exact copy must be at distance 0). Rows were checked finite when
    indexed, so the neighbours are gathered raw."""
    n, k = idx.shape
    inv = None
    if metric == "cosine":
        inv = np.concatenate([1 / np.maximum(np.linalg.norm(np.asarray(x[s:s + CHUNK], np.float32), axis=1), 1e-12)
                              for s in range(0, n, CHUNK)]).astype(np.float32)
    sim = np.empty((n, k), np.float32)
    step = max(1, (BLOCK_ENTRIES // 4) // max(k * x.shape[1], 1))
    for s in range(0, n, step):
        e = min(n, s + step)
        q = np.asarray(x[s:e], np.float32)
        nb = np.take(x, idx[s:e].reshape(-1), axis=0).astype(np.float32, copy=False).reshape(e - s, k, -1)
        if metric == "l2":
            sim[s:e] = -np.sqrt(((nb - q[:, None, :]) ** 2).sum(-1))
        else:
            sim[s:e] = (nb @ q[:, :, None])[:, :, 0]
            if inv is not None:
                sim[s:e] *= inv[s:e, None] * inv[idx[s:e]]
    order = np.argsort(-sim, axis=1, kind="stable")
    return np.take_along_axis(idx, order, 1), np.take_along_axis(sim, order, 1)


def _drop_self(nbr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """k + 1 results per row -> k: drop the row itself where it was found, else the last one."""
    is_self = nbr == rows[:, None]
    drop = is_self & (np.cumsum(is_self, 1) == 1)
    drop[~is_self.any(1), -1] = True
    return nbr[~drop].reshape(len(nbr), -1).astype(np.int64)


# ----------------------------------------------------------------- k-means
def kmeans(x, k: int, *, backend: str = "auto", iters: int = 20, seed: int = 0, device="cpu",
           exact_max_n: int = EXACT_MAX_N, max_points_per_centroid: int = 256,
           with_assignment: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """(centroids [k, D] float32, assignment [N] int64): Euclidean k-means (normalise rows
    first for spherical clusters). Fitted on a seeded sample of at most
    max_points_per_centroid * k rows: greedy k-means++ seeding (on at most 32 * k of them, and at
    most SEED_ROWS past 256 clusters, as each of its k steps reads all its rows: plain random or
    k-means++ starts often merge well-separated clusters), then `iters` Lloyd
    iterations (torch, or faiss.Kmeans from the same start); then every row goes to its
    nearest centroid (ties to the lower id). k is capped at N; clusters may end up empty.
    with_assignment=False skips that pass (None in its place) for callers that assign themselves."""
    x = _matrix(x)
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise CurateError(f"kmeans: k must be a positive integer, got {k}")
    if int(max_points_per_centroid) < 1:
        raise CurateError(f"kmeans: max_points_per_centroid must be >= 1, got {max_points_per_centroid}")
    n, d = x.shape
    if n == 0:
        return np.zeros((0, d), np.float32), (np.zeros(0, np.int64) if with_assignment else None)
    k = min(int(k), n)
    rng = np.random.default_rng(seed)
    fit = np.arange(n)
    if n > max_points_per_centroid * k:
        fit = np.sort(rng.choice(n, max_points_per_centroid * k, replace=False))
    xs = _take(x, fit, "ip")
    dev = torch.device(device)
    seeding = max(2 * k, min(32 * k, SEED_ROWS))
    init = xs if len(xs) <= seeding else xs[np.sort(rng.choice(len(xs), seeding, replace=False))]
    cent = kmeanspp(torch.from_numpy(init).to(dev), k, seed=seed)
    if choose_backend(n, backend, device, exact_max_n) == "faiss":
        import faiss

        km = faiss.Kmeans(d, k, niter=int(iters), seed=int(seed) % 2**31, verbose=False,
                          max_points_per_centroid=len(xs) // k + 1, min_points_per_centroid=1)
        km.train(xs, init_centroids=cent.cpu().numpy())
        cent = np.asarray(km.centroids, np.float32)
    else:
        cent = lloyd(torch.from_numpy(xs).to(dev), cent, iters).cpu().numpy()
    return cent, (assign(x, cent, device=dev) if with_assignment else None)


def _sqdist(x: torch.Tensor, sq: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (sq[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :]).clamp_(min=0)


def kmeanspp(x: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007; 2 + ln k candidates per step, the
    one that lowers the potential most is kept): k rows of x. Draws come from a CPU generator,
    so the start is the same on any device."""
    n = len(x)
    gen = torch.Generator().manual_seed(int(seed))
    trials = 2 + int(math.log(k))
    sq = (x * x).sum(1)
    picks = [int(torch.randint(n, (1,), generator=gen))]
    d2 = _sqdist(x, sq, x[picks[0]][None])[:, 0]
    for _ in range(1, k):
        p = d2.double().cpu()
        if float(p.sum()) <= 0:  # every row is already a centre's copy
            picks.append(int(torch.randint(n, (1,), generator=gen)))
            continue
        cand = torch.multinomial(p / p.sum(), trials, replacement=True, generator=gen).to(x.device)
        new = torch.minimum(d2[:, None], _sqdist(x, sq, x[cand]))
        best = int(new.double().sum(0).argmin())
        picks.append(int(cand[best]))
        d2 = new[:, best].contiguous()
    return x[picks].clone()


def lloyd(x: torch.Tensor, cent: torch.Tensor, iters: int) -> torch.Tensor:
    """`iters` Lloyd steps from `cent`; sums by one-hot matmuls in blocks (no atomics:
    deterministic on CPU and CUDA); an empty cluster keeps its centre."""
    k = len(cent)
    step = max(1, min(CHUNK, BLOCK_ENTRIES // k))
    for _ in range(iters):
        sums = torch.zeros_like(cent)
        counts = torch.zeros(k, 1, dtype=cent.dtype, device=cent.device)
        half_sq = 0.5 * (cent * cent).sum(1)
        for s in range(0, len(x), step):
            xb = x[s:s + step]
            oh = torch.nn.functional.one_hot((xb @ cent.T - half_sq).argmax(1), k).to(x.dtype)
            sums += oh.T @ xb
            counts += oh.sum(0)[:, None]
        cent = torch.where(counts > 0, sums / counts.clamp(min=1), cent)
    return cent


def assign(x, centroids, *, device="cpu", metric: str = "ip") -> np.ndarray:
    """Nearest centroid (Euclidean; ties to the lower id) of every row, int64 [N], in blocks;
    metric "cosine" unit-normalises each row first (as the IVF lists' training rows were)."""
    x = _matrix(x)
    dev = torch.device(device)
    c = torch.as_tensor(np.asarray(centroids, np.float32), device=dev)
    half_sq = 0.5 * (c * c).sum(1)
    out = np.empty(len(x), np.int64)
    step = max(1, min(CHUNK, BLOCK_ENTRIES // max(len(c), 1)))
    for s in range(0, len(x), step):
        xb = torch.from_numpy(_chunk(x, s, min(len(x), s + step), metric)).to(dev)
        out[s:s + step] = (xb @ c.T - half_sq).argmax(1).cpu().numpy()
    return out
