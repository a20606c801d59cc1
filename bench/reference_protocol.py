"""Does verify's protocol reproduce issue 4's reference figures? Trains chosen training sets of
Fashion-MNIST exactly as verify does (configs/fmnist-verify.yaml's recipe, seeds and code
path: stages.verify.train_once) and prints them next to the reference plain script's.

Full data on convnet3 takes about 45 minutes a seed on 2 CPU cores, so on a CPU pick the
cheap rows; on a GPU run them all:

    python bench/reference_protocol.py --sets random-0.1 difficulty-0.1 [--seeds 3] [--set k=v ...]
    (sets: full, random-0.1, random-0.3, difficulty-0.1, difficulty-0.3 = top EL2N)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.energy import EnergyMeter  # noqa: E402
from pipeline.manifest import read_parquet  # noqa: E402
from pipeline.arrays import num_classes_of  # noqa: E402
from pipeline.sampling import random_subset  # noqa: E402
from stages.verify import TrainingSet, load_test_split, train_once  # noqa: E402

from bench._fmnist import bench_runner  # noqa: E402

# the H100 plain script: convnet3, SGD lr 0.01 m 0.9 wd 5e-4, batch 256, 20 epochs, lr x0.1 at 10, bf16
REFERENCE = {"full": "93.44 (20.2 s)", "random-0.1": "88.40 +- 0.17 (1.9 s)", "random-0.3": "91.08 +- 0.15 (5.7 s)",
             "difficulty-0.3": "92.72 +- 0.25", "difficulty-0.1": "34.1"}


def main() -> None:
    def add_args(p):
        p.add_argument("--sets", nargs="+", default=["random-0.1", "difficulty-0.1"], choices=sorted(REFERENCE))
        p.add_argument("--seeds", type=int, default=None, help="default: the config's verify.seeds")

    a, runner = bench_runner(__doc__.splitlines()[0], "fmnist-verify.yaml", add_args)
    cfg = runner.cfg
    for unit in ["index"] + [u for u in ("embed", "score") if any(s.startswith("difficulty") for s in a.sets)] + \
            [f"select/{s}" for s in a.sets if s.startswith("difficulty")]:
        print(f"{unit}: {runner.run(unit)['status']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = runner.context("verify/full", out=Path(tmp), fp="bench")
        c = ctx.config
        pool, images = ctx.index_arrays(c["image_size"])
        labels = pool.labels
        test = load_test_split(ctx, c["image_size"])
        n_classes = num_classes_of(runner.catalog.entry(cfg.dataset), labels)
        meter = EnergyMeter(ctx.device)
        print(f"\nverify protocol: {c['recipe']}, {c['epochs']} epochs, batch {c['batch_size']}, lr {c['lr']}, "
              f"{c['schedule']} {c['milestones']}, device {ctx.device}\n")
        print("| training set | ours: test acc (%) | train s | reference (H100) |\n|---|---|---|---|")
        for name in a.sets:
            accs, secs = [], []
            for s in range(a.seeds or c["seeds"]):
                if name == "full":
                    rows = np.arange(len(labels))
                elif name.startswith("random"):
                    rows = random_subset(len(labels), int(round(float(name.split("-")[1]) * len(labels))),
                                         c["seed"] + 7919 + s)
                else:
                    t = read_parquet(runner.run_dir / "select" / name / "selection.parquet", ["row", "selected"])
                    rows = t.column("row").to_numpy()[t.column("selected").to_numpy(zero_copy_only=False)]
                ts = TrainingSet(name, "bench", name.split("-")[0], 0.0, rows)
                fit = train_once(c, ts, images[rows], labels[rows], test, n_classes, c["seed"] + s, ctx.device, meter)
                accs.append(100 * fit["acc"])
                secs.append(fit["seconds"])
                print(f"  {name} seed {s}: {accs[-1]:.2f}% in {secs[-1]:.1f} s", flush=True)
            print(f"| {name} | {np.mean(accs):.2f} +- {np.std(accs):.2f} | {np.mean(secs):.1f} | {REFERENCE[name]} |",
                  flush=True)


if __name__ == "__main__":
    main()
