"""Image-caption selection at scale: k-means pseudo-classes, ClipCov, SAS and the CLIP-score
filter on n generated pairs of d-dim unit embeddings (clustered images, captions a near-
identity linear map of their image plus noise). Prints the wall time of each, on CUDA the peak
GPU memory, and the cross-covariance error of each subset against the full data, next to a
random subset of the same per-group sizes.

Imports only numpy and torch (plus this repo's kernels; faiss if installed), so it runs on the
GPU machine without prefect, pydantic or polars:

    python bench/clipcov_scale.py --n 1000000 --d 512                 # the H100 figure
    python bench/clipcov_scale.py --n 20000 --device cpu              # a CPU smoke run (< 1 min)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.kernels.coresets.clipcov import (clipcov, clipscore, clipscore_filter, cross_cov_error,  # noqa: E402
                                     kmeans_groups, sas)
from bench._timing import timed  # noqa: E402
from pipeline.sampling import proportional_allocation  # noqa: E402


def generated(n: int, d: int, clusters: int, device, seed: int = 0, chunk: int = 1 << 17):
    """Unit image/caption pairs as float16 host arrays, made on the device in chunks: images around
    `clusters` random directions, captions = normalise(M image + noise), M = I + small noise."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    mu = torch.nn.functional.normalize(torch.randn(clusters, d, generator=g), dim=1)
    mix = (torch.eye(d) + 0.3 * torch.randn(d, d, generator=g) / d ** 0.5).to(device)
    blob = torch.randint(0, clusters, (n,), generator=g)
    img = np.empty((n, d), np.float16)
    txt = np.empty((n, d), np.float16)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        z = (mu[blob[s:e]] + 0.8 * torch.randn(e - s, d, generator=g) / d ** 0.5).to(device)
        noise = (0.4 * torch.randn(e - s, d, generator=g) / d ** 0.5).to(device)
        img[s:e] = torch.nn.functional.normalize(z, dim=1).half().cpu().numpy()
        txt[s:e] = torch.nn.functional.normalize(z @ mix.T + noise, dim=1).half().cpu().numpy()
    return img, txt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--groups", type=int, default=1000, help="k-means pseudo-classes (and generated clusters)")
    p.add_argument("--budget", type=float, default=0.3)
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-sas", action="store_true")
    p.add_argument("--pool-factor", type=float, default=1.5, help="clipcov's quality pool (the select default); 0: off")
    a = p.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    (img, txt), t_gen, _ = timed(lambda: generated(a.n, a.d, a.groups, device), device)
    print(f"{a.n} pairs x {a.d} dims (float16, {2 * img.nbytes / 2**30:.2f} GiB), {a.groups} pseudo-classes, "
          f"budget {a.budget}, device {name}, torch {torch.__version__}; generated in {t_gen:.1f} s")
    print("| step | wall s | peak GPU GiB | cross-cov error | notes |\n|---|---|---|---|---|")
    ids, t, peak = timed(lambda: kmeans_groups(img, a.groups, seed=0, device=device), device)
    sizes = np.bincount(ids, minlength=a.groups)
    print(f"| kmeans_groups | {t:.1f} | {peak:.2f} | | group sizes {sizes.min()}..{sizes.max()}, "
          f"{int((sizes == 0).sum())} empty |", flush=True)
    alloc = proportional_allocation(sizes, int(round(a.budget * a.n)))
    k = int(alloc.sum())

    (rows, _, info), t, peak = timed(lambda: clipcov(img, txt, ids, alloc, device=device,
                                                            pool_factor=a.pool_factor or None), device)
    err = cross_cov_error(img, txt, rows)
    print(f"| clipcov | {t:.1f} | {peak:.2f} | {err:.4f} | {len(rows)} picks, "
          f"{sum(info['misaligned'].values())} pairs flagged misaligned |", flush=True)
    if not a.skip_sas:
        (rows_s, _, _), t, peak = timed(lambda: sas(img, ids, alloc, device=device, optimizer="stochastic"), device)
        print(f"| sas (stochastic greedy, image embeddings as feats) | {t:.1f} | {peak:.2f} | "
              f"{cross_cov_error(img, txt, rows_s):.4f} | {len(rows_s)} picks |", flush=True)
    rows_c, t, _ = timed(lambda: clipscore_filter(clipscore(img, txt), k=k), torch.device("cpu"))
    print(f"| clip-score filter (top {k}) | {t:.1f} | | {cross_cov_error(img, txt, rows_c):.4f} | host numpy |")
    rng = np.random.default_rng(0)
    errs = []
    for _ in range(3):
        rnd = np.concatenate([rng.choice(np.flatnonzero(ids == c), alloc[c], replace=False)
                              for c in np.flatnonzero(alloc)])
        errs.append(cross_cov_error(img, txt, rnd))
    print(f"| random (same per-group sizes, 3 seeds) | | | {np.mean(errs):.4f} | +- {np.std(errs):.4f} |")
    print(f"clipcov / random cross-covariance error: {err / np.mean(errs):.2f}")


if __name__ == "__main__":
    main()
