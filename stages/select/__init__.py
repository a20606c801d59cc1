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

Work that splits: craig, gradmatch (per: class), clipcov and sas choose per group (class or k-means
pseudo-class). With `parts: P` such a selection runs as P `select_part/<sel>@<p>` units, each on a
contiguous range of group ids (the flow spreads them over workers), and `select/<sel>` joins their
picks: the same rows, weights and ranks as one unit, since groups are independent and seeded per
group. Whole-pool figures (clipcov's cross-covariance error, gradmatch's matching error) are
computed at the join, which reads the pool's embeddings for them.

Memory: a unit holds the index table (Arrow columns), per-row arrays of the pool, and the
embeddings of the rows it works on ([n, D], the whole pool's for an unsplit selection); see
stages.select.pool.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import CurateError
from pipeline.manifest import SELECTION_FIELDS, read_parquet, write_parquet
from pipeline.methods import providers
from pipeline.sampling import budget_count
from pipeline.stage import Resources, Stage, StageContext

from .methods import COUNTS, METHODS, SPLITTABLE, uses_knn
from .pool import Pool

log = logging.getLogger("curate.select")

__all__ = ["METHODS", "Pool", "SelectPartStage", "SelectStage", "selection_table", "uses_knn"]


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
        "method": pa.repeat(pa.scalar(method, pa.string()), n),
        "budget": pa.array(np.full(n, float(budget)), pa.float64()),
    }
    out = index
    for name, typ in SELECTION_FIELDS:
        out = out.append_column(pa.field(name, typ), cols[name])
    return out


def _candidates(ctx: StageContext) -> tuple[pa.Table, Pool, int | None]:
    """(index table, the selection's whole pool, budget in samples or None)."""
    spec = ctx.sel
    pool = ctx.index()
    index, labels = pool.table, pool.labels
    rows = np.arange(index.num_rows)
    if spec.pool:
        chosen = read_parquet(ctx.input_dir(f"select/{spec.pool}") / "selection.parquet", ["row", "selected"])
        rows = np.sort(chosen.filter(pc.field("selected")).column("row").to_numpy())
    whole = Pool(ctx, rows, labels[rows])
    k = None
    if spec.budget is not None:
        k = budget_count(spec.budget, index.num_rows)
        if k > len(whole.rows):
            raise CurateError(f"budget {k} is larger than its pool '{spec.pool}' ({len(whole.rows)} samples)")
    return index, whole, k


def parts_of(spec) -> list[str]:
    """The select_part units of a selection split in `parts` (none for one part)."""
    n = spec.parts if spec.method in SPLITTABLE else 1
    return [f"select_part/{spec.sel_name}@{g:03d}" for g in range(n)] if n > 1 else []


def _merge_info(infos: list[dict]) -> dict:
    """Per-part metrics as one unit's: per-group dicts joined in group order, lists concatenated in
    part order, counts (COUNTS) added up, settings taken from the first part."""
    out: dict = {}
    for info in infos:
        for key, val in info.items():
            if key in COUNTS:
                out[key] = out.get(key, 0) + val
            elif isinstance(val, dict):
                out.setdefault(key, {}).update(val)
            elif isinstance(val, list):
                out.setdefault(key, []).extend(val)
            else:
                out.setdefault(key, val)
    for key, val in out.items():
        if isinstance(val, dict) and all(str(k).isdigit() for k in val):
            out[key] = dict(sorted(val.items(), key=lambda kv: int(kv[0])))
    return out


def work_units(spec, groups: np.ndarray, alloc: np.ndarray, dim: int) -> list[np.ndarray]:
    """What a split selection deals out to its parts, in order: each group with a budget on its own,
    or for clipcov its buckets of groups (clipcov.bucket_plan over the whole pool), so that every
    bucket is batched, padded and computed exactly as in one unit."""
    if spec.method == "clipcov":
        from stages.kernels.coresets.clipcov import bucket_plan

        return bucket_plan(np.bincount(groups, minlength=len(alloc)), alloc, dim)
    return [np.array([c], np.int64) for c in np.flatnonzero(alloc)]


def _named(ctx: StageContext, run) -> None:
    try:
        run(ctx)
    except CurateError as exc:  # one place names the selection, for every method's errors
        raise CurateError(f"select {ctx.sel.sel_name}: {exc}") from None


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
        return ups + parts_of(sel)

    def run(self, ctx: StageContext) -> None:
        _named(ctx, self._select)

    def _select(self, ctx: StageContext) -> None:
        spec = ctx.sel
        index, pool, k = _candidates(ctx)
        if parts_of(spec):  # select_part units chose per group; join them in group order
            picks = [read_parquet(ctx.input_dir(u) / "picks.parquet", ["row", "weight", "group"]) for u in parts_of(spec)]
            cols = {c: np.concatenate([t.column(c).to_numpy() for t in picks]) for c in ("row", "weight", "group")}
            order = np.argsort(cols["group"], kind="stable")  # groups in id order, each in its greedy order
            chosen_rows, weights = cols["row"][order].astype(np.int64), cols["weight"][order].astype(np.float32)
            info = _merge_info([json.loads((ctx.input_dir(u) / "info.json").read_text()) for u in parts_of(spec)])
        else:
            pos, weights, info = METHODS[spec.method](pool, spec, k, ctx.cfg.seed, ctx.device)
            chosen_rows = pool.rows[np.asarray(pos, np.int64)]
        if spec.method == "clipcov":  # whole-pool figures: computed here, so parts need not
            info["cross_cov_error"] = pool.cross_cov_error(chosen_rows, weights)
        if spec.method == "gradmatch":
            info["matching_error"] = pool.matching_error(spec.features, chosen_rows, weights, ctx.device)
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
        labels = pool.labels[np.searchsorted(pool.rows, chosen_rows)]
        ctx.metrics.update({"selected": int(len(chosen_rows)), "of": index.num_rows, "pool": int(len(pool.rows)),
                            "per_class": np.bincount(labels[labels >= 0]).tolist() if (labels >= 0).any() else [],
                            **_plain_json(info)})


class SelectPartStage(Stage):
    """One part of a per-group selection (craig, gradmatch per class, clipcov, sas with `parts: P`):
    the groups (classes, or k-means pseudo-classes of the whole pool) with a budget, in id order
    (clipcov: its buckets of groups, work_units), are dealt out in P contiguous runs, and this unit
    runs the method on its groups' rows only, with the budgets the whole pool gives them.
    `select/<sel>` joins the parts in group order; the result is the one a single unit computes (the
    methods treat groups independently, seeded per group), byte for byte. A part left without
    groups picks nothing.

    Memory: the part's rows ([rows, D] per array), plus the labels and group ids of the whole pool;
    k-means groups stream the whole pool's embeddings.
    """

    name = "select_part"
    version = 1
    resources = SelectStage.resources

    def units(self, cfg):
        return [u for s in cfg.select for u in parts_of(s)]

    def item(self, cfg, name):
        return cfg.selection(name.rpartition("@")[0])

    def config(self, cfg, sel, entry=None):
        return SelectStage().config(cfg, sel, entry)

    def upstream(self, cfg, sel):
        return [u for u in SelectStage().upstream(cfg, sel) if not u.startswith("select_part/")]

    def run(self, ctx: StageContext) -> None:
        _named(ctx, self._part)

    def _part(self, ctx: StageContext) -> None:
        spec, g = ctx.sel, int(ctx.unit.rpartition("@")[2])
        _, whole, k = _candidates(ctx)
        groups, alloc = whole.groups(spec, k)
        units = work_units(spec, groups, alloc, whole.stream("embeddings.npy").dim if spec.method == "clipcov" else 0)
        mine_units = [units[i] for i in np.array_split(np.arange(len(units)), spec.parts)[g]]
        owned = np.sort(np.concatenate(mine_units)) if mine_units else np.zeros(0, np.int64)
        if not len(owned):
            log.warning("select %s: part %d of %d has no groups to choose from (%d units of work)",
                        spec.sel_name, g, spec.parts, len(units))
        mine = np.isin(groups, owned)
        budgets = np.zeros_like(alloc)
        budgets[owned] = alloc[owned]
        part = Pool(ctx, whole.rows[mine], whole.labels[mine], whole=whole.rows, split=(groups[mine], budgets),
                    buckets=mine_units if spec.method == "clipcov" else None)
        pos, weights, info = METHODS[spec.method](part, spec, k, ctx.cfg.seed, ctx.device) if len(owned) \
            else (np.zeros(0, np.int64), None, {})
        pos = np.asarray(pos, np.int64)
        weights = np.ones(len(pos), np.float32) if weights is None else np.asarray(weights, np.float32)
        table = pa.table({"row": pa.array(part.rows[pos], pa.int64()), "weight": pa.array(weights, pa.float32()),
                          "group": pa.array(part.split[0][pos], pa.int64())})
        write_parquet(table, ctx.out / "picks.parquet", stage=self.name, stage_version=self.version,
                      fingerprint=ctx.fingerprint)
        (ctx.out / "info.json").write_text(json.dumps(_plain_json(info), indent=1) + "\n")
        ctx.metrics.update({"groups": owned.tolist(), "candidates": int(len(part.rows)), "selected": int(len(pos))})


def _plain_json(info: dict) -> dict:
    """numpy scalars and arrays in metrics, as JSON values."""
    return json.loads(json.dumps(info, default=lambda x: x.tolist() if hasattr(x, "tolist") else str(x)))
