"""select: one unit per selection spec, writing select/<sel>/selection.parquet.

Every index row appears once, with `selected`, `weight` (1.0 for methods without
weights), `rank` (selection order, null when not selected), `method` and `budget`.
A spec with `pool: <other selection>` chooses among that selection's rows only (dedup
first, then any method); its budget still counts against the whole index.

Methods (kernels in pipeline.sampling and stages.kernels.coresets):
- random, stratified;
- craig: per-class facility location with CRAIG weights;
- gradmatch: non-negative OMP matching the per-class (or per-batch) gradient;
- difficulty: the hardest / easiest by a score column (value scores count as
  difficulty negated: low value = hard);
- ccs: coverage-centric selection over score strata;
- dedup: near-duplicates by content (the pixels, read here batch by batch; the default) or
  SemDeDup on the embeddings; its `budget` column holds the kept fraction, `dup_of` and
  `dup_similarity` each removed sample's kept twin;
- clean: drops suspected label issues (label_issues' flagged samples, or the worst `fraction`
  by a score); no budget either, its `budget` column holds the kept fraction;
- image-caption pairs (embed/embeddings.npy and text_embeddings.npy): clipcov (cross-covariance
  preserving greedy per pseudo-class), clipscore (top pairs by image-caption cosine, or a
  threshold), sas (facility location per pseudo-class on augmented-view image embeddings).
  Pseudo-classes: k-means on the image embeddings, or the labels (`groups: labels`).

Neighbour searches and k-means (craig's sparse graph, SemDeDup's and the pseudo-classes' k-means)
follow the run's `knn:` section (pipeline.config.knn), passed to the kernels as a plain dict.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import SELECT_METHODS
from pipeline.errors import CurateError
from pipeline.manifest import SELECTION_FIELDS, read_parquet, write_parquet
from pipeline.methods import VALUE_SCORES, providers
from pipeline.sampling import budget_count, proportional_allocation, random_subset, stratified_subset
from pipeline.stage import Resources, Stage, StageContext

log = logging.getLogger("curate.select")


def selection_table(index: pa.Table, rows: np.ndarray, weights: np.ndarray | None,
                    method: str, budget: float) -> pa.Table:
    """The index plus selection columns, for rows selected in order `rows`."""
    n = index.num_rows
    selected = np.zeros(n, bool)
    selected[rows] = True
    rank = np.full(n, -1, np.int32)
    rank[rows] = np.arange(len(rows), dtype=np.int32)
    weight = np.ones(n, np.float32)
    if weights is not None:
        weight[rows] = np.asarray(weights, np.float32)
    cols = {
        "selected": pa.array(selected),
        "weight": pa.array(weight, pa.float32()),
        "rank": pa.array(rank, pa.int32(), mask=rank < 0),
        "method": pa.array([method] * n, pa.string()),
        "budget": pa.array(np.full(n, float(budget)), pa.float64()),
    }
    out = index
    for name, typ in SELECTION_FIELDS:
        out = out.append_column(pa.field(name, typ), cols[name])
    return out


@dataclass
class Pool:
    """The candidates of one selection (index rows, in row order) and lazy access to the
    upstream arrays a method reads, restricted to those rows."""

    ctx: StageContext
    rows: np.ndarray
    labels: np.ndarray

    def _load(self, name: str) -> np.ndarray:
        path = self.ctx.input_dir("embed") / name
        if not path.exists():
            raise CurateError(f"needs embed/{name}, which embed.method "
                              f"'{self.ctx.cfg.embed.method}' does not write (use embed.method: proxy or features: embeddings)")
        x = np.load(path, mmap_mode="r")[self.rows].astype(np.float32)  # reads only the pool's rows
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            raise CurateError(f"embed/{name} row {int(self.rows[np.flatnonzero(bad)[0]])} is NaN or infinite")
        return x

    @cached_property
    def embeddings(self) -> np.ndarray:
        return self._load("embeddings.npy")

    @cached_property
    def text_embeddings(self) -> np.ndarray:
        path = self.ctx.input_dir("embed") / "text_embeddings.npy"
        if not path.exists():
            raise CurateError("needs caption embeddings (embed/text_embeddings.npy): the dataset has no captions, "
                              "or embed.method is proxy (use proxy_clip or open_clip)")
        return self._load("text_embeddings.npy")

    def pair_groups(self, spec, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(pseudo-class per candidate, picks per pseudo-class) for image-caption methods:
        labels where the spec asks for them, else k-means on the image embeddings."""
        if spec.groups == "labels":
            if (self.labels < 0).any():
                raise CurateError("groups: labels, but some samples have no label (use groups: kmeans)")
            return self.class_alloc(k)
        from stages.kernels.coresets.clipcov import kmeans_groups

        groups = kmeans_groups(self.embeddings, min(spec.clusters, len(self.rows)), seed=self.ctx.cfg.seed,
                               device=self.ctx.device, knn=self.knn)
        return groups, proportional_allocation(np.bincount(groups), k)

    @property
    def knn(self) -> dict | None:
        """The run's `knn:` section as the unit's fingerprint holds it (None where the method uses none)."""
        return self.ctx.config.get("knn")

    def features(self, kind: str, device):
        """Feature space for similarity / matching: last-layer gradients, p - y, or embeddings."""
        from stages.kernels.coresets.features import last_layer, plain

        if kind == "embeddings":
            return plain(self.embeddings, device)
        err = self._load("grads.npy")
        return plain(err, device) if kind == "bias_gradients" else last_layer(err, self.embeddings, device)

    def difficulty(self, score: str) -> np.ndarray:
        """Higher = harder; value scores (knn_shapley, influence) are negated."""
        table = read_parquet(self.ctx.input_dir("score") / "scores.parquet", [f"score_{score}"])
        s = table.column(0).to_numpy().astype(np.float64)[self.rows]
        bad = np.flatnonzero(~np.isfinite(s))
        if len(bad):
            raise CurateError(f"score_{score} of row {int(self.rows[bad[0]])} is NaN or infinite")
        return -s if score in VALUE_SCORES else s

    def class_alloc(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(class ids per candidate, picks per class): budget split in proportion to class
        size, at least one per non-empty class. Unlabelled pools are one class."""
        if (self.labels < 0).all():
            groups = np.zeros(len(self.labels), np.int64)
        elif (self.labels < 0).any():
            raise CurateError(f"per-class selection needs a label on every sample "
                              f"(row {int(self.rows[np.flatnonzero(self.labels < 0)[0]])} has none)")
        else:
            groups = self.labels
        return groups, proportional_allocation(np.bincount(groups), k)


# Each method `m` of the config (pipeline.config.select) is the function `_m` here:
# (pool, spec, k, seed, device) -> (positions in the pool in selection order, weights or None,
# metrics). k is None for dedup, which has no budget.
def _random(pool, spec, k, seed, device):
    return random_subset(len(pool.rows), k, seed), None, {}


def _stratified(pool, spec, k, seed, device):
    return stratified_subset(pool.labels, k, seed), None, {}


def _craig(pool, spec, k, seed, device):
    from stages.kernels.coresets.facility import craig

    groups, alloc = pool.class_alloc(k)
    pos, w, info = craig(pool.features(spec.features, device), groups, alloc, metric=spec.metric,
                         optimizer=spec.optimizer, eps=spec.eps, graph=spec.graph, dense_max=spec.dense_max,
                         knn=spec.knn, knn_options=pool.knn, seed=seed)
    for c in info["saturated"]:
        log.warning("select %s: class %d has fewer distinct feature vectors than its budget; "
                    "later picks add nothing and tied samples share weight", spec.sel_name, c)
    return pos, w, info


def _gradmatch(pool, spec, k, seed, device):
    from stages.kernels.coresets.gradmatch import gradmatch_per_batch, gradmatch_per_class, matching_error

    feats = pool.features(spec.features, device)  # per class, gradients are built one class at a time
    if spec.per == "batch":
        grads = feats.dense().cpu().numpy()
        pos, w, info = gradmatch_per_batch(grads, k, batch_size=spec.batch_size, lam=spec.lam, tol=spec.tol,
                                           seed=seed, device=device)
    else:
        groups, alloc = pool.class_alloc(k)
        pos, w, info = gradmatch_per_class(feats, groups, alloc, lam=spec.lam, tol=spec.tol, seed=seed, device=device)
    info["matching_error"] = matching_error(feats, pos, w)
    return pos, w, info


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
        res = semdedup_walk(pool.embeddings, eps=spec.eps, clusters=spec.clusters, seed=seed, device=device,
                            center=spec.center, knn=pool.knn)
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
    from stages.kernels.coresets.clipcov import clipcov, cross_cov_error

    groups, alloc = pool.pair_groups(spec, k)
    img, txt = pool.embeddings, pool.text_embeddings
    pos, w, info = clipcov(img, txt, groups, alloc, lam=spec.lam, gate=spec.gate, pool_factor=spec.pool_factor,
                           device=device, seed=seed)
    info["cross_cov_error"] = cross_cov_error(img, txt, pos, w)
    return pos, w, info


def _clipscore(pool, spec, k, seed, device):
    from stages.kernels.coresets.clipcov import clipscore, clipscore_filter

    scores = clipscore(pool.embeddings, pool.text_embeddings)
    pos = clipscore_filter(scores, k=k, threshold=spec.threshold)
    return pos, None, {"min_kept_score": float(scores[pos].min()) if len(pos) else None}


def _sas(pool, spec, k, seed, device):
    from stages.kernels.coresets.clipcov import sas

    groups, alloc = pool.pair_groups(spec, k)
    views = pool.ctx.input_dir("embed") / "image_views.npy"
    feats = pool._load("image_views.npy") if views.exists() else pool.embeddings
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


class SelectStage(Stage):
    name = "select"
    version = 3
    per_selection = True
    resources = Resources(cpus=1)  # kernels use a GPU when the run has one, and need none

    def config(self, cfg, sel, entry=None):
        c = {"seed": cfg.seed, **sel.params()}
        if uses_knn(sel):
            c["knn"] = cfg.knn.model_dump()
        return c

    def upstream(self, cfg, sel):
        units = providers(sel.needs)
        ups = ["index"] + [u for u in ("embed", "score") if u in units]
        if sel.pool:
            ups.append(f"select/{sel.pool}")
        return ups

    def run(self, ctx: StageContext) -> None:
        try:
            self._select(ctx)
        except CurateError as exc:  # one place names the selection, for every method's errors
            raise CurateError(f"select {ctx.sel.sel_name}: {exc}") from None

    def _select(self, ctx: StageContext) -> None:
        spec = ctx.sel
        pool = ctx.index()
        index, labels = pool.table, pool.labels
        rows = np.arange(index.num_rows)
        if spec.pool:
            chosen = read_parquet(ctx.input_dir(f"select/{spec.pool}") / "selection.parquet", ["row", "selected"])
            rows = chosen.filter(pc.field("selected")).column("row").to_numpy()
        pool = Pool(ctx, np.sort(rows), labels[np.sort(rows)])
        k = None
        if spec.budget is not None:
            k = budget_count(spec.budget, index.num_rows)
            if k > len(pool.rows):
                raise CurateError(f"budget {k} is larger than its pool "
                                  f"'{spec.pool}' ({len(pool.rows)} samples)")
        pos, weights, info = METHODS[spec.method](pool, spec, k, ctx.cfg.seed, ctx.device)
        chosen_rows = pool.rows[np.asarray(pos, np.int64)]
        budget = spec.budget if spec.budget is not None else len(chosen_rows) / index.num_rows
        table = selection_table(index, chosen_rows, weights, spec.method, budget)
        for name, (typ, values, valid) in info.pop("columns", {}).items():  # per candidate (dedup's twins)
            full = np.zeros(index.num_rows, values.dtype)
            full[pool.rows] = values
            null = np.ones(index.num_rows, bool)
            null[pool.rows] = ~valid
            table = table.append_column(pa.field(name, typ), pa.array(full, typ, mask=null))
        write_parquet(table, ctx.out / "selection.parquet", stage=self.name, stage_version=self.version,
                      fingerprint=ctx.fingerprint, extra={"selection": spec.sel_name})
        has_labels = (labels[chosen_rows] >= 0).any()
        ctx.metrics.update({"selected": int(len(chosen_rows)), "of": index.num_rows, "pool": int(len(pool.rows)),
                            "per_class": np.bincount(labels[chosen_rows][labels[chosen_rows] >= 0]).tolist() if has_labels else [],
                            **json.loads(json.dumps(info, default=_plain))})


def _plain(x):
    """numpy scalars and arrays in metrics, as JSON."""
    return x.tolist() if hasattr(x, "tolist") else str(x)
