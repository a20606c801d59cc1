"""Distilled Fashion-MNIST (issue 5): mtt and dm at IPC 1, 10, 50 beside random real images.

Runs the config's units through the runner (cached: a rerun recomputes only what changed):
experts, one distill unit per spec, verify. Then prints
  1. the accuracy table by IPC (mtt, dm, random real images) beside the published figures;
  2. expert-training time, and each distill unit's seconds and peak GPU memory per iteration;
  3. a sweep: time and peak GPU memory of one mtt iteration as syn_steps grows (the run's own
     experts, IPC --sweep-ipc), the figure that says how far an unroll fits in memory.

    python bench/distill_fmnist.py [--config configs/distill/fashion-mnist.yaml] [--set k=v ...]
           [--sweep 10 20 40 80] [--sweep-ipc 10] [--sweep-iterations 5]
On CPU, shrink it: --config configs/distill/digits.yaml, or --set on iterations / experts.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._fmnist import bench_runner  # noqa: E402

PUBLISHED = {  # Fashion-MNIST, ConvNet, test accuracy % (the calibration figures)
    "random (published)": {1: 51.4, 10: 73.8, 50: 82.5},
    "random (H100 plain script, 300 ep)": {1: 45.6, 10: 73.6, 50: 82.2},
    "DC": {1: 70.5, 10: 82.3, 50: 83.6},
    "DSA": {1: 70.6, 10: 84.6, 50: 88.7},
}


def add_args(p) -> None:
    p.add_argument("--sweep", type=int, nargs="*", default=[10, 20, 40, 80], help="syn_steps values (none: skip)")
    p.add_argument("--sweep-ipc", type=int, default=10)
    p.add_argument("--sweep-iterations", type=int, default=5, help="timed iterations per value, after one warm-up")


def stage_record(run_dir: Path, unit: str) -> dict:
    return json.loads((run_dir / unit / "_stage.json").read_text())


def accuracy_table(report: dict) -> list[str]:
    by = {}
    for r in report["rows"]:
        if r["kind"] == "distilled" or r["name"].startswith("random-ipc"):
            by.setdefault(r["method"], {})[int(r["budget"])] = r
    ipcs = sorted({k for rows in by.values() for k in rows})
    lines = ["| method | " + " | ".join(f"IPC {k}" for k in ipcs) + " |", "|---" * (len(ipcs) + 1) + "|"]
    for m, rows in sorted(by.items()):
        cells = [f"{100 * rows[k]['acc_mean']:.2f} ± {100 * rows[k]['acc_std']:.2f}" if k in rows else "" for k in ipcs]
        lines.append(f"| {m} (ours) | " + " | ".join(cells) + " |")
    published = PUBLISHED if report["dataset"] == "fashion-mnist" else {}  # the figures are Fashion-MNIST's
    for m, figs in published.items():
        lines.append(f"| {m} | " + " | ".join(f"{figs[k]:.1f}" if k in figs else "" for k in ipcs) + " |")
    full = report["rows"][0]
    lines.append(f"\nfull data ({report['epochs']} epochs): {100 * full['acc_mean']:.2f} ± {100 * full['acc_std']:.2f}; "
                 f"distilled / random-ipc sets: {report['protocol'].get('ipc_epochs')} epochs, {report['seeds']} seeds, "
                 f"device {report['device']}")
    goal = by.get("mtt", {}) if published else {}
    for k in (10, 50):
        if k in goal:
            ok = 100 * goal[k]["acc_mean"] > PUBLISHED["DSA"][k]
            lines.append(f"goal, mtt above DSA at IPC {k}: {100 * goal[k]['acc_mean']:.2f} vs {PUBLISHED['DSA'][k]} "
                         f"-> {'MET' if ok else 'missed'}")
    return lines


def sweep(runner, values: list[int], ipc: int, iterations: int) -> list[str]:
    """Seconds and peak GPU memory of one mtt iteration per syn_steps value (1 warm-up first)."""
    import torch

    from stages.learn.distill.dm import init_from_real
    from stages.learn.distill.experts import load_buffer
    from stages.learn.distill.mtt import distill_mtt
    from stages.distill import _augment, _dataset_tag, _pool
    from stages.learn.models import build_model

    ctx = runner.context("experts", out=runner.run_dir / "experts")
    e = runner.cfg.distill.experts
    images, labels, n_classes = _pool(ctx, runner.cfg.verify.image_size)
    in_shape = tuple(images.shape[1:])
    buffer = load_buffer(runner.run_dir / "experts", arch=e.arch, in_shape=in_shape, num_classes=n_classes,
                         width=e.width, dataset=_dataset_tag(ctx, runner.cfg.distill.zca))
    syn, syn_y = init_from_real(images, labels, ipc, torch.Generator().manual_seed(0), num_classes=n_classes)
    device = ctx.device
    lines = [f"mtt iteration cost, IPC {ipc}, convnet3 width {e.width}, device {device}:",
             "| syn_steps | s / iteration | peak GPU MiB |", "|---|---|---|"]
    for steps in values:
        def run(n):
            distill_mtt(buffer, syn, syn_y, model_factory=lambda: build_model(e.arch, in_shape, n_classes, e.width),
                        iterations=n, syn_steps=steps, expert_epochs=2, max_start_epoch=1, lr_img=100.0,
                        lr_lr=1e-5, lr_init=0.01, augment=_augment(e.dsa), seed=0, device=device)
        try:
            run(1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            run(iterations)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = (time.perf_counter() - t0) / iterations
            peak = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f}" if device.type == "cuda" else "n/a"
            lines.append(f"| {steps} | {dt:.3f} | {peak} |")
        except torch.OutOfMemoryError:
            lines.append(f"| {steps} | out of memory | - |")
            torch.cuda.empty_cache()
    return lines


def main() -> None:
    args, runner = bench_runner(__doc__.splitlines()[0], "distill/fashion-mnist.yaml", add_args)
    for unit in runner.units():
        if unit == "embed" and not runner.cfg.select:
            continue  # nothing reads embeddings in a distillation-only run
        t0 = time.perf_counter()
        res = runner.run(unit)
        print(f"{unit}: {res['status']} ({time.perf_counter() - t0:.1f} s)", flush=True)
    run_dir = runner.run_dir
    report = json.loads((run_dir / "report" / "report.json").read_text())
    print("\n" + "\n".join(accuracy_table(report)) + "\n")
    if runner.cfg.distill.has_mtt:
        rec = stage_record(run_dir, "experts")
        e = runner.cfg.distill.experts
        print(f"experts: {e.count} x {e.epochs} epochs in {rec['wall_seconds']:.1f} s "
              f"({rec['wall_seconds'] / e.count:.1f} s per expert, device {rec['device']})")
    print("| distill unit | s / iteration | peak GPU MiB | loss first -> last | learned lr |\n|---|---|---|---|---|")
    for spec in runner.cfg.distill.specs:
        m = stage_record(run_dir, f"distill/{spec.sel_name}")["metrics"]
        peak = f"{m['peak_gpu_mib']:.0f}" if m.get("peak_gpu_mib") is not None else "n/a"
        lr = f"{m['lr']:.4g}" if m.get("lr") is not None else "-"
        spi = m.get("seconds_per_iteration")
        print(f"| {spec.sel_name} | {'n/a' if spi is None else f'{spi:.3f}'} | {peak} | "
              f"{m['loss_first']:.4g} -> {m['loss_last']:.4g} | {lr} |")
    if runner.cfg.distill.has_mtt and args.sweep:
        print("\n" + "\n".join(sweep(runner, args.sweep, args.sweep_ipc, args.sweep_iterations)))


if __name__ == "__main__":
    main()
