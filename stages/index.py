"""index: one row per usable training sample, after checking every sample decodes.

Checks per sample: no pickle member (never decoded), a key without dots and unique
across shards, an image member that decodes, a label in range where the dataset has
labels, a UTF-8 caption. `on_error: raise` stops at the first bad sample with a line
naming it; `skip` leaves it out and lists it in `_stage.json`.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa

from pipeline.arrays import find_image
from pipeline.errors import ShardError
from pipeline.manifest import COMMON_SCHEMA, write_parquet
from pipeline.shards import check_safe, decode_image, decode_label, iter_shard
from pipeline.stage import Stage, StageContext
from pipeline.errors import CurateError

MAX_LISTED = 100


def check_sample(sample, shard: str, fields, num_classes: int | None, seen: dict[str, str]) -> tuple[int | None, str | None, tuple]:
    """Validate one sample; returns (label, caption, image shape) or raises ShardError."""
    where = f"shard {shard}: sample {sample.key!r}"
    check_safe(sample, shard)
    if "." in sample.key or not sample.key:
        raise ShardError(f"{where}: keys must be non-empty and contain no dots")
    if sample.key in seen:
        raise ShardError(f"{where}: key repeated (also in shard {seen[sample.key]})")
    found = find_image(sample.members, fields.image)
    if found is None:
        raise ShardError(f"{where}: no image member ({'/'.join('.' + e for e in fields.image)})")
    shape = decode_image(found[1], found[0], where=where).shape
    label = None
    if fields.label:
        if fields.label not in sample.members:
            raise ShardError(f"{where}: missing label member .{fields.label}")
        label = decode_label(sample.members[fields.label], where=where)
        if num_classes is not None and not 0 <= label < num_classes:
            raise ShardError(f"{where}: label {label} outside [0, {num_classes})")
    caption = None
    if fields.caption and fields.caption in sample.members:
        try:
            caption = sample.members[fields.caption].decode("utf-8")
        except UnicodeDecodeError:
            raise ShardError(f"{where}: caption is not UTF-8") from None
    return label, caption, shape


def expected_sizes(shard: str) -> int | None:
    """The sample count sizes.json beside a shard records for it, if any.

    A tar cut exactly at a member boundary reads as a shorter valid tar; this count is
    how such truncation is caught.
    """
    sizes = os.path.join(os.path.dirname(shard), "sizes.json")
    if not os.path.isfile(sizes):
        return None
    try:
        return json.loads(open(sizes).read()).get(os.path.basename(shard))
    except ValueError:
        raise ShardError(f"{sizes}: not valid JSON") from None


class IndexStage(Stage):
    name = "index"
    version = 1
    resources = {"cpu": 1}

    def config(self, cfg, sel):
        return {"dataset": cfg.dataset, **cfg.index.model_dump()}

    def external_inputs(self, cfg, sel):
        return [(cfg.dataset, "train")]

    def run(self, ctx: StageContext) -> None:
        name = ctx.cfg.dataset
        entry = ctx.catalog.entry(name)
        skip = ctx.config["on_error"] == "skip"
        cols = {k: [] for k in COMMON_SCHEMA.names}
        seen: dict[str, str] = {}
        skipped: list[dict] = []
        shapes: set[tuple] = set()
        n_skipped = 0
        for shard in ctx.catalog.shards(name, "train"):
            expected, count = expected_sizes(shard), 0
            try:
                for sample in iter_shard(shard):
                    count += 1
                    try:
                        label, caption, shape = check_sample(sample, shard, entry.fields, entry.num_classes, seen)
                    except ShardError as exc:
                        if not skip:
                            raise
                        n_skipped += 1
                        if len(skipped) < MAX_LISTED:
                            skipped.append({"shard": shard, "key": sample.key, "error": str(exc)})
                        continue
                    seen[sample.key] = shard
                    shapes.add(shape)
                    for k, v in (("row", len(cols["row"])), ("uid", f"{name}/{sample.key}"), ("key", sample.key),
                                 ("shard", shard), ("offset", sample.offset), ("label", label), ("caption", caption)):
                        cols[k].append(v)
                if expected is not None and count != expected:
                    raise ShardError(f"shard {shard}: truncated or corrupt tar: {count} samples, sizes.json says {expected}")
            except ShardError as exc:
                if not skip or "truncated or corrupt" not in str(exc):
                    raise
                n_skipped += 1  # the rest of a truncated shard is unreadable: one counted skip
                skipped.append({"shard": shard, "key": None, "error": str(exc)})
        if not cols["row"]:
            raise CurateError(f"index: dataset '{name}' has no usable training samples")
        table = pa.table(cols, schema=COMMON_SCHEMA)
        write_parquet(table, ctx.out / "index.parquet", stage=self.name, stage_version=self.version,
                      fingerprint=ctx.fingerprint)
        ctx.metrics.update({"samples": table.num_rows, "skipped": n_skipped, "skipped_samples": skipped,
                            "image_shapes": sorted(list(s) for s in shapes)[:10],
                            "classes": sorted(set(cols["label"]) - {None})})
