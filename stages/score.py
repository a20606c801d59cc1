"""score: per-sample scores joined into score/scores.parquet (row, uid, score_<name>).

Methods (higher = harder / less valuable, except knn_shapley where higher = more
valuable): el2n, grand (last-layer closed form), forgetting, loss, margin (all from
the proxy's recorded dynamics), knn_shapley (on embeddings, w.r.t. the validation
split index/val.parquet), prototype (distance to nearest k-means centroid), influence
(last-layer influence on the validation loss, exact Hessian, damped; higher = more helpful),
clip (cosine of each image embedding with its caption's: the DataComp CLIP score; higher =
better aligned pair; needs embed/text_embeddings.npy and no labels).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.errors import CurateError
from pipeline.manifest import read_parquet, write_parquet
from pipeline.methods import scores_needing
from pipeline.stage import Resources, Stage, StageContext

from stages.kernels.scores import dynamics
from stages.kernels.scores.influence import influence_last_layer
from stages.kernels.scores.knn_shapley import knn_shapley
from stages.kernels.scores.prototype import prototype_distance


def compute_scores(methods: list[str], *, labels: np.ndarray, probs: np.ndarray, hnorm: np.ndarray,
                   emb: np.ndarray, val_emb: np.ndarray | None, val_labels: np.ndarray | None,
                   el2n_epoch: int, knn_k: int, prototype_clusters: int | None, prototype_per_class: bool,
                   seed: int, device, val_probs: np.ndarray | None = None,
                   influence_damping: float = 0.01) -> dict[str, np.ndarray]:
    """Every requested score as float32 [N]. probs [S, E, N, C], hnorm [S, E, N]."""
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
            out[m] = knn_shapley(emb, labels, val_emb, val_labels, k=knn_k, device=device)
        elif m == "influence":
            if val_emb is None or val_probs is None:
                raise CurateError("score influence: needs the proxy's validation outputs (embed.method: proxy)")
            # seed 0's final model: the one whose features `emb` holds
            out[m] = influence_last_layer(probs[0, -1].astype(np.float32), labels, emb, val_probs, val_labels,
                                          val_emb, damping=influence_damping)
        elif m == "prototype":
            k = prototype_clusters or int(labels.max()) + 1
            out[m] = prototype_distance(emb, k, labels=labels if prototype_per_class else None, seed=seed, device=device)
    return {m: np.asarray(v, np.float32) for m, v in out.items()}


def clip_scores(embed_dir, img: np.ndarray) -> np.ndarray:
    """score_clip: image-caption cosine from the embed unit's two towers."""
    from stages.kernels.coresets.clipcov import clipscore

    path = embed_dir / "text_embeddings.npy"
    if not path.exists():
        raise CurateError("score clip: needs caption embeddings (embed/text_embeddings.npy): the dataset has no "
                          "captions, or embed.method is proxy (use proxy_clip or open_clip)")
    txt = np.load(path).astype(np.float32)
    bad = ~np.isfinite(txt).all(1)
    if bad.any():
        raise CurateError(f"score clip: text embeddings row {int(np.flatnonzero(bad)[0])} is NaN or infinite")
    return clipscore(img, txt)


class ScoreStage(Stage):
    name = "score"
    version = 1
    resources = Resources(cpus=1)  # kernels use a GPU when the run has one, and need none

    def units(self, cfg):
        return ["score"] if cfg.score.methods else []

    def config(self, cfg, sel, entry=None):
        return {"seed": cfg.seed, **cfg.score.model_dump()}

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
        emb = np.load(embed / "embeddings.npy").astype(np.float32)
        if not np.isfinite(emb).all():
            raise CurateError(f"score: embeddings row {int(np.flatnonzero(~np.isfinite(emb).all(1))[0])} is NaN or infinite")
        val_emb = val_labels = None
        if (embed / "val_embeddings.npy").exists():
            val_emb = np.load(embed / "val_embeddings.npy").astype(np.float32)
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
                                influence_damping=c["influence_damping"])
        if "clip" in c["methods"]:
            scores = {**scores, "clip": clip_scores(embed, emb)}
            scores = {m: scores[m] for m in c["methods"]}  # columns in the config's order
        table = pa.table({"row": index.column("row"), "uid": index.column("uid"),
                          **{f"score_{m}": pa.array(v, pa.float32()) for m, v in scores.items()}})
        write_parquet(table, ctx.out / "scores.parquet", stage=self.name, stage_version=self.version,
                      fingerprint=ctx.fingerprint)
        ctx.metrics.update({f"{m}_mean": float(v.mean()) for m, v in scores.items()})
