"""CRAIG (per-class facility location) vs apricot's FacilityLocationSelection, in one run.

Generated clustered data (n samples, d dims, 10 classes), a 10% budget split across
classes in proportion to size. apricot gets each class's similarity matrix precomputed
(the same matrix ours uses, so the objectives are comparable) and is timed on `fit`
alone, after a warm-up that compiles its numba kernels; ours is timed end to end
(similarity, greedy, weights). Objectives are F(S) = sum_i max_{j in S} s_ij summed over
classes, under the dense similarity.

    python bench/craig_vs_apricot.py [--n 20000] [--d 64] [--budget 0.1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.kernels.coresets.facility import craig, similarity  # noqa: E402
from stages.kernels.coresets.features import plain  # noqa: E402
from pipeline.sampling import proportional_allocation  # noqa: E402


def data(n: int, d: int, classes: int = 10, blobs: int = 200, seed: int = 0):
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(blobs, d)) * 2
    blob = rng.integers(0, blobs, n)
    return (mu[blob] + rng.normal(size=(n, d))).astype(np.float32), blob % classes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--budget", type=float, default=0.1)
    a = p.parse_args()
    import torch
    from apricot import FacilityLocationSelection

    torch.set_num_threads(max(1, torch.get_num_threads()))
    x, y = data(a.n, a.d)
    alloc = proportional_allocation(np.bincount(y), int(round(a.budget * a.n)))
    feats = plain(x)
    members = [np.flatnonzero(y == c) for c in range(len(alloc))]
    sims = [similarity(feats.take(m), "euclidean").s.double().numpy() for m in members]
    FacilityLocationSelection(5, metric="precomputed", optimizer="lazy").fit(sims[0][:50, :50])  # numba warm-up

    t0 = time.perf_counter()
    ref = [FacilityLocationSelection(int(k), metric="precomputed", optimizer="lazy").fit(s).ranking
           for k, s in zip(alloc, sims)]
    t_ref = time.perf_counter() - t0

    def obj(picks_per_class):
        return sum(s[:, p].max(1).sum() for s, p in zip(sims, picks_per_class))

    ref_obj = obj(ref)
    print(f"n={a.n} d={a.d} classes={len(alloc)} budget={a.budget} ({alloc.sum()} picks), torch threads {torch.get_num_threads()}")
    print("| optimiser | graph | seconds | objective / apricot | apricot seconds / ours |")
    print("|---|---|---|---|---|")
    print(f"| apricot lazy (fit only, precomputed) | dense | {t_ref:.2f} | 1.0000 | 1.0x |")
    for optimizer, graph in (("lazy", "dense"), ("stochastic", "dense"), ("stochastic", "sparse")):
        t0 = time.perf_counter()
        rows, w, _ = craig(feats, y, alloc, optimizer=optimizer, graph=graph, knn=32, eps=0.01, seed=0)
        t = time.perf_counter() - t0
        picks = [np.searchsorted(m, rows[np.isin(rows, m)]) for m in members]
        print(f"| ours {optimizer} (end to end) | {graph} | {t:.2f} | {obj(picks) / ref_obj:.4f} | {t_ref / t:.1f}x |")


if __name__ == "__main__":
    main()
