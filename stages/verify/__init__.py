"""verify: one fixed, fair protocol over every training set of the run; compare on the test split.

Training sets: the full training split, every materialized selection (weighted loss
from its manifest), a random subset of every budget in the run, every online
method of `verify.online` (selection inside the trainer), and every distilled set (its
learned lr and DSA kinds) beside `random-ipc<k>`: k random real images per class. Each gets the same recipe,
epochs and seeds; report.json / report.md / PNG plots give test accuracy (mean, std),
relative error vs full data (subset error - full error), training and end-to-end
speed-up (curation cost from the upstream units' records, handed in by the runner) and, on a GPU
with NVML, the training energy ratio.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.arrays import load_images, num_classes_of
from pipeline.data import learned_lr, read_distilled
from pipeline.energy import EnergyMeter
from pipeline.errors import CurateError, ShardError
from pipeline.manifest import read_parquet
from pipeline.methods import ONLINE
from pipeline.shards import check_safe, decode_label, iter_shard
from pipeline.stage import Resources, Stage, StageContext

from stages.learn.models import build_model
from pipeline.report import plot_report, render_markdown
from pipeline.sampling import random_subset


def load_test_split(ctx: StageContext, image_size: int | None):
    """uint8 images and labels of the catalog's test split (verify alone reads it)."""
    entry = ctx.catalog.entry(ctx.cfg.dataset)
    if not entry.fields.label:
        raise CurateError(f"verify: dataset '{ctx.cfg.dataset}' has no labels to evaluate against")
    shards, offsets, labels = [], [], []
    limits = ctx.cfg.index  # the test split is never indexed: the index limits apply here
    for shard in ctx.catalog.shards(ctx.cfg.dataset, "test"):
        for sample in iter_shard(shard, limits.max_member_bytes):
            check_safe(sample, shard)
            where = f"shard {shard}: sample {sample.key!r}"
            if entry.fields.label not in sample.members:
                raise ShardError(f"{where}: missing label member .{entry.fields.label}")
            shards.append(shard)
            offsets.append(sample.offset)
            labels.append(decode_label(sample.members[entry.fields.label], where=where))
    images = load_images(shards, offsets, entry.fields.image, image_size, channels=ctx.index().channels,
                         max_member_bytes=limits.max_member_bytes, max_pixels=limits.max_pixels)
    return images, np.asarray(labels, np.int64)


@dataclass
class TrainingSet:
    """One row of the comparison: what to train on and what it cost to choose."""
    name: str
    kind: str  # full | selection | random | online | distilled
    method: str
    budget: float | int
    rows: np.ndarray | None = None  # None: the whole training split
    weights: np.ndarray | None = None
    online: object = None  # an OnlineSpec
    curation: dict | None = None  # stage unit -> wall seconds
    ipc: int | None = None  # random: draw this many per class (the baseline of a distilled set)
    data: tuple | None = None  # distilled: (float32 images [N, C, H, W], labels [N])
    lr: float | None = None  # distilled by mtt: the learned lr replaces the recipe's
    augment: str | None = None  # distilled: "dsa:<kinds>" replaces the recipe's augmentation


def curation_cost(ctx: StageContext, unit: str) -> dict[str, float]:
    """Wall seconds of every unit a selection's rows (or a distilled set) depend on (embed, its
    parts, score, pools; experts), itself included, except index, which full-data training
    needs as much."""
    return {up.unit: float(up.record.get("wall_seconds") or 0.0)
            for up in ctx.ancestors(of=unit) if up.unit != "index"}


def per_class_subset(labels: np.ndarray, ipc: int, seed: int) -> np.ndarray:
    """`ipc` random rows of every class (all of a smaller class), grouped by class."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:ipc] for c in np.unique(labels[labels >= 0])])


def training_sets(ctx: StageContext, n_full: int, labels: np.ndarray | None = None) -> list[TrainingSet]:
    sets = [TrainingSet("full", "full", "full", 1.0, curation={})]
    sizes_with_random, sizes = set(), []
    for spec in ctx.cfg.select:
        manifest = read_parquet(ctx.input_dir(f"materialize/{spec.sel_name}") / "manifest.parquet")
        rows = manifest.column("row").to_numpy()
        cost = curation_cost(ctx, f"select/{spec.sel_name}")
        sets.append(TrainingSet(spec.sel_name, "selection", spec.method, spec.budget, rows,
                                manifest.column("weight").to_numpy(), curation=cost))
        sizes.append(len(rows))
        if spec.method == "random":
            sizes_with_random.add(len(rows))
    for spec in ctx.config["online"]:
        sets.append(TrainingSet(spec["sel_name"], "online", spec["label"], spec["budget"], online=spec, curation={}))
        sizes.append(max(1, int(round(spec["budget"] * n_full))))
    ipcs = []
    for spec in ctx.cfg.distill.specs:
        from stages.learn.augment import parse_kinds

        d = ctx.input_dir(f"distill/{spec.sel_name}")
        x, y = read_distilled(d)
        kinds = "_".join(parse_kinds(spec.dsa))
        sets.append(TrainingSet(spec.sel_name, "distilled", spec.method, spec.ipc, data=(x, y), lr=learned_lr(d),
                                augment=f"dsa:{kinds}" if kinds else None,
                                curation=curation_cost(ctx, f"distill/{spec.sel_name}")))
        if spec.ipc not in ipcs:
            ipcs.append(spec.ipc)
    if ctx.config["random_baseline"]:
        counts = np.bincount(labels[labels >= 0]) if labels is not None else np.ones(1, np.int64)
        for k in ipcs:
            n = int(np.minimum(counts[counts > 0], k).sum())
            sets.append(TrainingSet(f"random-ipc{k}", "random", "random", k, np.arange(n), ipc=k, curation={}))
        for k in sizes:
            if k not in sizes_with_random:
                sizes_with_random.add(k)
                sets.append(TrainingSet(f"random-n{k}", "random", "random", k, np.arange(k), curation={}))
    return sets


def subset_images(ctx: StageContext, sel_name: str, image_size):
    """The subset's pixels read back from its compact shards (checks materialize's output)."""
    d = ctx.input_dir(f"materialize/{sel_name}")
    m = read_parquet(d / "manifest.parquet", ["shard", "offset"])
    m = m.set_column(0, "shard", pa.array([str(d / s) for s in m.column("shard").to_pylist()]))
    return ctx.images(m, image_size)


def recipe_of(c: dict):
    from stages.learn.trainer import Recipe

    milestones = c["milestones"] if c["milestones"] is not None else [c["epochs"] // 2]
    return Recipe(epochs=c["epochs"], batch_size=c["batch_size"], lr=c["lr"], momentum=c["momentum"],
                  nesterov=c["nesterov"], weight_decay=c["weight_decay"], schedule=c["schedule"],
                  milestones=tuple(m for m in milestones if m > 0), gamma=c["gamma"], augment=c["augment"],
                  bf16=c["bf16"], channels_last=c["channels_last"])


def train_once(c: dict, ts: TrainingSet, x, y, test, n_classes: int, seed: int, device, meter: EnergyMeter) -> dict:
    """Train the recipe once on one training set; test accuracy, seconds, energy, costs.
    A distilled set trains with its learned lr (mtt) and its DSA kinds instead of the recipe's."""
    from dataclasses import replace

    import torch

    from stages.learn.online import make_selector
    from stages.learn.trainer import accuracy, train_classifier

    torch.manual_seed(seed)
    model = build_model(c["recipe"], x.shape[1:], n_classes, c["width"])
    selector = None
    if ts.kind == "online":
        o = ts.online
        opts = {k: o[k] for k in ONLINE[o["method"]].options}
        try:
            selector = make_selector(o["method"], o["budget"], **opts)
        except ValueError as exc:
            raise CurateError(f"verify {ts.name}: {exc}") from None
    e0 = meter.read()
    recipe = recipe_of(c)
    if ts.lr is not None:
        recipe = replace(recipe, lr=ts.lr)
    if ts.augment is not None:
        recipe = replace(recipe, augment=ts.augment)
    if ts.kind == "distilled" or ts.ipc:
        recipe = replace(recipe, epochs=c["ipc_epochs"], milestones=(max(1, c["ipc_epochs"] // 2),))
    fit = train_classifier(model, x, y, weights=ts.weights if ts.kind == "selection" else None, recipe=recipe,
                           seed=seed, device=device, selector=selector, num_classes=n_classes)
    e1 = meter.read()
    fit["acc"] = accuracy(model, test[0], test[1], device=device)
    fit["energy_j"] = None if e0 is None or e1 is None else e1 - e0
    return fit


def check_input_size(recipe: str, shape: tuple) -> None:
    """convnet3 halves the image three times: below 8 px nothing is left to classify."""
    if recipe == "convnet3" and len(shape) == 3 and min(shape[1:]) < 8:
        raise CurateError(f"verify: recipe convnet3 needs images of at least 8 x 8 px, got {shape[1]} x {shape[2]} "
                          f"(raise verify.image_size or use recipe mlp)")


def warm_up(c: dict, images, labels, n_classes: int, device) -> None:
    """One untimed step, so CUDA's lazy start-up is not billed to the first (full-data) training."""
    if device.type != "cuda":
        return
    from dataclasses import replace

    from stages.learn.trainer import train_classifier

    k = min(len(labels), c["batch_size"])
    train_classifier(build_model(c["recipe"], images.shape[1:], n_classes, c["width"]), images[:k], labels[:k],
                     recipe=replace(recipe_of(c), epochs=1), seed=0, device=device, num_classes=n_classes)


def summarise(ts: TrainingSet, fits: list[dict], n_full: int) -> dict:
    accs = [f["acc"] for f in fits]
    energy = [f["energy_j"] for f in fits]
    samples = (max(1, int(round(ts.budget * n_full))) if ts.kind == "online"
               else len(ts.data[1]) if ts.data is not None else n_full if ts.rows is None else len(ts.rows))
    row = {"name": ts.name, "kind": ts.kind, "method": ts.method, "budget": ts.budget, "samples": int(samples),
           "fraction": samples / n_full,
           "weighted": ts.weights is not None and bool(np.any(ts.weights != 1)),
           "accs": accs, "acc_mean": float(np.mean(accs)), "acc_std": float(np.std(accs)),
           "train_seconds": float(np.mean([f["seconds"] for f in fits])), "epochs": int(fits[0]["epochs"]),
           "backprop_samples": int(fits[0]["backprop_samples"]), "probe_samples": int(fits[0]["probe_samples"]),
           "backprop_share": fits[0]["backprop_samples"] / fits[0]["epochs"] / n_full,
           "curation": ts.curation or {}, "curation_seconds": float(sum((ts.curation or {}).values())),
           "energy_j": None if None in energy else float(np.mean(energy))}
    probes = [f.get("probe") for f in fits]
    if any(p is not None for p in probes):
        row["probe_mean"], row["probe_std"] = float(np.mean(probes)), float(np.std(probes))
    if ts.kind == "distilled":
        row["learned_lr"] = ts.lr
        row["augment"] = ts.augment
    if ts.kind == "online":
        skip = {"seconds", "final_loss", "steps", "backprop_samples", "probe_samples", "acc", "energy_j"}
        row["selector"] = json.loads(json.dumps({k: v for k, v in fits[0].items() if k not in skip}, default=str))
    return row


def compare_with_full(rows: list[dict]) -> None:
    """Relative error, speed-ups and energy ratio of every row against the full-data row."""
    full = rows[0]
    for r in rows:
        r["rel_error"] = (1 - r["acc_mean"]) - (1 - full["acc_mean"])
        r["speedup"] = full["train_seconds"] / max(r["train_seconds"], 1e-9)
        r["e2e_seconds"] = r["curation_seconds"] + r["train_seconds"]
        r["e2e_speedup"] = full["train_seconds"] / max(r["e2e_seconds"], 1e-9)
        r["energy_ratio"] = (r["energy_j"] / full["energy_j"]
                             if r["energy_j"] is not None and full["energy_j"] else None)


class Journal:
    """Finished trainings of one verify fingerprint, one JSON line each, so that a killed or
    failed verify resumes where it stopped instead of training everything again. Each
    training seeds itself, so a resumed report has the same accuracies as an unbroken one."""

    def __init__(self, path):
        self.path = path
        self.done: dict[tuple[str, int], dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    self.done[(rec["set"], rec["seed"])] = rec["fit"]
                except (ValueError, KeyError, TypeError):
                    break  # a line cut by a kill: the trainings after it run again
        self.resumed = len(self.done)

    def get(self, name: str, seed: int) -> dict | None:
        return self.done.get((name, seed))

    def add(self, name: str, seed: int, fit: dict) -> dict:
        fit = json.loads(json.dumps(fit, default=str))  # what a resumed run would read back
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"set": name, "seed": seed, "fit": fit}) + "\n")
        self.done[(name, seed)] = fit
        return fit

    def close(self) -> None:
        """The report holds it all now."""
        self.path.unlink(missing_ok=True)


class VerifyStage(Stage):
    name = "verify"
    version = 2
    resources = Resources(cpus=1, gpus=1)  # trains or runs a network

    def config(self, cfg, sel, entry=None):
        # the CLIP settings only for recipe clip: changing them must not retrain a classifier run
        skip = set() if cfg.verify.recipe == "clip" else {"clip", "prompts"}
        c = {"seed": cfg.seed, **cfg.verify.model_dump(exclude=skip)}
        c["online"] = [{**o.model_dump(), "sel_name": o.sel_name, "label": o.label} for o in cfg.verify.online]
        return c

    def upstream(self, cfg, sel):
        return (["index"] + [f"materialize/{s.sel_name}" for s in cfg.select]
                + [f"distill/{s.sel_name}" for s in cfg.distill.specs])

    def external_inputs(self, cfg, sel, entry=None):
        return [(cfg.dataset, "test")]

    def run(self, ctx: StageContext) -> None:
        from tqdm import tqdm

        c = ctx.config
        pool, images = ctx.index_arrays(c["image_size"])
        index, labels = pool.table, pool.labels
        test = load_test_split(ctx, c["image_size"])
        n_classes = num_classes_of(ctx.entry, labels)
        sets = training_sets(ctx, len(labels), labels)
        if c["recipe"] == "clip":  # image-caption pairs: a CLIP per set, zero-shot + linear probe
            from stages.verify.clip import ClipTrainer

            train = ClipTrainer(ctx, images, labels, test)
            extra = {"metric": "zero-shot accuracy", "captions_truncated": train.truncated, "prompts": c["prompts"],
                     "clip": c["clip"]}
        else:
            check_input_size(c["recipe"], images.shape[1:])
            meter = EnergyMeter(ctx.device)
            warm_up(c, images, labels, n_classes, ctx.device)
            extra = {"metric": "test accuracy"}

            def train(ts, x, y, rows, seed):
                return train_once(c, ts, x, y, test, n_classes, seed, ctx.device, meter)
        journal = Journal(ctx.run_dir / ".verify-progress" / f"{ctx.fingerprint}.jsonl")
        rows = []
        bar = tqdm(total=len(sets) * c["seeds"], desc="verify: trainings", disable=None,
                   initial=len(journal.done))
        for ts in sets:
            rows_of_x = ts.rows if ts.kind == "selection" else None  # index rows of x (None: all, or synthetic)
            if ts.kind == "selection":
                x, y = subset_images(ctx, ts.name, c["image_size"]), labels[ts.rows]
            elif ts.kind == "distilled":
                x, y = ts.data
                if x.shape[1:] != images.shape[1:]:
                    raise CurateError(f"verify {ts.name}: distilled images are {x.shape[1:]}, the pool's "
                                      f"{images.shape[1:]}: rerun distill with verify's image_size")
            else:
                x, y = images, labels
            fits = []
            for s in range(c["seeds"]):
                fit = journal.get(ts.name, s)
                if fit is None:
                    if ts.kind == "random":  # a fresh draw per seed: the std covers the subset's luck too
                        drawn = (per_class_subset(labels, ts.ipc, c["seed"] + 7919 + s) if ts.ipc else
                                 random_subset(len(labels), len(ts.rows), c["seed"] + 7919 + s))
                        x, y, rows_of_x = images[drawn], labels[drawn], drawn
                    fit = journal.add(ts.name, s, train(ts, x, y, rows_of_x, c["seed"] + s))
                fits.append(fit)
                bar.update(1)
            rows.append(summarise(ts, fits, len(labels)))
        bar.close()
        compare_with_full(rows)
        report = {**extra, "dataset": ctx.cfg.dataset, "recipe": c["recipe"],
                  "epochs": c["clip"]["epochs"] if c["recipe"] == "clip" else c["epochs"], "seeds": c["seeds"],
                  "device": str(ctx.device), "train_samples": int(len(labels)), "test_samples": int(len(test[1])),
                  "protocol": {k: c[k] for k in ("batch_size", "lr", "momentum", "nesterov", "weight_decay", "schedule",
                                                 "milestones", "gamma", "augment", "bf16", "channels_last", "width", "ipc_epochs")},
                  "rows": rows}
        (ctx.out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        (ctx.out / "report.md").write_text(render_markdown(report))
        try:
            plot_report(report, ctx.out)
        except Exception as exc:  # the trainings are worth more than their pictures
            print(f"verify: plots not drawn ({type(exc).__name__}: {exc}); `curate report --run DIR` redraws them")
        ctx.metrics.update({r["name"]: round(r["acc_mean"], 4) for r in rows})
        ctx.metrics["resumed_trainings"] = journal.resumed
        journal.close()
