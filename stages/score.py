"""score: per-sample scores joined into score/scores.parquet (row, uid, score_<name>).

Methods (higher = harder / less valuable, except knn_shapley where higher = more
valuable): el2n, grand (last-layer closed form), forgetting, loss, margin (all from
the proxy's recorded dynamics), knn_shapley (on embeddings, w.r.t. the validation
split index/val.parquet), prototype (distance to nearest k-means centroid), influence
(last-layer influence on the validation loss, exact Hessian, damped; higher = more helpful),
clip (cosine of each image embedding with its caption's: the DataComp CLIP score; higher =
better aligned pair; needs embed/text_embeddings.npy and no labels), label_issues (confident
learning on out-of-fold probabilities: `score.label_issues.folds` networks of the proxy's kind,
each trained here on the other folds, since the proxy's own outputs and features have seen every
label; the score is 1 - p(given label), higher = more likely mislabelled; the probabilities are
kept as score/oof_probs.npy and the flagged samples, with the class they likely belong to, as
score/label_issues.parquet).
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from pipeline.arrays import num_classes_of
from pipeline.errors import CurateError
from pipeline.manifest import write_parquet
from pipeline.methods import scores_needing
from pipeline.npy import load_checked
from pipeline.stage import Resources, Stage, StageContext

from stages.kernels.scores import dynamics
from stages.kernels.scores.influence import influence_last_layer
from stages.kernels.scores.knn_shapley import knn_shapley
from stages.kernels.scores.label_issues import find_label_issues, label_issue_score, stratified_folds
from stages.kernels.scores.prototype import prototype_distance


def compute_scores(methods: list[str], *, labels: np.ndarray, probs: np.ndarray, hnorm: np.ndarray,
                   emb: np.ndarray, val_emb: np.ndarray | None, val_labels: np.ndarray | None,
                   el2n_epoch: int, knn_k: int, prototype_clusters: int | None, prototype_per_class: bool,
                   seed: int, device, val_probs: np.ndarray | None = None,
                   influence_damping: float = 0.01, knn: dict | None = None) -> dict[str, np.ndarray]:
    """Every requested score as float32 [N]. probs [S, E, N, C], hnorm [S, E, N]. knn: the run's
    `knn:` section (knn_shapley's neighbour search, prototype's k-means); None: exact."""
    e = min(el2n_epoch, probs.shape[1]) - 1
    final = probs[:, -1].astype(np.float32).mean(0)
    out: dict[str, np.ndarray] = {}
    for m in methods:
        if m == "el2n":
            out[m] = dynamics.el2n(probs[:, e].astype(np.float32), labels)
        elif m == "grand":
            out[m] = dynamics.grand_last_layer(probs[:, e].astype(np.float32), labels, hnorm[:, e, :, None])
        elif m == "forgetting":
            correct = probs.argmax(-1) == labels  # [S, E, N]
            out[m] = np.mean([dynamics.forgetting(c) for c in correct], axis=0)
        elif m == "loss":
            out[m] = dynamics.loss(final, labels)
        elif m == "margin":
            out[m] = dynamics.margin(final, labels)
        elif m == "knn_shapley":
            if val_emb is None:
                raise CurateError("score knn_shapley: no validation embeddings (index/val.parquet missing)")
            out[m] = knn_shapley(emb, labels, val_emb, val_labels, k=knn_k, device=device, knn=knn)
        elif m == "influence":
            if val_emb is None or val_probs is None:
                raise CurateError("score influence: needs the proxy's validation outputs (embed.method: proxy)")
            # seed 0's final model: the one whose features `emb` holds
            out[m] = influence_last_layer(probs[0, -1].astype(np.float32), labels, emb, val_probs, val_labels,
                                          val_emb, damping=influence_damping)
        elif m == "prototype":
            k = prototype_clusters or int(labels.max()) + 1
            out[m] = prototype_distance(emb, k, labels=labels if prototype_per_class else None, seed=seed, device=device,
                                        knn=knn)
    return {m: np.asarray(v, np.float32) for m, v in out.items()}


def clip_scores(embed_dir, img: np.ndarray) -> np.ndarray:
    """score_clip: image-caption cosine from the embed unit's two towers."""
    from stages.kernels.coresets.clipcov import clipscore

    path = embed_dir / "text_embeddings.npy"
    if not path.exists():
        raise CurateError("score clip: needs caption embeddings (embed/text_embeddings.npy): the dataset has no "
                          "captions, or embed.method is proxy (use proxy_clip or open_clip)")
    return clipscore(img, load_checked(path, "score clip: text embeddings"))


def out_of_fold_probs(images: np.ndarray, labels: np.ndarray, folds: np.ndarray, *, num_classes: int, epochs: int,
                      arch: str, width: int | None, batch_size: int, lr: float, seed: int, device,
                      progress=None) -> np.ndarray:
    """float32 [N, C]: row i from the model trained on every fold but i's (fold f: seed + f)."""
    from stages.learn.models import build_model, seeded_init
    from stages.learn.trainer import features_and_probs, train_classifier

    probs = np.zeros((len(labels), num_classes), np.float32)
    for f in range(int(folds.max()) + 1):
        held = folds == f
        model = seeded_init(seed + f, lambda: build_model(arch, images.shape[1:], num_classes, width=width))
        train_classifier(model, images[~held], labels[~held], epochs=epochs, batch_size=batch_size, lr=lr,
                         seed=seed + f, device=device, num_classes=num_classes, progress=progress)
        probs[held] = features_and_probs(model, images[held], device=device)[1]
    return probs


LABEL_ISSUES_STEPS = 500  # label_issues.epochs null: enough epochs for this many steps per fold model, at least 2


def fold_epochs(epochs: int | None, n_train: int, batch_size: int) -> int:
    """The fold models' epochs: as configured, or (null) enough for LABEL_ISSUES_STEPS optimiser
    steps, so a small pool's models are not left undertrained (their flags would be noise)."""
    if epochs is not None:
        return epochs
    return max(2, -(-LABEL_ISSUES_STEPS // max(1, -(-n_train // batch_size))))


def label_issues(ctx: StageContext, table, labels: np.ndarray) -> np.ndarray:
    """score_label_issues of the pool; writes score/oof_probs.npy, score/label_issues.parquet
    (row, uid, flagged, likely_label) and the detection's metrics."""
    from stages.learn.models import proxy_arch

    c = ctx.config["label_issues"]
    k = c["folds"]
    counts = np.bincount(labels)
    small = np.flatnonzero((counts > 0) & (counts < k))
    if len(small):
        raise CurateError(f"score label_issues: class {int(small[0])} has {int(counts[small[0]])} samples, fewer than "
                          f"score.label_issues.folds ({k}): lower folds")
    start, cpu = time.perf_counter(), time.process_time()
    images = ctx.images(table, ctx.config["image_size"])
    folds = stratified_folds(labels, k, ctx.config["seed"])
    epochs = fold_epochs(c["epochs"], int((folds != 0).sum()), c["batch_size"])
    with ctx.progress(k * epochs, f"score: label_issues {k} folds x {epochs} epochs") as step:
        probs = out_of_fold_probs(images, labels, folds, num_classes=num_classes_of(ctx.entry, labels),
                                  epochs=epochs, arch=proxy_arch(c["arch"], min(images.shape[2:])),
                                  width=c["width"], batch_size=c["batch_size"], lr=c["lr"], seed=ctx.config["seed"],
                                  device=ctx.device, progress=step)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if not np.isfinite(probs).all():
        raise CurateError("score label_issues: training diverged (non-finite outputs); lower score.label_issues.lr")
    np.save(ctx.out / "oof_probs.npy", probs)
    issue, likely = find_label_issues(probs, labels)
    flags = pa.table({"row": table.column("row"), "uid": table.column("uid"), "flagged": pa.array(issue),
                      "likely_label": pa.array(likely, pa.int32(), mask=likely < 0)})
    write_parquet(flags, ctx.out / "label_issues.parquet", stage="score", stage_version=ScoreStage.version,
                  fingerprint=ctx.fingerprint)
    ctx.metrics["label_issues"] = {"flagged": int(issue.sum()), "flagged_fraction": float(issue.mean()),
                                   "flagged_per_class": np.bincount(labels[issue], minlength=len(counts)).tolist(),
                                   "oof_accuracy": float((probs.argmax(1) == labels).mean()), "epochs": epochs,
                                   "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3)}  # images read + fold models
    return label_issue_score(probs, labels)


KNN_SCORES = {"knn_shapley", "prototype"}  # scores that search neighbours or run k-means (stages.kernels.knn)


class ScoreStage(Stage):
    name = "score"
    version = 2  # 2: knn_shapley and prototype follow the `knn:` section (exact where affordable)
    resources = Resources(cpus=1)  # kernels use a GPU when the run has one, and need none

    def units(self, cfg):
        return ["score"] if cfg.score.methods else []

    def unit_resources(self, cfg, sel):
        return Resources(cpus=1, gpus=1) if "label_issues" in cfg.score.methods else self.resources  # trains

    def config(self, cfg, sel, entry=None):
        """label_issues' settings (and the image size its networks read, embed's) only where it is
        computed, the `knn:` section only where knn_shapley or prototype is: runs without them keep
        their fingerprints."""
        c = {"seed": cfg.seed, **cfg.score.model_dump(exclude={"label_issues"})}
        if KNN_SCORES & set(cfg.score.methods):  # the `knn:` section, only where a score searches neighbours
            c["knn"] = cfg.knn.model_dump()
        if "label_issues" in cfg.score.methods:
            c.update(label_issues=cfg.score.label_issues.model_dump(), image_size=cfg.embed.image_size)
        return c

    def upstream(self, cfg, sel):
        return ["index", "embed"]

    def run(self, ctx: StageContext) -> None:
        c = ctx.config
        pool = ctx.index()
        index, labels = pool.table, pool.labels
        labelled = scores_needing("labels", c["methods"])
        if labelled and (labels < 0).any():
            raise CurateError(f"score {', '.join(labelled)}: needs labels; some training samples have none")
        counts = np.bincount(labels[labels >= 0], minlength=1)
        if "prototype" in c["methods"] and c["prototype_per_class"] and (counts[counts > 0] < 2).any():
            raise CurateError(f"score prototype per class: class {int(np.flatnonzero((counts > 0) & (counts < 2))[0])} has one sample")
        embed = ctx.input_dir("embed")
        # [N, D] float32, held only where a method reads the embeddings (knn_shapley, prototype, influence, clip)
        emb = load_checked(embed / "embeddings.npy", "score: embeddings") \
            if scores_needing("embeddings", c["methods"]) else np.zeros((len(labels), 0), np.float32)
        val_emb = val_labels = None
        if (embed / "val_embeddings.npy").exists() and scores_needing("validation", c["methods"]):
            val_emb = load_checked(embed / "val_embeddings.npy", "score: validation embeddings")
            val_labels = ctx.index("val").labels
        dynamic = sorted(scores_needing("dynamics", c["methods"]))
        if dynamic and not (embed / "probs.npy").exists():
            raise CurateError(f"score {', '.join(dynamic)}: needs the proxy's training dynamics (embed.method: proxy)")
        probs = np.load(embed / "probs.npy") if dynamic else np.zeros((1, 1, len(labels), 1), np.float16)
        hnorm = np.load(embed / "hnorm.npy") if dynamic else np.zeros((1, 1, len(labels)), np.float32)
        scores = compute_scores(labelled, labels=labels, probs=probs, hnorm=hnorm, emb=emb, val_emb=val_emb, val_labels=val_labels,
                                el2n_epoch=c["el2n_epoch"], knn_k=c["knn_k"], prototype_clusters=c["prototype_clusters"],
                                prototype_per_class=c["prototype_per_class"], seed=c["seed"], device=ctx.device,
                                val_probs=np.load(embed / "val_probs.npy") if (embed / "val_probs.npy").exists() else None,
                                influence_damping=c["influence_damping"], knn=c.get("knn"))
        if "clip" in c["methods"]:
            scores = {**scores, "clip": clip_scores(embed, emb)}
        if "label_issues" in c["methods"]:
            scores = {**scores, "label_issues": label_issues(ctx, index, labels)}
        scores = {m: scores[m] for m in c["methods"]}  # columns in the config's order
        table = pa.table({"row": index.column("row"), "uid": index.column("uid"),
                          **{f"score_{m}": pa.array(v, pa.float32()) for m, v in scores.items()}})
        write_parquet(table, ctx.out / "scores.parquet", stage=self.name, stage_version=self.version,
                      fingerprint=ctx.fingerprint)
        ctx.metrics.update({f"{m}_mean": float(v.mean()) for m, v in scores.items()})
