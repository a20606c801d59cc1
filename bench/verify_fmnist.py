"""Fashion-MNIST verification table: full data, random, one-shot and adaptive coresets,
CREST, AdaSelection and big-loss at the same budgets, one protocol (configs/fmnist-verify.yaml).

Runs every stage through the runner (cached: a rerun recomputes only what changed), then
prints the report table, the wall time of one full-data epoch and the goal check
(within 0.5 point of full data at 30% with >= 2.5x end-to-end speed-up; better than
random at 10%). Ingests Fashion-MNIST from ../shared/datasets first if needed.

    python bench/verify_fmnist.py [--config configs/fmnist-verify.yaml] [--set k=v ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from bench._fmnist import run_bench  # noqa: E402


def goal_lines(report: dict) -> list[str]:
    rows = report["rows"]
    full = rows[0]
    random_acc = {round(r["fraction"], 2): r["acc_mean"] for r in rows if r["method"] == "random"}
    out = []
    for r in rows[1:]:
        frac = round(r["fraction"], 2)
        if r["kind"] == "random":
            continue
        if frac == 0.3:
            ok = full["acc_mean"] - r["acc_mean"] <= 0.005 and r["e2e_speedup"] >= 2.5
            out.append(f"{r['name']}: {100 * (r['acc_mean'] - full['acc_mean']):+.2f} pp vs full, "
                       f"{r['e2e_speedup']:.2f}x end-to-end -> {'MEETS' if ok else 'misses'} the 30% goal")
        elif frac == 0.1 and frac in random_acc:
            d = r["acc_mean"] - random_acc[frac]
            out.append(f"{r['name']}: {100 * d:+.2f} pp vs random 10% -> {'beats' if d > 0 else 'does not beat'} random")
    return out


def main() -> None:
    runner = run_bench(__doc__.splitlines()[0], "fmnist-verify.yaml")
    report = json.loads((runner.run_dir / "report" / "report.json").read_text())
    print()
    print((runner.run_dir / "report" / "report.md").read_text())
    full = report["rows"][0]
    epochs = full.get("epochs") or report["epochs"]  # the row's own under verify.steps (report's is None then)
    print(f"one full-data epoch of {report['recipe']}: {full['train_seconds'] / epochs:.2f} s "
          f"({report['train_samples'] * epochs / full['train_seconds']:.0f} img/s), device {report['device']}")
    print("\n".join(goal_lines(report)))
    print(f"plots: {runner.run_dir / 'report' / 'accuracy_vs_budget.png'}, {runner.run_dir / 'report' / 'accuracy_vs_time.png'}")


if __name__ == "__main__":
    main()
