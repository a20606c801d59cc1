"""How good the approximate k-NN graph is at scale: recall@k of the IVF graph (knn: backend faiss)
against the exact graph, and CRAIG's facility-location objective of picks made on each graph, both
objectives measured on the exact graph. Prints the figures and the seconds of each graph.

    python bench/knn_quality.py [--n 100000] [--d 64] [--k 32] [--budget 0.1] [--nprobe 32]

Data with known structure: `manifold_clusters` (Gaussian clusters, each spread along its own
low-dimensional subspace, plus isotropic noise), so that neighbours mean something; isotropic noise
in many dimensions has no near neighbours for any index to find. One class of N samples, as craig
sees a class past knn.exact_max_n (so the exact graph here costs O(N^2 D), minutes at 100k).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def manifold_clusters(n=20_000, d=64, clusters=40, latent=8, noise=0.05, seed=0):
    """Gaussian clusters, each spread along its own `latent`-d subspace of R^d, with small isotropic
    noise: (x float32 [n, d], cluster labels [n])."""
    rng = np.random.default_rng(seed)
    centres = 3 * rng.normal(size=(clusters, d))
    bases = rng.normal(size=(clusters, latent, d)) / np.sqrt(latent)
    labels = rng.integers(clusters, size=n)
    z = rng.normal(size=(n, latent))
    x = centres[labels] + np.einsum("nl,nld->nd", z, bases[labels]) + noise * rng.normal(size=(n, d))
    return x.astype(np.float32), labels


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--nprobe", type=int, default=32)
    a = ap.parse_args()

    from stages.kernels.coresets.facility import objective, similarity, stochastic_greedy
    from stages.kernels.coresets.features import plain

    x, _ = manifold_clusters(n=a.n, d=a.d, latent=16, noise=0.3)
    picks, sims, secs = {}, {}, {}
    for name, opts in (("exact", {"backend": "exact"}), ("ivf", {"backend": "faiss", "nprobe": a.nprobe})):
        t0 = time.perf_counter()
        sims[name] = similarity(plain(x), "euclidean", graph="sparse", knn=a.k, knn_options=opts)
        secs[name] = time.perf_counter() - t0
        picks[name] = stochastic_greedy(sims[name], int(a.budget * a.n), seed=0)
    e, f = sims["exact"], sims["ivf"]
    cols = np.repeat(np.arange(e.n), np.diff(e.indptr.numpy()))
    pairs_e = set(zip(e.rows.numpy().tolist(), cols.tolist()))
    cols = np.repeat(np.arange(f.n), np.diff(f.indptr.numpy()))
    found = sum(1 for p in zip(f.rows.numpy().tolist(), cols.tolist()) if p in pairs_e)
    others = a.n * (a.k - 1)  # each row's k neighbours are itself and k - 1 others
    recall = (found - a.n) / others
    ratio = objective(e, picks["ivf"]) / objective(e, picks["exact"])
    print(f"{a.n:,} x {a.d}, k {a.k}, nprobe {a.nprobe}: recall@{a.k - 1} {recall:.4f}; "
          f"craig {a.budget:g} objective on the exact graph, ivf picks / exact picks {ratio:.5f}; "
          f"graph seconds exact {secs['exact']:.1f}, ivf {secs['ivf']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
