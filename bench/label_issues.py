"""Label issues on Fashion-MNIST with flipped labels: curate's scores against cleanlab, then
"drop the detected label issues, then train".

Writes a seeded class-stratified subset of `--n` training images (all 60,000 with --n 60000)
with `--noise` of their labels moved uniformly to another class, plus the full test split, as
shards with a catalog of their own, and runs configs/label-issues-fmnist.yaml through the runner
(index -> embed -> score -> select -> materialize -> verify -> report). After score it prints, for
knn_shapley, el2n, forgetting, margin, loss (all from the one proxy network), label_issues and
cleanlab on the same out-of-fold probabilities (score/oof_probs.npy; `find_label_issues` with its
default filter flags, `get_label_quality_scores` ranks): precision and recall among the top k (k =
the flipped count), AUROC, the flagged set's precision and recall where a method flags, and what
each costs, wall and CPU seconds: the model it needs (the proxy, or the fold models) plus its own
computation. After verify: the noisy full data, `{method: clean, score: label_issues}` and a
random subset of the same size.

    python bench/label_issues.py [--n 10000] [--noise 0.1] [--work DIR] [--threads T] [--set k=v ...]

--n 10000 is the default: on 2 CPU cores the whole bench then costs about 30 CPU minutes (proxy 2.3,
fold models 5.5, verify's six trainings of 30 epochs 21); all 60,000 take about six times that.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.arrays import label_array  # noqa: E402
from pipeline.catalog import Catalog, DatasetEntry, Fields  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.errors import CurateError  # noqa: E402
from pipeline.ingest import RawSample, read_idx_arrays, write_split  # noqa: E402
from pipeline.manifest import read_parquet  # noqa: E402
from pipeline.runner import Runner  # noqa: E402
from pipeline.sampling import stratified_subset  # noqa: E402
from pipeline.shards import shard_pattern  # noqa: E402
from stages.kernels.scores.dynamics import auroc  # noqa: E402
from stages.kernels.scores.label_issues import find_label_issues, label_issue_score  # noqa: E402

PROXY_SCORES = ["knn_shapley", "el2n", "forgetting", "margin", "loss"]  # from the one proxy network (embed)
VALUE = {"knn_shapley"}  # low value = suspicious


def noisy_fashion(src: str, out: Path, n: int, noise: float, seed: int = 0) -> tuple[Path, dict[str, int]]:
    """Shards of n training images (class-stratified, seeded) with round(noise * n) labels moved to
    another class uniformly, and the whole test split; returns (catalog, flipped key -> true label)."""
    x, y = read_idx_arrays(src, "train")
    rows = np.sort(stratified_subset(y, n, seed)) if n < len(y) else np.arange(len(y))
    x, y = x[rows], y[rows].astype(np.int64)
    rng = np.random.default_rng(seed)
    idx = rng.choice(n, int(round(noise * n)), replace=False)
    noisy = y.copy()
    noisy[idx] = (y[idx] + rng.integers(1, 10, len(idx))) % 10
    flipped = {f"train_{i:07d}": int(y[i]) for i in idx}
    splits = {}
    tx, ty = read_idx_arrays(src, "t10k")
    for split, (images, labels) in (("train", (x, noisy)), ("test", (tx, ty))):
        sizes = write_split((RawSample(label=int(b), image=a) for a, b in zip(images, labels)), out / "shards", split,
                            10000)
        splits[split] = f"shards/{shard_pattern(split, len(sizes))}"
    cat = Catalog.load(out / "data_catalog.yaml", missing_ok=True)
    cat.set_entry("fmnist-noisy", DatasetEntry(splits=splits, num_classes=10, fields=Fields(image=["png"]),
                                               description=f"Fashion-MNIST {n} train, {noise:.0%} labels flipped"))
    return cat.path, flipped


def detection(score: np.ndarray, truth: np.ndarray, flagged: np.ndarray | None) -> dict:
    """Top-k precision / recall with k = the true noise count rounded to the noise rate, AUROC,
    and the flagged set's precision / recall."""
    k = int(round(truth.mean() * len(truth)))
    top = np.argsort(-score, kind="stable")[:k]
    hit = truth[top].sum()
    out = {"p_at_k": hit / k, "r_at_k": hit / truth.sum(), "auroc": auroc(score, truth), "k": k}
    if flagged is not None:
        out.update(flagged=int(flagged.sum()), p_flag=truth[flagged].mean() if flagged.any() else float("nan"),
                   r_flag=flagged[truth].mean())
    return out


def proxy_score_seconds(runner: Runner, labels: np.ndarray, stored) -> dict[str, tuple[float, float]]:
    """Each proxy score recomputed alone from the embed unit's outputs: its own (wall, CPU)
    seconds (the result checked equal to the stored column)."""
    import torch

    from stages.score import compute_scores

    embed = runner.run_dir / "embed"
    val_labels = label_array(read_parquet(runner.run_dir / "index" / "val.parquet"))
    arrays = {"labels": labels, "probs": np.load(embed / "probs.npy"), "hnorm": np.load(embed / "hnorm.npy"),
              "emb": np.load(embed / "embeddings.npy"), "val_emb": np.load(embed / "val_embeddings.npy"),
              "val_labels": val_labels}
    c = runner.cfg.score
    out = {}
    for m in PROXY_SCORES:
        t0, c0 = time.perf_counter(), time.process_time()
        v = compute_scores([m], **arrays, el2n_epoch=c.el2n_epoch, knn_k=c.knn_k, prototype_clusters=None,
                           prototype_per_class=False, seed=runner.cfg.seed, device=torch.device("cpu"))[m]
        out[m] = (time.perf_counter() - t0, time.process_time() - c0)
        assert np.array_equal(v, stored[m]), f"{m}: recomputed score differs from scores.parquet"
    return out


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, (time.perf_counter() - t0, time.process_time() - c0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", default=os.environ.get("CURATE_FMNIST", str(ROOT.parent / "shared/datasets/fashion-mnist")))
    p.add_argument("--config", default=str(ROOT / "configs" / "label-issues-fmnist.yaml"))
    p.add_argument("--n", type=int, default=10000, help="training images (60000: all)")
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--work", default=None, help="folder for shards and run (default: a temporary one)")
    p.add_argument("--set", action="append", default=[], dest="overrides")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    a = p.parse_args()
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)

    from cleanlab.filter import find_label_issues as cleanlab_find
    from cleanlab.rank import get_label_quality_scores

    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"cuda={torch.cuda.is_available()}, load average {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work) if a.work else Path(tmp)
        cat_path, flipped = noisy_fashion(a.src, work, a.n, a.noise)
        cfg = load_config(a.config, [*a.overrides, f"run={work / 'run'}"])
        runner = Runner(cfg, Catalog.load(cat_path))
        runner.write_run_json()
        units = runner.units()
        first = units[:units.index("score") + 1]
        for unit in first:
            run_unit(runner, unit)
        truth = detection_table(runner, flipped, cleanlab_find, get_label_quality_scores, a)
        try:
            for unit in units[len(first):]:
                run_unit(runner, unit)
        except CurateError as exc:
            print(f"error: {exc}")
            return
        verify_table(runner, truth)


def run_unit(runner: Runner, unit: str) -> None:
    t0, c0 = time.perf_counter(), time.process_time()
    res = runner.run(unit)
    print(f"{unit}: {res['status']} ({time.perf_counter() - t0:.1f} s wall, {time.process_time() - c0:.1f} s CPU)",
          flush=True)


def detection_table(runner: Runner, flipped: dict[str, int], cleanlab_find, quality_scores, a) -> np.ndarray:
    """Prints every method's detection figures and cost; returns which pool rows are flipped."""
    run = runner.run_dir
    t = read_parquet(run / "score" / "scores.parquet")
    labels = label_array(read_parquet(run / "index" / "index.parquet"))
    keys = [u.split("/", 1)[1] for u in t.column("uid").to_pylist()]
    truth = np.array([k in flipped for k in keys])
    stored = {m: np.asarray(t.column(f"score_{m}")) for m in [*PROXY_SCORES, "label_issues"]}
    probs = np.load(run / "score" / "oof_probs.npy")
    ours_flag = read_parquet(run / "score" / "label_issues.parquet", ["flagged"]).column(0).to_numpy(zero_copy_only=False)
    li = runner.record("score")["metrics"]["label_issues"]
    embed = runner.record("embed")
    model = {m: (embed["wall_seconds"], embed["cpu_seconds"]) for m in PROXY_SCORES}
    model["label_issues"] = model["cleanlab"] = (li["seconds"], li["cpu_seconds"])

    own = proxy_score_seconds(runner, labels, stored)
    (ours, (ours_issue, _)), own["label_issues"] = timed(lambda: (label_issue_score(probs, labels),
                                                                  find_label_issues(probs, labels)))
    assert np.array_equal(ours, stored["label_issues"]) and np.array_equal(ours_issue, ours_flag)
    (cl_mask, cl_quality), own["cleanlab"] = timed(lambda: (cleanlab_find(labels, probs),  # default: prune_by_noise_rate
                                                            quality_scores(labels, probs)))  # default: self_confidence
    cl_cl = cleanlab_find(labels, probs, filter_by="confident_learning")

    rows = {m: detection(-stored[m] if m in VALUE else stored[m], truth, None) for m in PROXY_SCORES}
    rows["label_issues"] = detection(stored["label_issues"], truth, ours_flag)
    rows["cleanlab"] = detection(1.0 - cl_quality, truth, cl_mask)
    cost = {m: model[m][0] + own[m][0] for m in rows}
    cpu = {m: model[m][1] + own[m][1] for m in rows}
    n = len(labels)
    print(f"\nFashion-MNIST, {a.n} training images, {a.noise:.0%} labels flipped; pool {n} "
          f"({int(truth.sum())} flipped; the rest of the {a.n} held out for knn_shapley's validation); "
          f"top k = {rows['margin']['k']} (the flipped count, so precision@k = recall@k)")
    print(f"models: proxy (embed) {runner.cfg.embed.epochs} epochs on the pool, {embed['wall_seconds']:.1f} s wall, "
          f"{embed['cpu_seconds']:.1f} s CPU; out-of-fold: {runner.cfg.score.label_issues.folds} folds x "
          f"{li['epochs']} epochs, accuracy on the given labels {li['oof_accuracy']:.3f}, {li['seconds']:.1f} s wall, "
          f"{li['cpu_seconds']:.1f} s CPU")
    print("\n| method | precision@k | recall@k | AUROC | flagged | flagged precision | flagged recall | "
          "seconds wall (model + own) | CPU seconds |\n|---|---|---|---|---|---|---|---|---|")
    for m, r in rows.items():
        flag = (f"{r['flagged']} | {r['p_flag']:.3f} | {r['r_flag']:.3f}" if "flagged" in r else "- | - | -")
        print(f"| {m} | {r['p_at_k']:.3f} | {r['r_at_k']:.3f} | {r['auroc']:.3f} | {flag} | "
              f"{cost[m]:.1f} ({model[m][0]:.1f} + {own[m][0]:.2f}) | {cpu[m]:.1f} |")
    jac = lambda x, y: (x & y).sum() / max((x | y).sum(), 1)  # noqa: E731
    print(f"\ncleanlab: find_label_issues (filter_by='prune_by_noise_rate', its default) flags; get_label_quality_scores "
          f"(self_confidence) ranks. label_issues' flags vs cleanlab's on the same probabilities: Jaccard "
          f"{jac(ours_flag, cl_cl):.3f} with filter_by='confident_learning', {jac(ours_flag, cl_mask):.3f} with "
          "'prune_by_noise_rate'")
    best = max(PROXY_SCORES + ["label_issues"], key=lambda m: (rows[m]["p_at_k"], -cpu[m]))
    ranked = rows[best]["p_at_k"] > rows["cleanlab"]["p_at_k"] and cpu[best] <= cpu["cleanlab"]
    print(f"goal, ranked: {best} precision@k {rows[best]['p_at_k']:.3f} at {cpu[best]:.1f} CPU s vs cleanlab's "
          f"{rows['cleanlab']['p_at_k']:.3f} at {cpu['cleanlab']:.1f} -> {'MEETS' if ranked else 'misses'}")
    flagged = rows["label_issues"]["p_flag"] > rows["cleanlab"]["p_flag"] and cpu["label_issues"] <= cpu["cleanlab"]
    print(f"goal, flagged: label_issues precision {rows['label_issues']['p_flag']:.3f} (recall "
          f"{rows['label_issues']['r_flag']:.3f}) at {cpu['label_issues']:.1f} CPU s vs cleanlab's "
          f"{rows['cleanlab']['p_flag']:.3f} (recall {rows['cleanlab']['r_flag']:.3f}) at {cpu['cleanlab']:.1f} -> "
          f"{'MEETS' if flagged else 'misses'}", flush=True)
    return truth


def verify_table(runner: Runner, truth: np.ndarray) -> None:
    run = runner.run_dir
    rep = json.loads((run / "report" / "report.json").read_text())
    print(f"\nverify ({rep.get('recipe')}, {runner.cfg.verify.epochs} epochs, {runner.cfg.verify.seeds} seeds), "
          "test accuracy on the clean test split:\n| set | samples | accuracy % |\n|---|---|---|")
    acc = {}
    for r in rep["rows"]:
        acc[r["name"]] = r["acc_mean"]
        print(f"| {r['name']} | {r['samples']} | {100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f} |")
    sel = runner.cfg.select[0].sel_name
    kept = read_parquet(run / "select" / sel / "selection.parquet", ["selected"]).column(0).to_numpy(zero_copy_only=False)
    print(f"{sel} dropped {int((~kept).sum())} samples, {truth[~kept].sum()} of them flipped; kept "
          f"{truth[kept].sum()} flipped of {int(kept.sum())}")
    if "full" in acc and sel in acc:
        d = acc[sel] - acc["full"]
        print(f"goal: {sel} {100 * d:+.2f} pp vs the noisy full data -> {'beats' if d > 0 else 'does not beat'} it")


if __name__ == "__main__":
    main()
