"""Fashion-MNIST: test accuracy after training on each coreset method's subsets vs random
subsets of the same size (the verify stage), plus each subset's gradient-matching error
on the proxy's last-layer gradients.

Runs configs/fmnist-coresets.yaml (or --config) stage by stage through the runner, which
caches: a rerun after a change recomputes only what changed. Ingests Fashion-MNIST from
../shared/datasets into data/fashion-mnist (with its own catalog, data/bench_catalog.yaml)
first if the repo catalog's fashion-mnist shards are missing.

    python bench/fmnist_coresets.py [--config configs/fmnist-coresets.yaml] [--set k=v ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.manifest import read_parquet  # noqa: E402
from stages.kernels.coresets.features import last_layer  # noqa: E402
from stages.kernels.coresets.gradmatch import matching_error  # noqa: E402

from bench._fmnist import run_bench  # noqa: E402


def main() -> None:
    runner = run_bench(__doc__.splitlines()[0], "fmnist-coresets.yaml")

    emb = runner.run_dir / "embed"
    grads = last_layer(np.load(emb / "grads.npy"), np.load(emb / "embeddings.npy")).dense().numpy()
    report = json.loads((runner.run_dir / "report" / "report.json").read_text())
    print(f"\n{report['dataset']}: recipe {report['recipe']}, {report['epochs']} epochs, {report['seeds']} seeds, "
          f"device {report['device']}")
    print("| training set | samples | test acc (%) | vs random same size (pp) | grad-matching error | select s |")
    print("|---|---|---|---|---|---|")
    random_acc = {r["samples"]: r["acc_mean"] for r in report["rows"] if r["kind"] == "random"}
    for r in report["rows"]:
        err, secs, vs = "", "", ""
        if r["kind"] == "selection":
            t = read_parquet(runner.run_dir / "select" / r["name"] / "selection.parquet", ["selected", "weight"])
            rows = np.flatnonzero(t.column("selected").to_numpy(zero_copy_only=False))
            err = f"{matching_error(grads, rows, t.column('weight').to_numpy()[rows]):.4f}"
            secs = f"{runner.record('select/' + r['name'])['wall_seconds']:.1f}"
            if r["samples"] in random_acc:
                vs = f"{100 * (r['acc_mean'] - random_acc[r['samples']]):+.2f}"
        elif r["kind"] == "random":
            rng = np.random.default_rng(0)
            err = f"{np.mean([matching_error(grads, rng.choice(len(grads), r['samples'], replace=False), np.ones(r['samples'])) for _ in range(5)]):.4f}"
        print(f"| {r['name']} | {r['samples']} | {100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f} | {vs} | {err} | {secs} |")


if __name__ == "__main__":
    main()
