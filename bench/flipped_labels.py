"""Flipped-label detection on Fashion-MNIST, through the real pipeline (ingest shards ->
index -> embed -> score), plus kNN-Shapley timing at 60k x 10k.

Flips 10% of the training labels (seeded) before writing the shards, then reports
each score's AUROC for finding the flipped samples, and the share of flipped samples
that land in the lowest-valued 10% by knn_shapley.

    python bench/flipped_labels.py [--src DIR] [--epochs 4] [--knn-size 60000x10000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.catalog import Catalog, DatasetEntry, Fields  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.ingest import RawSample, read_idx_arrays, write_split  # noqa: E402
from pipeline.manifest import read_parquet  # noqa: E402
from pipeline.runner import Runner  # noqa: E402
from pipeline.shards import shard_pattern  # noqa: E402
from stages.kernels.scores.dynamics import auroc  # noqa: E402
from stages.kernels.scores.knn_shapley import knn_shapley  # noqa: E402

METHODS = ["el2n", "grand", "forgetting", "loss", "margin", "knn_shapley", "prototype", "influence"]


def flipped_fashion(src: str, out: Path, fraction: float = 0.1, seed: int = 0) -> tuple[Path, set[str]]:
    """Write Fashion-MNIST shards with `fraction` of train labels changed; returns catalog, flipped keys."""
    rng = np.random.default_rng(seed)
    splits, flipped = {}, set()
    for split, name in (("train", "train"), ("test", "t10k")):
        x, y = read_idx_arrays(src, name)
        y = y.astype(np.int64).copy()
        if split == "train":
            idx = rng.choice(len(y), int(fraction * len(y)), replace=False)
            y[idx] = (y[idx] + rng.integers(1, 10, len(idx))) % 10
            flipped = {f"train_{i:07d}" for i in idx}
        sizes = write_split((RawSample(label=int(b), image=a) for a, b in zip(x, y)), out / "shards", split, 10000)
        splits[split] = f"shards/{shard_pattern(split, len(sizes))}"
    cat = Catalog.load(out / "data_catalog.yaml", missing_ok=True)
    cat.set_entry("fmnist-noisy", DatasetEntry(splits=splits, num_classes=10, fields=Fields(image=["png"])))
    return cat.path, flipped


def run_flipped(src: str, work: Path, epochs: int = 4, seeds: int = 1) -> dict:
    cat_path, flipped = flipped_fashion(src, work)
    cfg = load_config({"run": str(work / "run"), "dataset": "fmnist-noisy", "seed": 0,
                       "embed": {"epochs": epochs, "seeds": seeds},
                       "score": {"methods": METHODS, "el2n_epoch": 2}})
    runner = Runner(cfg, Catalog.load(cat_path))
    runner.write_run_json()
    secs = {}
    for unit in ("index", "embed", "score"):
        t0 = time.perf_counter()
        runner.run(unit)
        secs[unit] = time.perf_counter() - t0
    t = read_parquet(runner.run_dir / "score" / "scores.parquet")
    keys = [u.split("/", 1)[1] for u in t.column("uid").to_pylist()]
    is_flipped = np.array([k in flipped for k in keys])
    res = {"n_pool": len(keys), "n_flipped_in_pool": int(is_flipped.sum()), "seconds": secs, "auroc": {}}
    for m in METHODS:
        s = np.asarray(t.column(f"score_{m}"))
        res["auroc"][m] = auroc(-s if m in ("knn_shapley", "influence") else s, is_flipped)
    v = np.asarray(t.column("score_knn_shapley"))
    lowest = np.argsort(v, kind="stable")[: int(0.1 * len(v))]
    res["knn_recall_lowest10"] = float(is_flipped[lowest].sum() / is_flipped.sum())
    return res


def time_knn(n: int, m: int, d: int = 128, k: int = 10) -> float:
    rng = np.random.default_rng(0)
    tx, qx = rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(m, d)).astype(np.float32)
    ty, qy = rng.integers(0, 10, n), rng.integers(0, 10, m)
    t0 = time.perf_counter()
    knn_shapley(tx, ty, qx, qy, k=k)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", default=os.environ.get("CURATE_FMNIST", str(ROOT.parent / "shared/datasets/fashion-mnist")))
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--knn-size", default="60000x10000")
    a = p.parse_args()
    import torch

    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, cuda={torch.cuda.is_available()}")
    with tempfile.TemporaryDirectory() as tmp:
        r = run_flipped(a.src, Path(tmp), a.epochs, a.seeds)
    print(f"Fashion-MNIST, 10% of train labels flipped; pool {r['n_pool']} (10% held out for validation), "
          f"{r['n_flipped_in_pool']} flipped in pool; proxy {a.epochs} epochs x {a.seeds} seed(s)")
    print("| score | AUROC (flipped vs clean) |\n|---|---|")
    for m, v in r["auroc"].items():
        print(f"| {m}{' (low value = flipped)' if m in ('knn_shapley', 'influence') else ''} | {v:.3f} |")
    print(f"knn_shapley: {100 * r['knn_recall_lowest10']:.1f}% of flipped samples in the lowest-valued 10%")
    print("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items()))
    n, m = (int(s) for s in a.knn_size.split("x"))
    print(f"knn_shapley {n} train x {m} test x 128-d, K=10: {time_knn(n, m):.1f} s")


if __name__ == "__main__":
    main()
