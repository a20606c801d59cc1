"""Self-supervised prototype difficulty (Sorscher et al. 2022): distance to the nearest
k-means centroid of L2-normalised embeddings. k-means runs in faiss when it is installed
(and the data is on the CPU), else in torch on CPU or GPU.
"""

from __future__ import annotations

import numpy as np
import torch

from stages.kernels.cluster import faiss_kmeans, kmeans, sampled_centroids


def prototype_distance(emb: np.ndarray, k: int, *, labels: np.ndarray | None = None, seed: int = 0,
                       device="cpu", knn: dict | None = None) -> np.ndarray:
    """Distance of each normalised embedding to its nearest centroid (per class if labels given).
    knn: the run's `knn:` section; a group past its exact_max_n fits k-means on a sample."""
    x = (emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    groups = [np.arange(len(x))] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    out = np.zeros(len(x), np.float32)
    use_faiss = torch.device(device).type == "cpu"
    for rows in groups:
        c = sampled_centroids(x[rows], k, knn, seed=seed, device=device)
        if c is None and use_faiss:
            c = faiss_kmeans(x[rows], k, seed=seed)
        if c is None:
            c = kmeans(x[rows], k, seed=seed, device=device)
        out[rows] = torch.cdist(torch.as_tensor(x[rows]), torch.as_tensor(c)).min(1).values.numpy()
    return out
