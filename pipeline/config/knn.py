"""knn: how every neighbour search and k-means of the run is done (one place for all of them).

The kernels are stages.kernels.knn (`knn_graph`, `kmeans`); its `graph_kwargs` / `kmeans_kwargs`
turn this section's dump into their keyword arguments. The auto rule: exact torch blocks on a
GPU or for N <= exact_max_n, else faiss on the CPU.

Consumers (given this dump as a plain dict by stages/select.py and stages/score.py, whose units hold
it in their fingerprint only where they use it): craig's sparse graph (N = the class), SemDeDup's
(dedup, features: embeddings) and clipcov's / sas's k-means groups, prototype scores (N = the group)
and knn_shapley (N = the training pool). Where the rule says exact, each runs as it did before this
section existed (the same bytes); where it says faiss, k-means fits on a sample and knn_shapley
ranks only each validation sample's `k` nearest training samples (at least knn_k and 128). knn_shapley
under auto stays exact while N x N_validation <= 10**9 (its cost is a sort per validation sample,
not an N x N graph, and the truncated values find fewer flipped labels).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Section


class KnnConfig(Section):
    backend: Literal["auto", "exact", "faiss"] = "auto"
    exact_max_n: int = Field(50_000, ge=1)  # auto: exact up to this many rows (and always on a GPU)
    k: int = Field(32, ge=1)  # neighbours per row in a k-NN graph where the method sets none; knn_shapley's depth (faiss)
    index: Literal["ivf", "hnsw"] = "ivf"  # ivf: lists from faiss k-means, searched in dense blocks; or faiss HNSW-Flat
    nlist: int | None = Field(None, ge=1)  # ivf lists; None: round(4 sqrt(N))
    nprobe: int = Field(32, ge=1)  # ivf: at most this many lists compared with each group of queries
    max_codes: int | None = Field(None, ge=1)  # ivf: nor past this many candidate rows; None: nprobe x mean list
    train_per_list: int = Field(32, ge=1)  # ivf: trained on a seeded sample of this many rows per list
    hnsw_m: int = Field(32, ge=2)  # hnsw links per node
    ef_search: int = Field(128, ge=1)  # hnsw candidates kept while searching (raised to k + 1 if lower)
    ef_construction: int = Field(80, ge=1)  # hnsw candidates kept while building
    max_points_per_centroid: int = Field(256, ge=1)  # k-means fits on a seeded sample of this many rows per centroid
