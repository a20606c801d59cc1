"""materialize: compact WebDataset shards of one selection, plus manifest.parquet.

Shards keep each sample's original key and the members curate understands (the entry's
image, label and caption members, `json`, and its `fields.extra`), and add `weight` to the json
member. Any other member is dropped (an unknown member is not passed on to a trainer) and
counted: metrics `dropped_members` and `dropped_by_ext`. In the manifest, `shard` is relative
to the manifest's folder (`shards/subset-000000.tar`) and `offset` is the position in that
compact shard; `source_shard` / `source_offset` say where the sample came from, and `source`
the file it was ingested from (null where there is none).

Shards are sized for readers (pipeline.shards.plan_shards): at least `min_shards` (8) when the
subset has 64 or more samples, so every DataLoader worker of a WebDataset pipeline gets shards.
Their brace URL (`shards/subset-{000000..000007}.tar`, relative to the manifest's folder) is the
manifest's `shards_url` metadata, and `shards/url.txt` holds it relative to that folder;
`sizes.json` stays a pure basename -> count map.

With `register_entry` (the default) the subset becomes the catalog entry
`<dataset>/<run folder name>/<selection>` (CATALOG_NAME): its train split the compact shards, its
other splits, fields and classes those of the dataset, and `curated_from` its manifest, so it can
be curated again and a trainer finds it by name. An entry without `curated_from` (not curate's)
is never replaced, and a catalog that cannot be written leaves the subset unregistered with a
printed note (metrics `catalog_entry`, `catalog_note`): the shards and manifest are the output.
The entry is written when the unit is computed, pointing at where the unit is placed.

Memory: the selection's Arrow columns (a few numbers and strings per selected row) and the
selected samples of one source shard at a time; samples are streamed from the source shards
and written as they come (tests/stages/test_stage_memory.py bounds it).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.catalog import Catalog, DatasetEntry
from pipeline.errors import CurateError, ShardError
from pipeline.locks import UnitLock
from pipeline.manifest import COMMON_SCHEMA, SOURCE_FIELD, read_parquet, write_parquet
from pipeline.shards import (ShardWriter, check_safe, decode_json, iter_shard, plan_shards, shard_pattern,
                             write_text_atomic)
from pipeline.stage import Resources, Stage, StageContext
from pipeline.storage import export_subset

URL_FILE = "url.txt"  # beside sizes.json: the shards' brace pattern, relative to that folder
CATALOG_NAME = "{dataset}/{run}/{sel}"


def selected_rows(path: Path) -> pa.Table:
    """The selected rows of a selection.parquet (the columns the manifest takes), read one column
    at a time: Parquet decodes a column of its one row group whole, so the transient peak is the
    largest column, not the whole pool's table."""
    mask = read_parquet(path, columns=["selected"]).column("selected")  # a missing file: one-line error
    f = pq.ParquetFile(str(path))
    wanted = [*COMMON_SCHEMA.names, "source", "weight", "rank", "selected"]
    columns = [c for c in f.schema_arrow.names if c in wanted]
    return pa.table({c: f.read(columns=[c], use_threads=False).column(c).filter(mask) for c in columns},
                    schema=pa.schema([f.schema_arrow.field(c) for c in columns]))


def shard_runs(shards: pa.ChunkedArray) -> list[tuple[int, int]]:
    """[start, stop) of each run of equal values in `shards` (rows sorted by row: one run per shard)."""
    codes = shards.combine_chunks().dictionary_encode().indices.to_numpy(zero_copy_only=False)
    cuts = np.flatnonzero(np.diff(codes)) + 1
    bounds = [0, *cuts.tolist(), len(codes)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def with_weight(members: dict[str, bytes], weight: float, where: str) -> dict[str, bytes]:
    meta = decode_json(members["json"], where=where) if "json" in members else {}
    if not isinstance(meta, dict):
        meta = {"value": meta}
    meta["weight"] = float(weight)
    return {**members, "json": json.dumps(meta, sort_keys=True).encode()}


def kept_members(entry) -> set[str]:
    """The member extensions compact shards carry: what curate reads, plus the entry's `fields.extra`."""
    f = entry.fields
    return {*f.image, f.label, f.caption, "json", *f.extra} - {None}


def subset_entry(dataset: str, entry: DatasetEntry, sel: str, unit_dir: Path, url: str,
                 catalog_dir: Path) -> DatasetEntry:
    """The catalog entry of a materialized subset: the dataset's entry (its other splits, fields,
    classes) with the compact shards as train split; paths relative to the catalog's folder."""
    def rel(p: Path) -> str:
        return os.path.relpath(p, catalog_dir)

    return entry.model_copy(update={"description": f"selection {sel} of {dataset}, materialized in {unit_dir}",
                                    "splits": {**entry.splits, "train": rel(unit_dir / "shards" / url)},
                                    "curated_from": rel(unit_dir / "manifest.parquet")})


def register(ctx: StageContext, url: str) -> dict:
    """Add or update this subset's catalog entry; {catalog_entry, catalog_note} for the metrics."""
    sel, unit_dir = ctx.sel.sel_name, ctx.run_dir / ctx.unit  # where the unit is placed once done
    name = CATALOG_NAME.format(dataset=ctx.cfg.dataset, run=ctx.run_dir.name, sel=sel)
    path = ctx.catalog.path
    new = subset_entry(ctx.cfg.dataset, ctx.catalog.entry(ctx.cfg.dataset), sel, unit_dir, url, path.parent)
    registered, note = False, None
    try:
        if not os.access(path, os.W_OK):  # a read-only file in a writable folder would still be replaced
            raise PermissionError(13, "the file is read-only")
        with UnitLock(path, f"catalog {path.name}", wait=True):  # other units may register at the same time
            cat = Catalog.load(path)  # as it is now, not as the run loaded it
            old = cat.entries.get(name)
            if old is not None and old.curated_from is None:
                note = f"catalog entry '{name}' exists and was not written by curate; the subset is not registered"
            else:
                if old is not None and old.curated_from != new.curated_from:
                    note = f"catalog entry '{name}' now points at this run (it was {old.curated_from})"
                cat.set_entry(name, new)
                registered = True
    except (OSError, CurateError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        registered, note = False, f"catalog {path} cannot be updated ({why}); the subset is not registered"
    if note:
        print(f"materialize {sel}: {note}")
    return {"catalog_entry": name if registered else None, "catalog_note": note}


class MaterializeStage(Stage):
    name = "materialize"
    version = 3  # 2: only known members (and fields.extra) are copied; 3: planned shards, source, register
    per_selection = True
    resources = Resources(cpus=1)

    def config(self, cfg, sel, entry=None):
        return cfg.materialize.model_dump()

    def upstream(self, cfg, sel):
        return [f"select/{sel.sel_name}"]

    def run(self, ctx: StageContext) -> None:
        sel_name = ctx.sel.sel_name
        table = selected_rows(ctx.input_dir(f"select/{sel_name}") / "selection.parquet")
        table = table.take(pc.sort_indices(table, [("row", "ascending")]))
        weights = table.column("weight").to_numpy()
        new_names: list[pa.Array] = []  # per source shard, the compact shard of each of its rows
        new_offset = np.zeros(table.num_rows, np.int32)
        keep, dropped = kept_members(ctx.catalog.entry(ctx.cfg.dataset)), Counter()
        c = ctx.config
        counts = plan_shards(table.num_rows, c["shard_size"], c["min_shards"])
        with ShardWriter(ctx.out / "shards", "subset", c["shard_size"], shard_bytes=c["shard_bytes"],
                         counts=counts) as writer, \
                ctx.progress(table.num_rows, f"materialize {sel_name}", "samples") as step:
            # read shard by shard, write in row order: rows are sorted, shards are in row order; only
            # one source shard's rows are Python objects at a time
            for start, stop in shard_runs(table.column("shard")):
                part = table.slice(start, stop - start)
                shard = part.column("shard")[0].as_py()
                wanted = {o: start + i for i, o in enumerate(part.column("offset").to_pylist())}
                members_of: dict[int, dict[str, bytes]] = {}
                for sample in iter_shard(shard, ctx.cfg.index.max_member_bytes):
                    if sample.offset in wanted:
                        check_safe(sample, shard)
                        dropped.update(ext for ext in sample.members if ext not in keep)
                        members_of[wanted[sample.offset]] = {e: d for e, d in sample.members.items() if e in keep}
                missing = [o for o, i in wanted.items() if i not in members_of]
                if missing:
                    i = wanted[missing[0]]
                    source = table.column("source")[i].as_py() if "source" in table.column_names else None
                    raise ShardError(f"shard {shard}: sample {table.column('key')[i].as_py()!r}"
                                     f"{f' (file {source})' if source else ''} at offset {missing[0]}, "
                                     "named by the selection, is gone")
                names = []
                for i, key in zip(range(start, stop), part.column("key").to_pylist()):
                    name, off = writer.write(key, with_weight(members_of.pop(i), weights[i], f"shard {shard}: sample {key!r}"))
                    names.append(f"shards/{name}")
                    new_offset[i] = off
                new_names.append(pa.array(names, pa.string()))
                step(stop - start)
        schema = COMMON_SCHEMA.append(SOURCE_FIELD)
        cols = {n: table.column(n) for n in COMMON_SCHEMA.names}
        cols["source"] = (table.column("source") if "source" in table.column_names
                          else pa.nulls(table.num_rows, pa.string()))
        cols["shard"] = pa.concat_arrays(new_names) if new_names else pa.array([], pa.string())
        cols["offset"] = pa.array(new_offset, pa.int32())
        manifest = pa.table(cols, schema=schema)
        manifest = manifest.append_column("weight", table.column("weight"))
        manifest = manifest.append_column("rank", table.column("rank"))
        manifest = manifest.append_column("source_shard", table.column("shard"))
        manifest = manifest.append_column("source_offset", table.column("offset"))
        extra = {"selection": sel_name}
        url = shard_pattern("subset", len(writer.sizes)) if writer.sizes else None
        if url:
            write_text_atomic(ctx.out / "shards" / URL_FILE, url + "\n")
            extra["shards_url"] = f"shards/{url}"
        write_parquet(manifest, ctx.out / "manifest.parquet", stage=self.name, stage_version=self.version,
                      fingerprint=ctx.fingerprint, extra=extra)
        ctx.metrics.update({"samples": manifest.num_rows, "shards": len(writer.sizes),
                            "dropped_members": sum(dropped.values()), "dropped_by_ext": dict(sorted(dropped.items())),
                            "bytes": sum(p.stat().st_size for p in (ctx.out / "shards").glob("*.tar"))})
        if c.get("export"):  # last: the subset to <export>/<sel>/, manifest.parquet after the rest
            ctx.metrics["export"] = export_subset(ctx.out, c["export"], sel_name, c.get("storage_options"),
                                                  ctx.entry.storage_options, owner=str(ctx.run_dir))
        if url and c["register_entry"]:  # after everything that may fail: a failed unit registers nothing
            ctx.metrics.update(register(ctx, url))
