"""The demo's own check: how many of the label flips planted in `digits-noisy` each cleaning
selection dropped. Ingest marks every flipped training sample with `{"true_label": y}` in its
`.json` (pipeline.ingest.read_digits), and no stage uses that field, so the selections
never saw the answer this compares them with."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.catalog import Catalog
from pipeline.shards import iter_shard


def planted_flips(catalog: Catalog, dataset: str) -> set[str]:
    """Keys of the training samples whose `.json` records a planted flip."""
    flips = set()
    for shard in catalog.shards(dataset, "train"):
        for s in iter_shard(shard):
            raw = s.members.get("json")
            if raw is not None and "true_label" in json.loads(raw):
                flips.add(s.key)
    return flips


def cleaning_lines(run_dir: Path, catalog: Catalog, dataset: str, names: list[str]) -> list[str]:
    """One line per cleaning selection: samples it dropped, planted flips among them, flips in its pool."""
    flips = planted_flips(catalog, dataset)
    lines = []
    for name in names:
        sel = pq.read_table(Path(run_dir) / "select" / name / "selection.parquet",
                            columns=["key", "selected"]).to_pydict()
        dropped = {k for k, kept in zip(sel["key"], sel["selected"]) if not kept}
        pool = flips & set(sel["key"])
        lines.append(f"{name} dropped {len(dropped)} samples: {len(dropped & flips)} of them are among the "
                     f"{len(pool)} labels planted wrong in its pool ({len(flips)} in the training split, "
                     "the rest held out for validation)")
    return lines
