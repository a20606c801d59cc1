"""Coresets at scale: craig (stochastic greedy on the sparse k-NN graph) and gradmatch on
n generated samples x d dims, 10 classes, a 10% budget. Prints wall time, and on CUDA the
peak GPU memory, for each.

Imports only numpy and torch (plus this repo's kernels), so it runs on the GPU machine
without prefect, pydantic or polars:

    python bench/coreset_scale.py --n 1000000 --d 512            # the H100 figure
    python bench/coreset_scale.py --n 100000 --d 128 --device cpu  # a CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.kernels.coresets.facility import craig  # noqa: E402
from stages.kernels.coresets.features import Plain  # noqa: E402
from stages.kernels.coresets.gradmatch import gradmatch_per_class, matching_error  # noqa: E402
from bench._timing import timed  # noqa: E402
from pipeline.sampling import proportional_allocation  # noqa: E402


def generated(n: int, d: int, classes: int, device, seed: int = 0):
    """Clustered vectors (100 blobs per class), made on the device in chunks; labels on the host."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    blobs = 100 * classes
    mu = torch.randn(blobs, d, generator=g) * 2
    blob = torch.randint(0, blobs, (n,), generator=g)
    x = torch.empty(n, d, device=device)
    for s in range(0, n, 1 << 18):
        e = min(n, s + (1 << 18))
        x[s:e] = (mu[blob[s:e]] + torch.randn(e - s, d, generator=g)).to(device)
    return x, (blob % classes).numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--knn", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-gradmatch", action="store_true")
    a = p.parse_args()
    device = torch.device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    x, y = generated(a.n, a.d, a.classes, device)
    alloc = proportional_allocation(np.bincount(y), int(round(a.budget * a.n)))
    print(f"{a.n} x {a.d}, {a.classes} classes, budget {a.budget} ({alloc.sum()} picks), device {name}, torch {torch.__version__}")
    data_gib = x.numel() * 4 / 2**30
    print(f"features: {data_gib:.2f} GiB float32")
    print("| method | wall s | peak GPU GiB | notes |\n|---|---|---|---|")
    (rows, w, info), t, peak = timed(lambda: craig(Plain(x), y, alloc, optimizer="stochastic", eps=0.01,
                                                   graph="sparse", knn=a.knn, seed=0), device)
    print(f"| craig (stochastic greedy, sparse {a.knn}-NN graph) | {t:.1f} | {peak:.2f} | "
          f"{len(rows)} picks, weights sum {w.sum():.0f} |", flush=True)
    if not a.skip_gradmatch:
        grads = x.cpu().numpy()
        (rows_g, w_g, info_g), t, peak = timed(lambda: gradmatch_per_class(grads, y, alloc,
                                                                            seed=0, device=device), device)
        err = matching_error(grads, rows_g, w_g)
        rnd = np.random.default_rng(0).choice(a.n, len(rows_g), replace=False)
        print(f"| gradmatch (per class) | {t:.1f} | {peak:.2f} | OMP picked {info_g['omp_selected']}, "
              f"topped up {info_g['topped_up']}; matching error {err:.2e} vs random {matching_error(grads, rnd, np.ones(len(rnd))):.2e} |")


if __name__ == "__main__":
    main()
