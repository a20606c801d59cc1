"""verify: one fixed, fair protocol over every training set of the run; each set is one unit.

Training sets (pipeline.config.VerifySet, one unit `verify/<set>` each): the full training
split, every materialized selection (weighted loss from its manifest), a random subset of
every budget in the run, every online method of `verify.online` (selection inside the
trainer), and every distilled set (its learned lr and DSA kinds) beside `random-ipc<k>`: k
random real images per class. Each gets the same recipe, seeds and training budget, and
writes `result.json`: its report row (test accuracy mean and std; the final training loss and
accuracy on its own training set; training seconds, median and range over seeds; curation
cost from the upstream units' records; energy on a GPU with NVML) and every seed's training.

The budget is `verify.epochs` (fixed epochs; distilled and random-ipc sets get `ipc_epochs`)
or `verify.steps` (equal steps: every set, whatever its size, exactly that many optimiser
steps; the fair protocol when subsets are small and a fixed epoch count would starve them).
A unit reads only what its set needs, so a changed budget retrains that set alone; the
`report` stage compares them with full data.
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

from stages.learn.models import build_model, seeded_init
from pipeline.sampling import budget_count, random_subset


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
    curation: dict | None = None  # stage unit -> its cost (`curation_cost`)
    ipc: int | None = None  # random: draw this many per class (the baseline of a distilled set)
    data: tuple | None = None  # distilled: (float32 images [N, C, H, W], labels [N])
    lr: float | None = None  # distilled by mtt: the learned lr replaces the recipe's
    augment: str | None = None  # distilled: "dsa:<kinds>" replaces the recipe's augmentation


def unit_cost(record: dict) -> dict:
    """What one unit cost, from its `_stage.json`: its CPU seconds where it ran on the CPU and
    the runner recorded them (a busy machine stretches wall time, not CPU time), else its wall
    seconds (older records; a GPU unit, whose device time CPU seconds miss). `basis` says which."""
    wall = float(record.get("wall_seconds") or 0.0)
    cpu = record.get("cpu_seconds")
    basis = "cpu" if cpu is not None and str(record.get("device", "cpu")) == "cpu" else "wall"
    rss = record.get("peak_rss_bytes")
    return {"seconds": float(cpu) if basis == "cpu" else wall, "basis": basis, "wall_seconds": wall,
            "cpu_seconds": None if cpu is None else float(cpu), "peak_rss_bytes": None if rss is None else int(rss)}


def curation_cost(ctx: StageContext, unit: str) -> dict[str, dict]:
    """The cost (`unit_cost`) of every unit a selection's rows (or a distilled set) depend on
    (embed, its parts, score, pools; experts), itself included, except index, which full-data
    training needs as much."""
    return {up.unit: unit_cost(up.record) for up in ctx.ancestors(of=unit) if up.unit != "index"}


def per_class_subset(labels: np.ndarray, ipc: int, seed: int) -> np.ndarray:
    """`ipc` random rows of every class (all of a smaller class), grouped by class."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:ipc] for c in np.unique(labels[labels >= 0])])


def training_set(ctx: StageContext, vs, labels: np.ndarray) -> TrainingSet:
    """What the unit's set (a pipeline.config.VerifySet) trains on, read from its upstream units."""
    n_full = len(labels)
    if vs.kind == "full":
        return TrainingSet("full", "full", "full", 1.0, curation={})
    if vs.kind == "selection":
        spec = vs.spec
        manifest = read_parquet(ctx.input_dir(f"materialize/{spec.sel_name}") / "manifest.parquet")
        return TrainingSet(spec.sel_name, "selection", spec.method, spec.budget, manifest.column("row").to_numpy(),
                           manifest.column("weight").to_numpy(), curation=curation_cost(ctx, f"select/{spec.sel_name}"))
    if vs.kind == "online":
        spec = ctx.config["online"]
        return TrainingSet(spec["sel_name"], "online", spec["label"], spec["budget"], online=spec, curation={})
    if vs.kind == "distilled":
        from stages.learn.augment import parse_kinds

        spec = vs.spec
        d = ctx.input_dir(f"distill/{spec.sel_name}")
        x, y = read_distilled(d)
        kinds = "_".join(parse_kinds(spec.dsa))
        return TrainingSet(spec.sel_name, "distilled", spec.method, spec.ipc, data=(x, y), lr=learned_lr(d),
                           augment=f"dsa:{kinds}" if kinds else None,
                           curation=curation_cost(ctx, f"distill/{spec.sel_name}"))
    if vs.ipc:
        counts = np.bincount(labels[labels >= 0])
        n = int(np.minimum(counts[counts > 0], vs.ipc).sum())
        return TrainingSet(f"random-ipc{vs.ipc}", "random", "random", vs.ipc, np.arange(n), ipc=vs.ipc, curation={})
    if vs.like is not None:  # a selection without a budget: as many as it kept
        chosen = read_parquet(ctx.input_dir(f"select/{vs.like}") / "selection.parquet", ["selected"])
        k = int(np.count_nonzero(chosen.column("selected").to_numpy(zero_copy_only=False)))
    else:
        k = budget_count(vs.budget, n_full)
    return TrainingSet(f"random-n{k}", "random", "random", k, np.arange(k), curation={})


def subset_images(ctx: StageContext, sel_name: str, image_size):
    """The subset's pixels read back from its compact shards (checks materialize's output)."""
    d = ctx.input_dir(f"materialize/{sel_name}")
    m = read_parquet(d / "manifest.parquet", ["shard", "offset"])
    m = m.set_column(0, "shard", pa.array([str(d / s) for s in m.column("shard").to_pylist()]))
    return ctx.images(m, image_size)


def recipe_of(c: dict):
    """The trainer's Recipe of verify's settings: `steps` (equal steps, milestones in steps,
    default half-way) or `epochs` (milestones in epochs, default half-way)."""
    from stages.learn.trainer import Recipe

    steps = c.get("steps")
    length = steps if steps is not None else c["epochs"]
    milestones = c["milestones"] if c["milestones"] is not None else [length // 2]
    return Recipe(epochs=c.get("epochs") or 1, steps=steps, batch_size=c["batch_size"], lr=c["lr"],
                  momentum=c["momentum"], nesterov=c["nesterov"], weight_decay=c["weight_decay"],
                  schedule=c["schedule"], milestones=tuple(m for m in milestones if m > 0), gamma=c["gamma"],
                  augment=c["augment"], bf16=c["bf16"], channels_last=c["channels_last"])


def train_once(c: dict, ts: TrainingSet, x, y, test, n_classes: int, seed: int, device, meter: EnergyMeter) -> dict:
    """Train the recipe once on one training set; test accuracy, the final fit on its own
    training set (`fit_on`: after training, untimed), seconds, steps, energy, costs.
    A distilled set trains with its learned lr (mtt) and its DSA kinds instead of the recipe's;
    under fixed epochs it and a random-ipc set train `ipc_epochs`, under equal steps `steps`."""
    from dataclasses import replace

    from stages.learn.online import make_selector
    from stages.learn.trainer import accuracy, fit_on, train_classifier

    model = seeded_init(seed, lambda: build_model(c["recipe"], x.shape[1:], n_classes, c["width"]))
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
    if (ts.kind == "distilled" or ts.ipc) and recipe.steps is None:
        recipe = replace(recipe, epochs=c["ipc_epochs"], milestones=(max(1, c["ipc_epochs"] // 2),))
    fit = train_classifier(model, x, y, weights=ts.weights if ts.kind == "selection" else None, recipe=recipe,
                           seed=seed, device=device, selector=selector, num_classes=n_classes)
    e1 = meter.read()
    fit.update(fit_on(model, x, y, device=device))
    fit["acc"] = accuracy(model, test[0], test[1], device=device)
    fit["energy_j"] = None if e0 is None or e1 is None else e1 - e0
    return fit


def check_input_size(recipe: str, shape: tuple) -> None:
    """convnet3 halves the image three times: below 8 px nothing is left to classify."""
    if recipe == "convnet3" and len(shape) == 3 and min(shape[1:]) < 8:
        raise CurateError(f"verify: recipe convnet3 needs images of at least 8 x 8 px, got {shape[1]} x {shape[2]} "
                          "(set verify.image_size to 8 or more, e.g. --set verify.image_size=8, or verify.recipe: mlp)")


def warm_up(c: dict, images, labels, n_classes: int, device) -> None:
    """One untimed step, so CUDA's lazy start-up is not billed to the first (full-data) training."""
    if device.type != "cuda":
        return
    from dataclasses import replace

    from stages.learn.trainer import train_classifier

    k = min(len(labels), c["batch_size"])
    one = replace(recipe_of(c), epochs=1, milestones=())
    train_classifier(build_model(c["recipe"], images.shape[1:], n_classes, c["width"]), images[:k], labels[:k],
                     recipe=replace(one, steps=1) if one.steps else one, seed=0, device=device, num_classes=n_classes)


def timing(seconds: list[float]) -> dict:
    """Training seconds over seeds: the median (what speed-ups divide; one slow run on a busy
    machine does not move it) and the range."""
    s = np.asarray(seconds, np.float64)
    return {"train_seconds": float(np.median(s)), "train_seconds_min": float(s.min()),
            "train_seconds_max": float(s.max()), "train_seconds_per_seed": [float(v) for v in s]}


def late_loss_drop(curve: list[float]) -> float | None:
    """How much the running training loss still fell at the end: (mean loss over the
    second-last tenth of the steps - over the last tenth) / the former. None under 2 tenths."""
    if len(curve) < 2 or not curve[-2] > 0:
        return None
    return float((curve[-2] - curve[-1]) / curve[-2])


def fit_summary(fits: list[dict]) -> dict:
    """The final training loss and accuracy on the set's own training data (`fit_on`), per seed
    and their means, and the loss's late drop (mean over seeds); empty where not measured (clip)."""
    if any("train_acc" not in f for f in fits):
        return {}
    drops = [late_loss_drop(f.get("loss_curve") or []) for f in fits]
    return {"train_losses": [f["train_loss"] for f in fits], "train_accs": [f["train_acc"] for f in fits],
            "train_loss": float(np.mean([f["train_loss"] for f in fits])),
            "train_acc": float(np.mean([f["train_acc"] for f in fits])), "classes": int(fits[0]["classes"]),
            "late_loss_drop": None if None in drops else float(np.mean(drops))}


def curation_summary(curation: dict | None) -> dict:
    """A row's curation cost: seconds per unit (CPU or wall, `curation_basis`: cpu, wall or
    mixed; None without curation), their sum, and the largest peak RSS among the units."""
    curation = curation or {}
    bases = {c["basis"] for c in curation.values()}
    rss = [c["peak_rss_bytes"] for c in curation.values() if c["peak_rss_bytes"] is not None]
    return {"curation": {u: c["seconds"] for u, c in curation.items()}, "curation_units": curation,
            "curation_seconds": float(sum(c["seconds"] for c in curation.values())),
            "curation_basis": None if not bases else bases.pop() if len(bases) == 1 else "mixed",
            "curation_peak_rss_bytes": max(rss) if rss else None}


def summarise(ts: TrainingSet, fits: list[dict], n_full: int) -> dict:
    accs = [f["acc"] for f in fits]
    energy = [f["energy_j"] for f in fits]
    samples = (max(1, int(round(ts.budget * n_full))) if ts.kind == "online"
               else len(ts.data[1]) if ts.data is not None else n_full if ts.rows is None else len(ts.rows))
    epochs = float(fits[0]["epochs"])
    row = {"name": ts.name, "kind": ts.kind, "method": ts.method, "budget": ts.budget, "samples": int(samples),
           "fraction": samples / n_full,
           "weighted": ts.weights is not None and bool(np.any(ts.weights != 1)),
           "accs": accs, "acc_mean": float(np.mean(accs)), "acc_std": float(np.std(accs)),
           **timing([f["seconds"] for f in fits]), **fit_summary(fits),
           "steps": int(fits[0]["steps"]), "epochs": int(epochs) if epochs.is_integer() else epochs,
           "backprop_samples": int(fits[0]["backprop_samples"]), "probe_samples": int(fits[0]["probe_samples"]),
           "backprop_share": fits[0]["backprop_samples"] / epochs / n_full,
           **curation_summary(ts.curation),
           "energy_j": None if None in energy else float(np.mean(energy))}
    probes = [f.get("probe") for f in fits]
    if any(p is not None for p in probes):
        row["probe_mean"], row["probe_std"] = float(np.mean(probes)), float(np.std(probes))
    if ts.kind == "distilled":
        row["learned_lr"] = ts.lr
        row["augment"] = ts.augment
    if ts.kind == "online":
        skip = {"seconds", "final_loss", "steps", "backprop_samples", "probe_samples", "acc", "energy_j",
                "epochs", "loss_curve", "train_loss", "train_acc", "classes"}
        row["selector"] = json.loads(json.dumps({k: v for k, v in fits[0].items() if k not in skip}, default=str))
    return row


class Journal:
    """Finished trainings of one verify unit's fingerprint (one per seed), one JSON line each,
    so that a killed or failed unit resumes where it stopped instead of training every seed
    again. Each training seeds itself, so a resumed result has the same accuracies as an
    unbroken one."""

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
        """The unit's result.json holds it all now."""
        self.path.unlink(missing_ok=True)


class VerifyStage(Stage):
    name = "verify"
    version = 4
    resources = Resources(cpus=1, gpus=1)  # trains or runs a network

    def units(self, cfg):
        return [f"{self.name}/{s.name}" for s in cfg.verify_sets()]

    def item(self, cfg, name):
        return cfg.verify_set(name)

    def config(self, cfg, sel, entry=None):
        """The protocol, and what this set alone adds: a change to another set leaves it cached."""
        skip = {"online", "random_baseline"}
        if cfg.verify.recipe != "clip":  # the CLIP settings: changing them must not retrain a classifier
            skip |= {"clip", "prompts"}
        if not (sel.kind == "distilled" or sel.ipc) or cfg.verify.steps is not None:
            skip.add("ipc_epochs")
        skip.add("epochs" if cfg.verify.steps is not None else "steps")  # the budget that governs, alone
        c = {"seed": cfg.seed, "set": sel.name, **cfg.verify.model_dump(exclude=skip)}
        if sel.kind == "online":
            c["online"] = {**sel.spec.model_dump(), "sel_name": sel.spec.sel_name, "label": sel.spec.label}
        if sel.kind == "random":
            c["random"] = {"budget": sel.budget, "ipc": sel.ipc, "like": sel.like}
        return c

    def upstream(self, cfg, sel):
        if sel.kind == "selection":
            return ["index", f"materialize/{sel.name}"]
        if sel.kind == "distilled":
            return ["index", f"distill/{sel.name}"]
        return ["index"] + ([f"select/{sel.like}"] if sel.like is not None else [])

    def external_inputs(self, cfg, sel, entry=None):
        return [(cfg.dataset, "test")]

    def run(self, ctx: StageContext) -> None:
        c = ctx.config
        pool = ctx.index()
        labels = pool.labels
        test = load_test_split(ctx, c["image_size"])
        n_classes = num_classes_of(ctx.entry, labels)
        ts = training_set(ctx, ctx.sel, labels)
        # the pool's pixels where this set trains on them, or a CLIP's linear probe reads them
        images = ctx.images(pool.table, c["image_size"]) if c["recipe"] == "clip" or ts.kind in (
            "full", "random", "online") else None
        rows_of_x = ts.rows if ts.kind == "selection" else None  # index rows of x (None: all, or synthetic)
        if ts.kind == "selection":
            x, y = subset_images(ctx, ts.name, c["image_size"]), labels[ts.rows]
        elif ts.kind == "distilled":
            x, y = ts.data
            shape = ctx.images(pool.table.slice(0, 1), c["image_size"]).shape[1:]
            if x.shape[1:] != shape:
                raise CurateError(f"verify {ts.name}: distilled images are {x.shape[1:]}, the pool's "
                                  f"{shape}: rerun distill with verify's image_size")
        else:
            x, y = images, labels
        info = {"set": ts.name, "device": str(ctx.device), "train_samples": int(len(labels)),
                "test_samples": int(len(test[1]))}
        if c["recipe"] == "clip":  # image-caption pairs: a CLIP per set, zero-shot + linear probe
            from stages.verify.clip import ClipTrainer

            train = ClipTrainer(ctx, images, labels, test)
            info.update(metric="zero-shot accuracy", captions_truncated=train.truncated)
        else:
            check_input_size(c["recipe"], x.shape[1:])
            meter = EnergyMeter(ctx.device)
            warm_up(c, x, y, n_classes, ctx.device)
            info["metric"] = "test accuracy"

            def train(ts, x, y, rows, seed):
                return train_once(c, ts, x, y, test, n_classes, seed, ctx.device, meter)
        journal = Journal(ctx.run_dir / ".verify-progress" / f"{ctx.fingerprint}.jsonl")
        fits = []
        with ctx.progress(c["seeds"], f"verify {ts.name}: trainings") as step:
            for s in range(c["seeds"]):
                fit = journal.get(ts.name, s)
                if fit is None:
                    if ts.kind == "random":  # a fresh draw per seed: the std covers the subset's luck too
                        drawn = (per_class_subset(labels, ts.ipc, c["seed"] + 7919 + s) if ts.ipc else
                                 random_subset(len(labels), len(ts.rows), c["seed"] + 7919 + s))
                        x, y, rows_of_x = images[drawn], labels[drawn], drawn
                    fit = journal.add(ts.name, s, train(ts, x, y, rows_of_x, c["seed"] + s))
                step(1)
                fits.append(fit)
        row = summarise(ts, fits, len(labels))
        result = {**info, "row": row, "trainings": fits}
        (ctx.out / "result.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        ctx.metrics.update({"acc_mean": round(row["acc_mean"], 4), "samples": row["samples"],
                            "resumed_trainings": journal.resumed})
        journal.close()
