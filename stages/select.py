"""select: one unit per selection spec, writing select/<sel>/selection.parquet.

Every index row appears once, with `selected`, `weight` (1.0 for methods without
weights), `rank` (selection order, null when not selected), `method` and `budget`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.errors import CurateError
from pipeline.manifest import SELECTION_FIELDS, read_parquet, write_parquet
from pipeline.stage import Stage, StageContext

from .selection import budget_count, random_subset, stratified_subset


def label_array(table: pa.Table) -> np.ndarray:
    """Labels as int64 with -1 where missing."""
    return table.column("label").fill_null(-1).to_numpy().astype(np.int64)


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


METHODS = {
    "random": lambda labels, k, seed: random_subset(len(labels), k, seed),
    "stratified": stratified_subset,
}


class SelectStage(Stage):
    name = "select"
    version = 1
    per_selection = True
    resources = {"cpu": 1}

    def config(self, cfg, sel):
        return {"seed": cfg.seed, **sel.params()}

    def upstream(self, cfg, sel):
        return ["index"]

    def run(self, ctx: StageContext) -> None:
        spec = ctx.sel
        index = read_parquet(ctx.input_dir("index") / "index.parquet")
        labels = label_array(index)
        if spec.method == "stratified" and (labels < 0).any():
            raise CurateError(f"select {spec.sel_name}: stratified needs labels; the dataset has unlabelled samples")
        try:
            k = budget_count(spec.budget, index.num_rows)
        except CurateError as exc:
            raise CurateError(f"select {spec.sel_name}: {exc}") from None
        rows = METHODS[spec.method](labels, k, ctx.cfg.seed)
        table = selection_table(index, rows, None, spec.method, spec.budget)
        write_parquet(table, ctx.out / "selection.parquet", stage=self.name, stage_version=self.version,
                      fingerprint=ctx.fingerprint, extra={"selection": spec.sel_name})
        per_class = np.bincount(labels[rows][labels[rows] >= 0]).tolist() if (labels >= 0).any() else []
        ctx.metrics.update({"selected": int(k), "of": index.num_rows, "per_class": per_class})
