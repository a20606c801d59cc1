"""materialize: compact WebDataset shards of one selection, plus manifest.parquet.

Shards keep each sample's original key and the members curate understands (the entry's
image, label and caption members, `json`, and its `fields.extra`), and add `weight` to the json
member. Any other member is dropped (an unknown member is not passed on to a trainer) and
counted: metrics `dropped_members` and `dropped_by_ext`. In the manifest, `shard` is relative
to the manifest's folder (`shards/subset-000000.tar`) and `offset` is the position in that
compact shard; `source_shard` / `source_offset` say where the sample came from.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import ShardError
from pipeline.manifest import COMMON_SCHEMA, read_parquet, write_parquet
from pipeline.shards import ShardWriter, check_safe, decode_json, iter_shard
from pipeline.stage import Resources, Stage, StageContext


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


class MaterializeStage(Stage):
    name = "materialize"
    version = 2  # 2: only known members (and fields.extra) are copied
    per_selection = True
    resources = Resources(cpus=1)

    def config(self, cfg, sel, entry=None):
        return cfg.materialize.model_dump()

    def upstream(self, cfg, sel):
        return [f"select/{sel.sel_name}"]

    def run(self, ctx: StageContext) -> None:
        sel_name = ctx.sel.sel_name
        table = read_parquet(ctx.input_dir(f"select/{sel_name}") / "selection.parquet")
        table = table.filter(pc.field("selected"))
        table = table.take(pc.sort_indices(table, [("row", "ascending")]))
        by_shard: dict[str, dict[int, int]] = defaultdict(dict)
        for i, (s, o) in enumerate(zip(table.column("shard").to_pylist(), table.column("offset").to_pylist())):
            by_shard[s][o] = i
        weights = table.column("weight").to_numpy()
        new_shard = np.empty(table.num_rows, object)
        new_offset = np.zeros(table.num_rows, np.int32)
        members_of: dict[int, dict[str, bytes]] = {}
        keep, dropped = kept_members(ctx.catalog.entry(ctx.cfg.dataset)), Counter()
        with ShardWriter(ctx.out / "shards", "subset", ctx.config["shard_size"]) as writer:
            # read shard by shard, write in row order: rows are sorted, shards are in row order
            for shard, wanted in by_shard.items():
                for sample in iter_shard(shard, ctx.cfg.index.max_member_bytes):
                    if sample.offset in wanted:
                        check_safe(sample, shard)
                        dropped.update(ext for ext in sample.members if ext not in keep)
                        members_of[wanted[sample.offset]] = {e: d for e, d in sample.members.items() if e in keep}
                missing = [o for o, i in wanted.items() if i not in members_of]
                if missing:
                    raise ShardError(f"shard {shard}: sample at offset {missing[0]} named by the selection is gone")
                for i in sorted(wanted.values()):
                    key = table.column("key")[i].as_py()
                    name, off = writer.write(key, with_weight(members_of.pop(i), weights[i], f"shard {shard}: sample {key!r}"))
                    new_shard[i], new_offset[i] = f"shards/{name}", off
        cols = {n: table.column(n) for n in COMMON_SCHEMA.names}
        cols["shard"] = pa.array(new_shard.tolist(), pa.string())
        cols["offset"] = pa.array(new_offset, pa.int32())
        manifest = pa.table(cols, schema=COMMON_SCHEMA)
        manifest = manifest.append_column("weight", table.column("weight"))
        manifest = manifest.append_column("rank", table.column("rank"))
        manifest = manifest.append_column("source_shard", table.column("shard"))
        manifest = manifest.append_column("source_offset", table.column("offset"))
        write_parquet(manifest, ctx.out / "manifest.parquet", stage=self.name, stage_version=self.version,
                      fingerprint=ctx.fingerprint, extra={"selection": sel_name})
        ctx.metrics.update({"samples": manifest.num_rows, "shards": len(writer.sizes),
                            "dropped_members": sum(dropped.values()), "dropped_by_ext": dict(sorted(dropped.items())),
                            "bytes": sum(p.stat().st_size for p in (ctx.out / "shards").glob("*.tar"))})
