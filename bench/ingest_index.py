"""Benchmark: ingest + index throughput on Fashion-MNIST (prints figures; no asserts).

    python bench/ingest_index.py [--src DIR]

Reads the four IDX files from --src (default: $CURATE_FMNIST, else
../shared/datasets/fashion-mnist beside the repository), and in a temporary directory:
1. ingest: `pipeline.ingest.ingest("idx", ...)` writes train (60,000) and test (10,000)
   PNG shards and a catalog file;
2. index: `Runner.run("index")` checks every training sample and writes index.parquet
   (the timing includes hashing the train shards for the stage fingerprint).
Prints samples, seconds and samples/s per step and for both together, plus machine info.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_SRC = Path(__file__).resolve().parents[2] / "shared/datasets/fashion-mnist"


def machine_info() -> dict[str, str]:
    import numpy
    import pyarrow
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {"nproc": str(usable), "cpu_count": str(os.cpu_count()), "platform": platform.platform(),
            "machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "pyarrow": pyarrow.__version__}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=os.environ.get("CURATE_FMNIST") or str(DEFAULT_SRC),
                    help="folder with the Fashion-MNIST *-idx?-ubyte.gz files "
                         "(default: $CURATE_FMNIST, else ../shared/datasets/fashion-mnist)")
    args = ap.parse_args(argv)
    src = Path(args.src)
    if not src.is_dir():
        print(f"error: --src {src}: no such folder (pass --src or set CURATE_FMNIST)", file=sys.stderr)
        return 1

    info = machine_info()  # imports torch etc. before anything is timed

    from pipeline.catalog import Catalog
    from pipeline.config import load_config
    from pipeline.errors import CurateError
    from pipeline.ingest import ingest
    from pipeline.runner import Runner

    with tempfile.TemporaryDirectory(prefix="curate-bench-") as tmp:
        tmp = Path(tmp)
        catalog = tmp / "data_catalog.yaml"
        try:
            t0 = time.perf_counter()
            ingest("idx", tmp / "data" / "fashion-mnist", "fashion-mnist", str(src), catalog=str(catalog))
            ingest_s = time.perf_counter() - t0

            cat = Catalog.load(catalog)
            n_ingest = sum(_count(cat, s) for s in ("train", "test"))
            cfg = load_config({"run": str(tmp / "runs" / "b"), "dataset": "fashion-mnist"})
            runner = Runner(cfg, cat)
            runner.write_run_json()
            t0 = time.perf_counter()
            res = runner.run("index")
            index_s = time.perf_counter() - t0
        except CurateError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        n_index = runner.record("index")["metrics"]["samples"]
        shard_bytes = sum(p.stat().st_size for p in (tmp / "data" / "fashion-mnist").glob("*.tar"))

    rows = [
        ("ingest (train+test)", n_ingest, ingest_s),
        ("index (train)", n_index, index_s),
        ("combined", n_ingest, ingest_s + index_s),
    ]
    print(f"Fashion-MNIST ingest + index  (src {src})")
    print(f"{'step':<22}{'samples':>10}{'seconds':>10}{'samples/s':>12}")
    for name, n, s in rows:
        print(f"{name:<22}{n:>10,}{s:>10.2f}{n / s:>12,.0f}")
    print(f"combined = ingest of {n_ingest:,} samples then index of {n_index:,}; "
          f"samples/s over the {n_ingest:,} ingested")
    print(f"shards written: {shard_bytes / 2**20:.1f} MiB; index status: {res['status']}")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    return 0


def _count(cat, split: str) -> int:
    """Samples in a split, from the sizes.json beside its shards."""
    import json

    total = 0
    for shard in cat.shards("fashion-mnist", split):
        sizes = json.loads((Path(shard).parent / "sizes.json").read_text())
        total += sizes[Path(shard).name]
    return total


if __name__ == "__main__":
    sys.exit(main())
