"""Fashion-MNIST for the benchmarks: the repo catalog's shards, or a private ingest under data/."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from pipeline.catalog import Catalog
from pipeline.errors import CurateError

ROOT = Path(__file__).resolve().parents[1]


def fashion_mnist_catalog(name: str, src: str) -> Catalog:
    """The repo's catalog where its entry's shards exist (`make fashion-mnist`); else shards
    ingested into data/ with a catalog of their own there, leaving the tracked one alone.
    `name` digits ingests scikit-learn's digits instead of the idx files under `src`."""
    catalog = Catalog.load(str(ROOT / "data_catalog.yaml"))
    try:
        catalog.shards(name, "train")
        catalog.shards(name, "test")
        return catalog
    except CurateError:
        private = ROOT / "data" / "bench_catalog.yaml"
        if private.exists():
            try:
                cat = Catalog.load(str(private))
                cat.shards(name, "train")
                cat.shards(name, "test")
                return cat
            except CurateError:
                pass
        from pipeline.ingest import ingest

        if name == "digits":  # scikit-learn's bundled copy (the CPU-sized configs)
            ingest("digits", ROOT / "data" / "digits", name, catalog=str(private))
        else:
            ingest("idx", ROOT / "data" / "fashion-mnist", name, src=src, catalog=str(private))
        return Catalog.load(str(private))


def bench_runner(description: str, default_config: str, add_args=None):
    """Parse --config / --set / --src (plus `add_args(parser)`'s own); returns (args, runner)."""
    from pipeline.config import load_config
    from pipeline.runner import Runner

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=str(ROOT / "configs" / default_config))
    p.add_argument("--set", action="append", default=[], dest="overrides")
    p.add_argument("--src", default=os.environ.get("CURATE_FMNIST", str(ROOT.parent / "shared/datasets/fashion-mnist")))
    if add_args is not None:
        add_args(p)
    a = p.parse_args()
    os.chdir(ROOT)
    cfg = load_config(a.config, a.overrides)
    runner = Runner(cfg, fashion_mnist_catalog(cfg.dataset, a.src))
    runner.write_run_json()
    return a, runner


def run_bench(description: str, default_config: str):
    """bench_runner, then every unit of the config (cached); returns the runner."""
    _, runner = bench_runner(description, default_config)
    for unit in runner.units():
        t0 = time.perf_counter()
        res = runner.run(unit)
        print(f"{unit}: {res['status']} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return runner
