"""verify: train one fixed recipe on full data and on each subset; compare on the test split.

Training sets: the full training split, every materialized selection (weighted loss
from its manifest), and a random subset of the same size for each non-random
selection. Each is trained over `seeds` seeds; report.json / report.md give test
accuracy (mean, std), relative error vs full (subset error - full error) and the
training speed-up (full training seconds / subset training seconds).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from pipeline.arrays import load_images
from pipeline.errors import CurateError, ShardError
from pipeline.manifest import read_parquet
from pipeline.shards import check_safe, decode_label, iter_shard
from pipeline.stage import Stage, StageContext

from .embed import load_index_arrays, load_table_images, num_classes_of, pool_channels
from .models import build_model
from .selection import random_subset


def load_test_split(ctx: StageContext, image_size: int | None):
    """uint8 images and labels of the catalog's test split (verify alone reads it)."""
    entry = ctx.catalog.entry(ctx.cfg.dataset)
    if not entry.fields.label:
        raise CurateError(f"verify: dataset '{ctx.cfg.dataset}' has no labels to evaluate against")
    shards, offsets, labels = [], [], []
    for shard in ctx.catalog.shards(ctx.cfg.dataset, "test"):
        for sample in iter_shard(shard):
            check_safe(sample, shard)
            where = f"shard {shard}: sample {sample.key!r}"
            if entry.fields.label not in sample.members:
                raise ShardError(f"{where}: missing label member .{entry.fields.label}")
            shards.append(shard)
            offsets.append(sample.offset)
            labels.append(decode_label(sample.members[entry.fields.label], where=where))
    images = load_images(shards, offsets, entry.fields.image, image_size, channels=pool_channels(ctx))
    return images, np.asarray(labels, np.int64)


def training_sets(ctx: StageContext, n_full: int):
    """(name, kind, method, budget, rows or None, weights or None) per set to train."""
    yield "full", "full", "full", 1.0, None, None
    sizes_with_random, sizes = set(), []
    for spec in ctx.cfg.select:
        manifest = read_parquet(ctx.input_dir(f"materialize/{spec.sel_name}") / "manifest.parquet")
        rows = manifest.column("row").to_numpy()
        yield spec.sel_name, "selection", spec.method, spec.budget, rows, manifest.column("weight").to_numpy()
        sizes.append(len(rows))
        if spec.method == "random":
            sizes_with_random.add(len(rows))
    if ctx.config["random_baseline"]:
        for k in sizes:
            if k not in sizes_with_random:
                sizes_with_random.add(k)
                yield f"random-n{k}", "random", "random", k, random_subset(n_full, k, ctx.cfg.seed + 7919), None


def subset_images(ctx: StageContext, sel_name: str, image_size):
    """The subset's pixels read back from its compact shards (checks materialize's output)."""
    d = ctx.input_dir(f"materialize/{sel_name}")
    m = read_parquet(d / "manifest.parquet", ["shard", "offset"])
    m = m.set_column(0, "shard", pa.array([str(d / s) for s in m.column("shard").to_pylist()]))
    return load_table_images(ctx, m, image_size)


def render_markdown(report: dict) -> str:
    lines = [f"# curate verification: {report['dataset']}", "",
             f"Recipe `{report['recipe']}`, {report['epochs']} epochs, {report['seeds']} seed(s), "
             f"test split of {report['test_samples']} samples, device {report['device']}.", "",
             "| training set | method | budget | samples | test acc (%) | rel. error (pp) | train time (s) | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['name']} | {r['method']} | {r['budget']} | {r['samples']} | "
                     f"{100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f} | {100 * r['rel_error']:+.2f} | "
                     f"{r['train_seconds']:.2f} | {r['speedup']:.1f}x |")
    lines += ["", "rel. error = subset test error - full-data test error, in percentage points; "
              "speed-up = full-data training time / subset training time."]
    return "\n".join(lines) + "\n"


class VerifyStage(Stage):
    name = "verify"
    version = 1
    resources = {"cpu": 1, "gpu": "optional"}

    def config(self, cfg, sel):
        return {"seed": cfg.seed, **cfg.verify.model_dump()}

    def upstream(self, cfg, sel):
        return ["index"] + [f"materialize/{s.sel_name}" for s in cfg.select]

    def external_inputs(self, cfg, sel):
        return [(cfg.dataset, "test")]

    def run(self, ctx: StageContext) -> None:
        import torch
        from tqdm import tqdm

        from .training import accuracy, train_classifier

        c = ctx.config
        index, images, labels = load_index_arrays(ctx, c["image_size"])
        test_x, test_y = load_test_split(ctx, c["image_size"])
        n_classes = num_classes_of(ctx.catalog.entry(ctx.cfg.dataset), labels)
        sets = list(training_sets(ctx, len(labels)))
        rows = []
        bar = tqdm(total=len(sets) * c["seeds"], desc="verify: trainings", disable=None)
        for name, kind, method, budget, sel_rows, weights in sets:
            if kind == "selection":
                x, y = subset_images(ctx, name, c["image_size"]), labels[sel_rows]
            elif sel_rows is None:
                x, y = images, labels
            else:
                x, y = images[sel_rows], labels[sel_rows]
            accs, secs = [], []
            for s in range(c["seeds"]):
                torch.manual_seed(c["seed"] + s)
                model = build_model(c["recipe"], x.shape[1], n_classes, c["width"])
                fit = train_classifier(model, x, y, weights=weights, epochs=c["epochs"], batch_size=c["batch_size"],
                                       lr=c["lr"], seed=c["seed"] + s, device=ctx.device)
                accs.append(accuracy(model, test_x, test_y, device=ctx.device))
                secs.append(fit["seconds"])
                bar.update(1)
            rows.append({"name": name, "kind": kind, "method": method, "budget": budget, "samples": int(len(y)),
                         "fraction": len(y) / len(labels), "weighted": weights is not None and bool(np.any(weights != 1)),
                         "accs": accs, "acc_mean": float(np.mean(accs)), "acc_std": float(np.std(accs)),
                         "train_seconds": float(np.mean(secs))})
        bar.close()
        full = rows[0]
        for r in rows:
            r["rel_error"] = (1 - r["acc_mean"]) - (1 - full["acc_mean"])
            r["speedup"] = full["train_seconds"] / max(r["train_seconds"], 1e-9)
        report = {"dataset": ctx.cfg.dataset, "recipe": c["recipe"], "epochs": c["epochs"], "seeds": c["seeds"],
                  "device": str(ctx.device), "train_samples": int(len(labels)), "test_samples": int(len(test_y)),
                  "rows": rows}
        (ctx.out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        (ctx.out / "report.md").write_text(render_markdown(report))
        ctx.metrics.update({r["name"]: round(r["acc_mean"], 4) for r in rows})
