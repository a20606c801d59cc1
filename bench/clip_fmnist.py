"""Image-caption curation on Fashion-MNIST pairs (issue 6): zero-shot accuracy of a CLIP trained
from scratch on random, clipcov, clipscore and sas subsets, and the share of clean pairs each kept.

Ingests `fmnist-pairs` (30% of the captions name a wrong class; --train-size for a class-
stratified subset) into data/ with a private catalog, runs configs/clip-fmnist.yaml through the
runner (cached), then prints the report table, the clean share per selection and, with
--oracle, the two oracle rows of the issue's calibration (random 30% of the clean pairs, all
clean pairs), trained with verify's recipe and seeds.

    python bench/clip_fmnist.py [--train-size N] [--cpu] [--oracle] [--set k=v ...]
--cpu: a model and recipe sized for 2 CPU cores (ViT 2 x 96 patch 7, text 2 x 64, embed 64,
8 epochs, batch 256, lr 2e-3).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CPU = {"embed_dim": 64, "vision_layers": 2, "vision_width": 96, "patch": 7, "text_layers": 2, "text_width": 64,
       "context": 12, "epochs": 8, "batch_size": 256, "lr": 2e-3}
NOISE, SEED = 0.3, 0
CALIBRATION = ("H100 plain script, full recipe, 60k pairs: all noisy pairs 86.25, random 30% 81.95, top 30% by CLIP "
               "score 86.19, random 30% of clean pairs 86.59, all clean pairs 89.23")


def pairs_catalog(train_size: int | None, src: str):
    """A catalog holding fmnist-pairs[-N] under data/, ingested once."""
    from pipeline.catalog import Catalog
    from pipeline.errors import CurateError
    from pipeline.ingest import ingest

    name = "fmnist-pairs" if train_size is None else f"fmnist-pairs-{train_size}"
    path = ROOT / "data" / "bench_catalog.yaml"
    try:
        cat = Catalog.load(str(path))
        cat.shards(name, "train")
        return name, cat
    except CurateError:
        ingest("fmnist-pairs", ROOT / "data" / name, name, src=src, catalog=str(path), noise=NOISE, seed=SEED,
               train_size=train_size)
        return name, Catalog.load(str(path))


def clean_rows(run_dir: Path) -> np.ndarray:
    """Whether each index row's caption names its true class (recomputed by the generator)."""
    from pipeline.ingest import FMNIST_CLASSES, pair_captions
    from pipeline.manifest import read_parquet

    index = read_parquet(run_dir / "index" / "index.parquet", ["label", "caption"])
    labels = index.column("label").to_numpy()
    caps, cls = pair_captions(labels, FMNIST_CLASSES, NOISE, SEED)
    if caps != index.column("caption").to_pylist():
        raise SystemExit("the index's captions are not the generator's: ingested with another noise or seed?")
    return cls == labels


def oracle_rows(runner, clean: np.ndarray) -> list[str]:
    """random 30% of the clean pairs and all clean pairs, trained like every verify set."""
    from stages.verify import load_test_split
    from stages.verify.clip import ClipTrainer

    cfg = runner.cfg
    ctx = runner.context("verify/full", out=runner.run_dir / "verify" / "full", fp="bench")
    pool, images = ctx.index_arrays(cfg.verify.image_size)
    labels = pool.labels
    train = ClipTrainer(ctx, images, labels, load_test_split(ctx, cfg.verify.image_size))
    ok = np.flatnonzero(clean)
    out = []
    for name, draw in (("oracle: random 30% of clean pairs", lambda s: np.sort(
            np.random.default_rng(1000 + s).choice(ok, int(round(0.3 * len(clean))), replace=False))),
                       ("oracle: all clean pairs", lambda s: ok)):
        accs, probes = [], []
        for s in range(cfg.verify.seeds):
            rows = draw(s)
            fit = train(None, images[rows], labels[rows], rows, cfg.seed + s)
            accs.append(fit["acc"])
            probes.append(fit["probe"])
        out.append(f"| {name} | {len(draw(0))} | {100 * np.mean(accs):.2f} ± {100 * np.std(accs):.2f} | "
                   f"{100 * np.mean(probes):.2f} | 1.000 |")
    return out


def main() -> None:
    from pipeline.config import load_config
    from pipeline.runner import Runner

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "clip-fmnist.yaml"))
    p.add_argument("--set", action="append", default=[], dest="overrides")
    p.add_argument("--src", default=os.environ.get("CURATE_FMNIST", str(ROOT.parent / "shared/datasets/fashion-mnist")))
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--cpu", action="store_true", help="the CPU-sized model and recipe (see the docstring)")
    p.add_argument("--oracle", action="store_true", help="also train the two oracle subsets")
    a = p.parse_args()
    os.chdir(ROOT)
    name, catalog = pairs_catalog(a.train_size, a.src)
    sets = [f"dataset={name}"]
    if a.train_size:
        sets.append(f"run=runs/clip-fmnist-{a.train_size}{'-cpu' if a.cpu else ''}")
    if a.cpu:
        sets += [f"{sec}.clip.{k}={v}" for sec in ("embed", "verify") for k, v in CPU.items()]
    runner = Runner(load_config(a.config, sets + a.overrides), catalog)
    runner.write_run_json()
    for unit in runner.units():
        t0 = time.perf_counter()
        res = runner.run(unit)
        print(f"{unit}: {res['status']} ({time.perf_counter() - t0:.1f} s)", flush=True)
    report = json.loads((runner.run_dir / "report" / "report.json").read_text())
    clean = clean_rows(runner.run_dir)
    print("\n" + (runner.run_dir / "report" / "report.md").read_text())
    print(f"clean pairs in the pool: {clean.mean():.3f} of {len(clean)}")
    print("| set | pairs | zero-shot acc (%) | linear probe (%) | clean share kept |\n|---|---|---|---|---|")
    from pipeline.manifest import read_parquet

    for r in report["rows"]:
        share = "-"
        if r["kind"] == "selection":
            t = read_parquet(runner.run_dir / "select" / r["name"] / "selection.parquet", ["row", "selected"])
            rows = t.column("row").to_numpy()[t.column("selected").to_numpy(zero_copy_only=False)]
            share = f"{clean[rows].mean():.3f}"
        elif r["kind"] == "full":
            share = f"{clean.mean():.3f}"
        probe = f"{100 * r['probe_mean']:.2f}" if r.get("probe_mean") is not None else "n/a"
        print(f"| {r['name']} | {r['samples']} | {100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f} | {probe} | {share} |")
    if a.oracle:
        print("\n".join(oracle_rows(runner, clean)))
    sel = {r["name"]: r for r in report["rows"]}
    for b in (0.1, 0.3):
        cc, cs, rnd = sel.get(f"clipcov-{b}"), sel.get(f"clipscore-{b}"), next(
            (r for r in report["rows"] if r["kind"] == "random" and abs(r["fraction"] - b) < 1e-6), None)
        if cc and cs and rnd:
            print(f"budget {b}: clipcov {100 * cc['acc_mean']:.2f} vs random {100 * rnd['acc_mean']:.2f} and clipscore "
                  f"{100 * cs['acc_mean']:.2f} -> {'beats both' if cc['acc_mean'] > max(rnd['acc_mean'], cs['acc_mean']) else 'does not beat both'}")
    print(f"calibration ({CALIBRATION})")


if __name__ == "__main__":
    main()
