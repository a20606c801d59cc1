"""The selection methods: each method `m` of the config (pipeline.config.select) is the function
`_m` here, (pool, spec, k, seed, device) -> (positions in the pool in selection order, weights or
None, metrics); k is None for dedup and clean, which have no budget. Kernels live in
pipeline.sampling and stages.kernels.coresets; this module only wires a Pool's arrays to them.

Per-group methods (craig, gradmatch per class, clipcov, sas: SPLITTABLE) read their groups and budgets from
`pool.groups(spec, k)`, so that a part of a split selection runs the same code on its groups.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from pipeline.config import SELECT_METHODS
from pipeline.errors import CurateError
from pipeline.manifest import read_parquet
from pipeline.sampling import random_subset, stratified_subset

log = logging.getLogger("curate.select")
SPLITTABLE = ("craig", "gradmatch", "clipcov", "sas")  # per-group methods that run in parts (select_part units)
COUNTS = ("omp_selected", "topped_up")  # per-part metrics that add up when parts are joined


def _random(pool, spec, k, seed, device):
    return random_subset(len(pool.rows), k, seed), None, {}


def _stratified(pool, spec, k, seed, device):
    return stratified_subset(pool.labels, k, seed), None, {}


def _craig(pool, spec, k, seed, device):
    from stages.kernels.coresets.facility import craig

    groups, alloc = pool.groups(spec, k)
    pos, w, info = craig(pool.features(spec.features, device), groups, alloc, metric=spec.metric,
                         optimizer=spec.optimizer, eps=spec.eps, graph=spec.graph, dense_max=spec.dense_max,
                         knn=spec.knn, knn_options=pool.knn, seed=seed)
    for c in info["saturated"]:
        log.warning("select %s: class %d has fewer distinct feature vectors than its budget; "
                    "later picks add nothing and tied samples share weight", spec.sel_name, c)
    return pos, w, info


def _gradmatch(pool, spec, k, seed, device):
    from stages.kernels.coresets.gradmatch import gradmatch_per_batch, gradmatch_per_class

    feats = pool.features(spec.features, device)  # per class, gradients are built one class at a time
    if spec.per == "batch":
        grads = feats.dense().cpu().numpy()
        return gradmatch_per_batch(grads, k, batch_size=spec.batch_size, lam=spec.lam, tol=spec.tol,
                                   seed=seed, device=device)
    groups, alloc = pool.groups(spec, k)
    return gradmatch_per_class(feats, groups, alloc, lam=spec.lam, tol=spec.tol, seed=seed, device=device)


def _difficulty(pool, spec, k, seed, device):
    from stages.kernels.coresets.pruning import difficulty_subset

    labels = pool.labels if spec.class_balanced else None
    pos, kept = difficulty_subset(pool.difficulty(spec.score), labels, k, keep=spec.keep,
                                  class_balanced=spec.class_balanced, auto_threshold=spec.auto_threshold)
    return pos, None, {"kept": kept}


def _ccs(pool, spec, k, seed, device):
    from stages.kernels.coresets.pruning import ccs_subset

    return ccs_subset(pool.difficulty(spec.score), k, beta=spec.beta, bins=spec.bins, seed=seed), None, {}


CONTENT_MAX_SIDE = 64  # content dedup: larger images, or a pool of mixed sizes, are resized to this square first


def _content_dedup(pool, spec, device):
    """Content-feature dedup of the pool's images: thumbnails batch by batch (one pass), then the
    pairwise walk, which reads each block's pixels again for its shifted views (a second pass):
    memory holds [N, 256] features and one block of images, never the whole pool's pixels."""
    from stages.kernels.content import shifted_thumbnails, thumbnails
    from stages.kernels.coresets.dedup import BLOCK, content_dedup

    ctx = pool.ctx
    table = ctx.index().table.take(pa.array(pool.rows))
    shapes = ctx.upstream("index").record.get("metrics", {}).get("image_shapes") or []
    size = None if len(shapes) == 1 and max(shapes[0][:2]) <= CONTENT_MAX_SIDE else CONTENT_MAX_SIDE
    n = len(pool.rows)

    def read(s, e):
        return ctx.images(table.slice(s, e - s), size)

    blocks = [(s, min(s + BLOCK, n)) for s in range(0, n, BLOCK)]
    with ctx.progress(n, f"select {spec.sel_name}: content features", " img") as step:
        parts = []
        for s, e in blocks:
            parts.append(thumbnails(read(s, e), device=device))
            step(e - s)
    feats = np.concatenate([p.cpu().numpy() for p in parts]) if parts else np.zeros((0, 1), np.float32)
    with ctx.progress(n, f"select {spec.sel_name}: comparing", " img") as step:
        def views(s, e):
            v = shifted_thumbnails(read(s, e), device=device)
            step(e - s)
            return v

        return content_dedup(feats, eps=spec.eps, views=views, device=device, block=BLOCK)


def _dedup(pool, spec, k, seed, device):
    from stages.kernels.coresets.dedup import check_removed, nn_quantiles, removed_per_class, semdedup_walk

    if spec.features == "content":
        res = _content_dedup(pool, spec, device)
    else:
        # its own copy of the embeddings, which the walk overwrites with unit rows: one [N, D] array
        res = semdedup_walk(pool.load("embeddings.npy"), eps=spec.eps, clusters=spec.clusters, seed=seed,
                            device=device, center=spec.center, knn=pool.knn, overwrite=True)
    check_removed(res, eps=spec.eps, max_removed=spec.max_removed, what=f" ({spec.features} features)")
    keep = res.keep
    removed = removed_per_class(keep, pool.labels) if (pool.labels >= 0).all() else {}
    twins = res.dup_of >= 0
    columns = {"dup_of": (pa.int64(), pool.rows[np.maximum(res.dup_of, 0)], twins),
               "dup_similarity": (pa.float32(), res.dup_sim.astype(np.float32), twins)}
    return np.flatnonzero(keep), None, {"removed": int((~keep).sum()), "removed_per_class": removed,
                                        "features": spec.features, "threshold": round(1.0 - spec.eps, 6),
                                        "nn_similarity": nn_quantiles(res.nn_sim), "columns": columns}


def _clean(pool, spec, k, seed, device):
    """Keep the candidates that are not suspected label issues (row order): those label_issues
    flagged (score/label_issues.parquet), or the worst `fraction` by the score (ties: the earlier
    row goes first)."""
    if spec.fraction is None:
        flags = read_parquet(pool.ctx.input_dir("score") / "label_issues.parquet", ["flagged"])
        drop = flags.column(0).to_numpy(zero_copy_only=False)[pool.rows]
        if drop.mean() > spec.max_removed:
            raise CurateError(f"clean would remove {drop.mean():.1%} of its pool ({int(drop.sum())} of {len(drop)}) as "
                              f"label issues, more than max_removed {spec.max_removed:g}: check score/oof_probs.npy "
                              "(undertrained fold models flag much: score.label_issues.epochs), or raise max_removed")
    else:
        bad = pool.difficulty(spec.score)  # higher = worse; value scores negated
        drop = np.zeros(len(bad), bool)
        drop[np.argsort(-bad, kind="stable")[:int(round(spec.fraction * len(bad)))]] = True
    if drop.all():
        raise CurateError(f"clean by {spec.score} drops every one of its {len(drop)} candidates")
    labelled = (pool.labels >= 0).all()
    per_class = np.bincount(pool.labels[drop], minlength=int(pool.labels.max()) + 1).tolist() if labelled else []
    return np.flatnonzero(~drop), None, {"removed": int(drop.sum()), "removed_per_class": per_class}


def _clipcov(pool, spec, k, seed, device):
    from stages.kernels.coresets.clipcov import clipcov

    groups, alloc = pool.groups(spec, k)
    img, txt = pool.on_disk("embeddings.npy"), pool.on_disk("text_embeddings.npy")  # read a bucket of groups at a time
    return clipcov(img, txt, groups, alloc, lam=spec.lam, gate=spec.gate, pool_factor=spec.pool_factor,
                   device=device, seed=seed, base=pool.unrelated_score(), buckets=pool.buckets)


def _clipscore(pool, spec, k, seed, device):
    from stages.kernels.coresets.clipcov import clipscore, clipscore_filter

    scores = clipscore(pool.embeddings, pool.text_embeddings)
    pos = clipscore_filter(scores, k=k, threshold=spec.threshold)
    return pos, None, {"min_kept_score": float(scores[pos].min()) if len(pos) else None}


def _sas(pool, spec, k, seed, device):
    from stages.kernels.coresets.clipcov import sas

    groups, alloc = pool.groups(spec, k)
    views = pool.ctx.input_dir("embed") / "image_views.npy"
    feats = pool.load("image_views.npy") if views.exists() else pool.embeddings
    pos, w, info = sas(feats, groups, alloc, device=device, seed=seed, optimizer=spec.optimizer, eps=spec.eps)
    info["features"] = "image_views" if views.exists() else "embeddings"
    return pos, w, info


METHODS = {m: globals()[f"_{m}"] for m in SELECT_METHODS}  # a method without its function fails here


def uses_knn(sel) -> bool:
    """Whether a selection runs a neighbour search or k-means (stages.kernels.knn): craig with a sparse
    (or auto) graph, dedup on embeddings, clipcov and sas with k-means groups. Only those units hold
    the run's `knn:` section in their config, so changing it reruns them and no others."""
    return ((sel.method == "craig" and sel.graph != "dense")
            or (sel.method == "dedup" and sel.features == "embeddings")
            or (sel.method in ("clipcov", "sas") and sel.groups == "kmeans"))


