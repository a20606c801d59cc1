"""k-means: faiss when it is installed (and the data is on the CPU), else Lloyd's algorithm in
torch on CPU or GPU. Used by prototype scores, dedup and clipcov.

At scale the run's `knn:` section decides (`sampled_centroids`): where its rule picks faiss
(N > exact_max_n on the CPU), stages.kernels.knn.kmeans fits on a seeded sample of at most
max_points_per_centroid rows per centroid; else these full-data k-means run as before, so small
runs keep their exact results."""

from __future__ import annotations

import numpy as np
import torch


def faiss_kmeans(x: np.ndarray, k: int, *, iters: int = 20, seed: int = 0) -> np.ndarray | None:
    """Centroids [k, D] from faiss, or None where faiss is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    km = faiss.Kmeans(x.shape[1], min(k, len(x)), niter=iters, seed=seed, verbose=False)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km.centroids


def kmeans(x: np.ndarray, k: int, *, iters: int = 20, seed: int = 0, device="cpu") -> np.ndarray:
    """Centroids [k, D] by Lloyd's algorithm from a k-means++ start; deterministic for a seed."""
    xt = torch.as_tensor(x, dtype=torch.float32, device=device)
    n = len(xt)
    k = min(k, n)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    first = int(torch.randint(n, (1,), generator=gen))
    cent = [xt[first]]
    d2 = ((xt - cent[0]) ** 2).sum(1)
    for _ in range(1, k):
        probs = (d2 / d2.sum()).cpu() if d2.sum() > 0 else torch.full((n,), 1.0 / n)
        nxt = int(torch.multinomial(probs, 1, generator=gen))
        cent.append(xt[nxt])
        d2 = torch.minimum(d2, ((xt - xt[nxt]) ** 2).sum(1))
    c = torch.stack(cent)
    for _ in range(iters):
        assign = torch.cdist(xt, c).argmin(1)
        sums, counts = _cluster_sums(xt, assign, k)
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)  # empty clusters keep their centre
    return c.cpu().numpy()


def _cluster_sums(x: torch.Tensor, assign: torch.Tensor, k: int, block: int = 65536):
    """Per-cluster sums and counts via one-hot matmuls: deterministic on CPU and CUDA alike."""
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)
    counts = torch.zeros(k, 1, dtype=x.dtype, device=x.device)
    for s in range(0, len(x), block):
        oh = torch.nn.functional.one_hot(assign[s:s + block], k).to(x.dtype)
        sums += oh.T @ x[s:s + block]
        counts += oh.sum(0, keepdim=True).T
    return sums, counts


def sampled_centroids(x, k: int, knn: dict | None, *, iters: int = 20, seed: int = 0,
                      device="cpu") -> np.ndarray | None:
    """Centroids [min(k, N), D] from stages.kernels.knn.kmeans (faiss, on a sample) where the `knn:`
    options' rule picks faiss for these N rows; None where it picks exact (the caller's full-data
    k-means then runs, unchanged) or where knn is None."""
    from stages.kernels.knn import EXACT_MAX_N, choose_backend
    from stages.kernels.knn import kmeans as knn_kmeans

    if knn is None or choose_backend(len(x), knn.get("backend", "auto"), device,
                                     knn.get("exact_max_n", EXACT_MAX_N)) != "faiss":
        return None
    cent, _ = knn_kmeans(x, k, backend="faiss", iters=iters, seed=seed,
                         max_points_per_centroid=knn.get("max_points_per_centroid", 256), with_assignment=False)
    return cent
