"""`curate inspect --run DIR UNIT`: what a unit decided, shown before anyone trusts it.

A contact sheet (PNG, pipeline.contact_sheet) and a per-class table, for
- a dedup selection: removed images beside the kept twin each was matched to (`dup_of`), with
  the similarity (`dup_similarity`), at evenly spaced similarity ranks (the lowest, where a
  wrong match would show, to the highest);
- scores (`score`) and difficulty / ccs selections: the lowest and highest samples per class;
- image-caption selections (clipcov, clipscore, sas on captioned data): kept and dropped pairs
  with their captions and image-caption cosine;
- any other selection (materialize/<sel> shows its selection): kept and dropped samples per
  class, with the coreset weights;
- distilled sets: the synthetic images per class.
The tables are polars queries over the run's Parquet files (`scan_parquet`); polars is a
dependency of the CLI only (stages/ never import this module). Images are decoded from the
shards the index names (row -> shard, offset).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from .arrays import decode_samples
from .contact_sheet import DROPPED, KEPT, NEUTRAL, Section, Tile, draw
from .errors import CurateError
from .runner import STAGE_FILE, read_run_json
from .shards import MAX_MEMBER_BYTES

RANKED_METHODS = ("difficulty", "ccs")  # selections that keep by a score column


@dataclass
class Inspection:
    unit: str
    view: str  # dedup | ranked | pairs | selection | distilled
    table: pl.DataFrame  # the per-class table
    sections: list[Section]
    drawn: list[Tile] = field(default_factory=list)  # what the sheet shows, in reading order
    out: Path | None = None
    notes: list[str] = field(default_factory=list)  # lines printed under the table

    @property
    def drawn_rows(self) -> list[int | None]:
        return [t.row for t in self.drawn]

    def text(self) -> str:
        lines = [f"{self.unit} ({self.view})", format_table(self.table), *self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------ the run as inspect sees it
class RunView:
    """The parts of a run directory inspect reads: run.json (dataset entry, index limits) and the
    units' outputs. No catalog and no stage code: a finished run is enough."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        body = read_run_json(self.dir)
        if body is None:
            raise CurateError(f"run {self.dir}: no run.json here (not a curate run)")
        self.body = body
        entry = body.get("dataset_entry") or {}
        self.image_exts = (entry.get("fields") or {}).get("image") or ["png"]
        if isinstance(self.image_exts, str):
            self.image_exts = [self.image_exts]
        self.class_names = entry.get("class_names")
        index_cfg = (body.get("config") or {}).get("index") or {}
        self.max_member_bytes = int(index_cfg.get("max_member_bytes", MAX_MEMBER_BYTES))
        self.max_pixels = index_cfg.get("max_pixels")

    def record(self, unit: str) -> dict:
        path = self.dir / unit / STAGE_FILE
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            rec = None
        if not isinstance(rec, dict) or "stage" not in rec:
            have = sorted(str(p.parent.relative_to(self.dir)) for p in self.dir.glob(f"*/{STAGE_FILE}")) + \
                sorted(str(p.parent.relative_to(self.dir)) for p in self.dir.glob(f"*/*/{STAGE_FILE}"))
            raise CurateError(f"run {self.dir}: no finished unit '{unit}' (units here: {', '.join(have) or 'none'})")
        return rec

    def parquet(self, rel: str) -> Path:
        path = self.dir / rel
        if not path.is_file():
            raise CurateError(f"run {self.dir}: {rel} is missing (run the unit that writes it first)")
        return path

    def label_text(self, label) -> str:
        if label is None or label < 0:
            return "no label"
        if self.class_names and label < len(self.class_names):
            return f"{label} {self.class_names[label]}"
        return str(label)

    def images(self, frame: pl.DataFrame) -> dict[int, np.ndarray]:
        """row -> decoded image (H, W[, C]) for the rows of `frame` (columns row, shard, offset)."""
        if frame.height == 0:
            return {}
        frame = frame.unique("row", maintain_order=True)
        imgs, _ = decode_samples(frame["shard"].to_list(), frame["offset"].to_list(), self.image_exts,
                                 self.max_member_bytes, self.max_pixels)
        return dict(zip(frame["row"].to_list(), imgs))


def spread(n: int, k: int) -> np.ndarray:
    """k positions evenly spaced over 0..n-1 (all of them when n <= k), first and last included."""
    if n <= k:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, k)).astype(np.int64))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not np.isfinite(v):
            return str(v)
        return f"{v:.6f}" if 0.99 <= abs(v) < 1 else f"{v:.4g}"  # similarities near 1 keep their digits
    return str(v)


def format_table(df: pl.DataFrame) -> str:
    """Aligned plain text: every row, every column (polars' own repr truncates)."""
    cols = df.columns
    cells = [[_fmt(v) for v in row] for row in df.rows()]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(cols)] + [line(r) for r in cells])


def _with_total(per_class: pl.DataFrame, total: pl.DataFrame) -> pl.DataFrame:
    """Per-class rows then an `all` row (label shown as a string column `class`)."""
    a = per_class.with_columns(pl.col("class").cast(pl.String))
    b = total.with_columns(pl.lit("all").alias("class")).select(a.columns)
    return pl.concat([a, b.cast(a.schema)], how="vertical")


def _class_col(lf: pl.LazyFrame) -> pl.LazyFrame:
    return lf.with_columns(pl.col("label").fill_null(-1).alias("class"))


# ------------------------------------------------------------------ views
def inspect_unit(run_dir: str | Path, unit: str, out: str | Path | None = None, *, per_class: int = 4,
                 pairs: int = 24, score: str | None = None) -> Inspection:
    """Build the table and the sheet of `unit`; write the sheet to `out` when given."""
    run = RunView(Path(run_dir))
    unit = unit.strip("/")
    rec = run.record(unit)
    stage = rec["stage"]
    if stage == "materialize":  # a materialized subset is its selection's rows
        unit = "select/" + unit.split("/", 1)[1]
        rec = run.record(unit)
        stage = rec["stage"]
    if stage == "select":
        result = _selection(run, unit, rec.get("config") or {}, per_class, pairs)
    elif stage == "score":
        result = _scores(run, unit, per_class, score)
    elif stage == "distill":
        result = _distilled(run, unit, per_class)
    else:
        raise CurateError(f"inspect shows select/<sel>, materialize/<sel>, score and distill/<name> units; "
                          f"'{unit}' is a {stage} unit")
    if out is not None:
        result.out = Path(out)
        title = f"{run.dir.name}: {result.unit}"
        result.drawn = draw(result.sections, title, result.out)
    return result


def _selection(run: RunView, unit: str, config: dict, per_class: int, pairs: int) -> Inspection:
    method = config.get("method", "")
    path = run.parquet(f"{unit}/selection.parquet")
    lf = _class_col(pl.scan_parquet(path))
    names = lf.collect_schema().names()
    if method == "dedup":
        return _dedup(run, unit, lf, names, pairs)
    if method in RANKED_METHODS and config.get("score"):
        return _ranked_selection(run, unit, lf, config["score"], per_class)
    has_captions = "caption" in names and lf.select(pl.col("caption").is_not_null().any()).collect().item()
    if has_captions:
        return _pairs(run, unit, lf, per_class)
    return _plain_selection(run, unit, lf, config, per_class)


def _kept_counts(lf: pl.LazyFrame, pool: pl.LazyFrame | None = None) -> tuple[pl.LazyFrame, list[pl.Expr]]:
    """Per-class count expressions shared by the selection views (rows, pool, kept)."""
    aggs = [pl.len().alias("rows")]
    if pool is not None:
        lf = lf.join(pool, on="row", how="left").with_columns(pl.col("in_pool").fill_null(False))
        aggs.append(pl.col("in_pool").sum().alias("pool"))
    aggs.append(pl.col("selected").sum().alias("kept"))
    return lf, aggs


def _per_class(lf: pl.LazyFrame, aggs: list[pl.Expr]) -> pl.DataFrame:
    per = lf.group_by("class").agg(aggs).sort("class").collect()
    total = lf.select(aggs).collect()
    return _with_total(per, total)


def _plain_selection(run: RunView, unit: str, lf: pl.LazyFrame, config: dict, per_class: int) -> Inspection:
    """Kept counts and weight quantiles per class; first picks (by rank) and dropped samples."""
    pool = None
    if config.get("pool"):
        pool = (pl.scan_parquet(run.parquet(f"select/{config['pool']}/selection.parquet"))
                .select("row", pl.col("selected").alias("in_pool")))
    lf, aggs = _kept_counts(lf, pool)
    w = pl.col("weight").filter(pl.col("selected"))
    aggs += [w.min().alias("weight_min"), w.median().alias("weight_median"), w.max().alias("weight_max"),
             w.sum().alias("weight_sum")]
    table = _per_class(lf, aggs)
    in_pool = pl.col("in_pool") if pool is not None else pl.lit(True)
    frame = lf.select("row", "class", "shard", "offset", "selected", "weight", "rank",
                      in_pool.alias("candidate")).collect()
    rows = []
    for c in sorted(frame["class"].unique().to_list()):
        sub = frame.filter(pl.col("class") == c)
        kept = sub.filter(pl.col("selected")).sort("rank").head(per_class)
        drop_pool = sub.filter(~pl.col("selected") & pl.col("candidate")).sort("row")  # dropped from its pool
        dropped = drop_pool[spread(drop_pool.height, per_class).tolist()] if drop_pool.height else drop_pool
        rows.append((c, kept, dropped))
    imgs = run.images(pl.concat([k for _, k, _ in rows] + [d for _, _, d in rows]).select("row", "shard", "offset"))
    grid = []
    for c, kept, dropped in rows:
        line = [Tile(imgs[r], f"r{r} {run.label_text(c)}\nkept #{k} w {w_:.3g}", r, KEPT)
                for r, k, w_ in zip(kept["row"], kept["rank"], kept["weight"])]
        line += [None] * (per_class - len(line))
        line += [Tile(imgs[r], f"r{r} {run.label_text(c)}\ndropped", r, DROPPED) for r in dropped["row"]]
        grid.append(line)
    sec = Section(f"per class: first {per_class} picks (by rank, with weight) | {per_class} dropped samples", grid)
    return Inspection(unit, "selection", table, [sec])


def _dedup(run: RunView, unit: str, lf: pl.LazyFrame, names: list[str], pairs: int) -> Inspection:
    """Removed images beside their kept twins, at evenly spaced similarity ranks."""
    has_twins = "dup_of" in names
    removed_expr = ~pl.col("selected") & (pl.col("dup_of").is_not_null() if has_twins else pl.lit(True))
    twins = lf.select(pl.col("row").alias("dup_of"), pl.col("class").alias("twin_class"),
                      pl.col("shard").alias("twin_shard"), pl.col("offset").alias("twin_offset"))
    lf2 = lf.with_columns(removed_expr.alias("removed"))
    if has_twins:
        lf2 = lf2.join(twins, on="dup_of", how="left")
    aggs = [pl.len().alias("rows"), pl.col("selected").sum().alias("kept"), pl.col("removed").sum().alias("removed")]
    if has_twins:
        sim = pl.col("dup_similarity").filter(pl.col("removed"))
        aggs += [(pl.col("removed") & (pl.col("twin_class") != pl.col("class"))).sum().alias("twin_other_class"),
                 sim.min().alias("sim_min"), sim.median().alias("sim_median"), sim.max().alias("sim_max")]
    table = _per_class(lf2, aggs)
    notes = []
    if not has_twins:
        notes.append("this selection has no dup_of column (written before curate recorded twins): removed images "
                     "are shown alone; rerun it with --force to see their twins")
    cols = ["row", "class", "shard", "offset"] + (["dup_of", "dup_similarity", "twin_class", "twin_shard",
                                                   "twin_offset"] if has_twins else [])
    removed = lf2.filter(pl.col("removed")).select(cols).collect()
    if has_twins:
        removed = removed.sort(["dup_similarity", "row"])
    picked = removed[spread(removed.height, pairs).tolist()] if removed.height else removed
    frames = [picked.select("row", "shard", "offset")]
    if has_twins:
        frames.append(picked.select(pl.col("dup_of").alias("row"), pl.col("twin_shard").alias("shard"),
                                    pl.col("twin_offset").alias("offset")))
    imgs = run.images(pl.concat(frames))
    tiles: list[Tile] = []
    for r in picked.iter_rows(named=True):
        tiles.append(Tile(imgs[r["row"]], f"removed r{r['row']}\n{run.label_text(r['class'])}", r["row"], DROPPED))
        if has_twins:
            other = r["twin_class"] != r["class"]
            tiles.append(Tile(imgs[r["dup_of"]], f"kept twin r{r['dup_of']}\n{run.label_text(r['twin_class'])}"
                              f"{' (other class!)' if other else ''}\nsim {r['dup_similarity']:.5f}",
                              r["dup_of"], DROPPED if other else KEPT))
    grid = [tiles[i:i + 8] for i in range(0, len(tiles), 8)]
    what = "removed | kept twin, similarity" if has_twins else "removed"
    sec = Section(f"{picked.height} of {removed.height} removed ({what}), from the lowest similarity to the highest",
                  grid)
    return Inspection(unit, "dedup", table, [sec], notes=notes)


def _score_frame(run: RunView, columns: list[str]) -> pl.LazyFrame:
    scores = pl.scan_parquet(run.parquet("score/scores.parquet")).select("row", *columns)
    index = pl.scan_parquet(run.parquet("index/index.parquet")).select("row", "label", "shard", "offset")
    return _class_col(index.join(scores, on="row", how="inner"))


def _extremes(run: RunView, frame: pl.DataFrame, col: str, per_class: int, selected: bool = False) -> Section:
    """One grid row per class: its `per_class` lowest then highest samples by `col`."""
    rows = []
    finite = frame.filter(pl.col(col).is_finite())
    for c in sorted(finite["class"].unique().to_list()):
        sub = finite.filter(pl.col("class") == c).sort([col, "row"])
        low = sub.head(per_class)
        high = sub.slice(max(per_class, sub.height - per_class))  # no sample twice: none of the lowest
        rows.append((c, low, high))
    imgs = run.images(pl.concat([x for _, lo, hi in rows for x in (lo, hi)]).select("row", "shard", "offset"))
    grid = []
    for c, low, high in rows:
        line = []
        for part, tag in ((low, "low"), (high, "high")):
            cells = []
            for r in part.iter_rows(named=True):
                state = ("kept" if r["selected"] else "dropped") if selected else tag
                color = (KEPT if r["selected"] else DROPPED) if selected else NEUTRAL
                cells.append(Tile(imgs[r["row"]], f"r{r['row']} {run.label_text(c)}\n{col.removeprefix('score_')} "
                                                  f"{r[col]:.4g} {state}", r["row"], color))
            if tag == "low":
                cells += [None] * (per_class - len(cells))
            line += cells
        grid.append(line)
    name = col.removeprefix("score_")
    return Section(f"{name}: per class the {per_class} lowest | the {per_class} highest", grid)


def _quantile_aggs(col: str, prefix: str = "", where: pl.Expr | None = None) -> list[pl.Expr]:
    x = pl.col(col).filter(pl.col(col).is_finite() & (where if where is not None else pl.lit(True)))
    return [x.min().alias(f"{prefix}min"), x.quantile(0.1, "nearest").alias(f"{prefix}q10"),
            x.median().alias(f"{prefix}median"), x.quantile(0.9, "nearest").alias(f"{prefix}q90"),
            x.max().alias(f"{prefix}max")]


def _scores(run: RunView, unit: str, per_class: int, score: str | None) -> Inspection:
    path = run.parquet(f"{unit}/scores.parquet")
    cols = [c for c in pl.scan_parquet(path).collect_schema().names() if c.startswith("score_")]
    if score is not None:
        want = score if score.startswith("score_") else f"score_{score}"
        if want not in cols:
            raise CurateError(f"{unit}: no score '{score}' (have: {', '.join(c[6:] for c in cols) or 'none'})")
        cols = [want]
    if not cols:
        raise CurateError(f"{unit}: scores.parquet holds no score columns")
    lf = _score_frame(run, cols)
    tables = []
    for col in cols:
        aggs = [pl.lit(col.removeprefix("score_")).alias("score"), pl.len().alias("rows"),
                (~pl.col(col).is_finite()).sum().alias("not_finite"), *_quantile_aggs(col)]
        t = _per_class(lf, aggs)
        tables.append(t.select("score", "class", *[c for c in t.columns if c not in ("score", "class")]))
    frame = lf.collect().with_columns(pl.lit(False).alias("selected"))
    sections = [_extremes(run, frame, col, per_class) for col in cols]
    return Inspection(unit, "ranked", pl.concat(tables), sections)


def _ranked_selection(run: RunView, unit: str, lf: pl.LazyFrame, score: str, per_class: int) -> Inspection:
    col = f"score_{score}"
    scores = pl.scan_parquet(run.parquet("score/scores.parquet")).select("row", col)
    lf = lf.join(scores, on="row", how="left")
    aggs = [pl.len().alias("rows"), pl.col("selected").sum().alias("kept"),
            *_quantile_aggs(col, "kept_", pl.col("selected"))[::2],
            *_quantile_aggs(col, "dropped_", ~pl.col("selected"))[::2]]
    table = _per_class(lf, aggs)
    frame = lf.select("row", "class", "shard", "offset", "selected", col).collect()
    return Inspection(unit, "ranked", table, [_extremes(run, frame, col, per_class, selected=True)])


def _pairs(run: RunView, unit: str, lf: pl.LazyFrame, per_class: int) -> Inspection:
    """Kept and dropped image-caption pairs per class (or over all where there are no labels),
    spread over the image-caption cosine where the run has both embeddings."""
    emb, txt = run.dir / "embed" / "embeddings.npy", run.dir / "embed" / "text_embeddings.npy"
    has_cos = emb.is_file() and txt.is_file()
    if has_cos:
        a, b = np.load(emb, mmap_mode="r"), np.load(txt, mmap_mode="r")
        if a.shape != b.shape:
            has_cos = False
        else:
            cos = np.einsum("nd,nd->n", a.astype(np.float32), b.astype(np.float32))
            lf = lf.join(pl.LazyFrame({"row": np.arange(len(cos), dtype=np.int64), "cosine": cos}), on="row",
                         how="left")
    order = "cosine" if has_cos else "row"
    aggs = [pl.len().alias("rows"), pl.col("selected").sum().alias("kept")]
    if has_cos:
        aggs += [pl.col("cosine").filter(pl.col("selected")).median().alias("cosine_kept_median"),
                 pl.col("cosine").filter(~pl.col("selected")).median().alias("cosine_dropped_median")]
    table = _per_class(lf, aggs)
    frame = lf.collect()
    picks = []
    for c in sorted(frame["class"].unique().to_list()):
        sub = frame.filter(pl.col("class") == c)
        kept = sub.filter(pl.col("selected")).sort([order, "row"])
        dropped = sub.filter(~pl.col("selected")).sort([order, "row"])
        picks.append((c, kept[spread(kept.height, per_class).tolist()] if kept.height else kept,
                      dropped[spread(dropped.height, per_class).tolist()] if dropped.height else dropped))
    imgs = run.images(pl.concat([x for _, k, d in picks for x in (k, d)]).select("row", "shard", "offset"))
    grid = []
    for c, kept, dropped in picks:
        line = []
        for part, tag, color in ((kept, "kept", KEPT), (dropped, "dropped", DROPPED)):
            cells = [Tile(imgs[r["row"]], f"{tag} r{r['row']}" + (f" cos {r['cosine']:.3f}" if has_cos else "")
                          + f"\n{r['caption'] or '(no caption)'}", r["row"], color) for r in part.iter_rows(named=True)]
            line += cells + ([None] * (per_class - len(cells)) if tag == "kept" else [])
        grid.append(line)
    by = "image-caption cosine" if has_cos else "row"
    sec = Section(f"per class: {per_class} kept | {per_class} dropped pairs, spread over the {by}", grid)
    return Inspection(unit, "pairs", table, [sec])


def _distilled(run: RunView, unit: str, per_class: int) -> Inspection:
    from .data import read_distilled

    manifest = run.parquet(f"{unit}/manifest.parquet")
    lf = _class_col(pl.scan_parquet(manifest))
    table = _per_class(lf, [pl.len().alias("images")])
    images, labels = read_distilled(run.dir / unit)
    grid = []
    show = max(per_class * 2, 1)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)[:show]
        grid.append([Tile(images[i].transpose(1, 2, 0), f"{run.label_text(int(c))}\nsynthetic #{i}", None)
                     for i in idx])
    sec = Section(f"synthetic images per class (up to {show}; each scaled to its own range)", grid)
    return Inspection(unit, "distilled", table, [sec])
