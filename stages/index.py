"""index: one row per usable training sample, after checking every sample decodes.

Checks per sample: no pickle member (never decoded) and no member over
`index.max_member_bytes` (never read), a key without dots and unique across shards, an image
member within `index.max_pixels` that decodes, a `.json` member (if any) that parses, a label
in range where the dataset has labels (below `num_classes`, or below MAX_CLASSES without it, and
then the training labels must be dense 0..C-1) and, in an image-text run
(RunConfig.uses_captions), a caption member that is UTF-8 and not empty or whitespace only
(elsewhere a missing caption is null). `on_error: raise` stops at the first bad sample
with a line naming it; `skip` leaves it out and counts it: `_stage.json` metrics hold
`skipped` (total), `skipped_by_reason` (reason -> count, e.g. no_caption,
empty_caption) and `skipped_samples` (the first 100: shard, key, source, reason, error).

Each row also records `source` (manifest.SOURCE_FIELD): the original file a sample was ingested
from, read from its `.json` member's "source" (null where there is none); an error about such a
sample names that file beside its shard and key.

Work: the per-sample check runs in worker processes, a shard each (`index.workers`; by default the
CPUs this process may use, at most 8, for a split of 64 MiB or more, else this process alone); not
in the fingerprint: the output is the same for any count, byte for byte.

Memory: samples are streamed one at a time; what grows with the split is its Arrow columns
(index.parquet's rows, written in one piece) and one int64 hash per key for the repeated-key
check, not Python objects per sample (tests/stages/test_stage_memory.py bounds it). With
workers, at most two shards per worker are in flight, each sent back as its rows' values.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.arrays import find_image
from pipeline.manifest import COMMON_SCHEMA, SOURCE_FIELD, write_parquet
from pipeline.shards import (MAX_MEMBER_BYTES, bad_sample, check_safe, decode_image, decode_json, decode_label,
                             iter_shard, read_sizes)
from pipeline.stage import Resources, Stage, StageContext
from pipeline.errors import CurateError, ShardError

MAX_LISTED = 100
# Without num_classes in the catalog entry, labels must be below this: classes are 0..max label,
# and one hostile label (1e9) would otherwise size every class-indexed array downstream.
MAX_CLASSES = 100_000


def reason_of(exc: Exception) -> str:
    return getattr(exc, "reason", "other")


@contextmanager
def _because(reason: str):
    """Tag ShardErrors raised by the shared decoders with `reason`."""
    try:
        yield
    except ShardError as exc:
        if not hasattr(exc, "reason"):
            exc.reason = reason
        raise


def decode_caption(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_sample("caption_not_utf8", f"{where}: caption is not UTF-8") from None


def check_caption(sample, where: str, field: str) -> str:
    """The caption of a sample whose dataset declares caption member `field`; raises if missing or empty."""
    if field not in sample.members:
        raise bad_sample("no_caption", f"{where} has no caption (member .{field} missing)")
    caption = decode_caption(sample.members[field], where)
    if not caption.strip():
        raise bad_sample("empty_caption", f"{where} has an empty caption (.{field} is empty or whitespace only)")
    return caption


def sample_source(meta) -> str | None:
    """The original file a `.json` member's value names (`{"source": "train/cat/01.jpg"}`), or None."""
    source = meta.get("source") if isinstance(meta, dict) else None
    return source if isinstance(source, str) and source else None


def check_sample(sample, shard: str, fields, num_classes: int | None, seen,
                 require_caption: bool = True,
                 max_pixels: int | None = None) -> tuple[int | None, str | None, tuple, str | None]:
    """Validate one sample; returns (label, caption, image shape, source) or raises ShardError (with
    `.reason`). `seen`: the keys so far (`key in seen`, `seen[key]` -> its shard; a SeenKeys). require_caption (an image-text run): a missing or empty caption is bad input;
    otherwise a missing caption is null (DESIGN: nullable, "where there is one"). The json member
    is parsed before the image is decoded, so that later errors name the sample's source file."""
    where = f"shard {shard}: sample {sample.key!r}"
    check_safe(sample, shard)
    if "." in sample.key or not sample.key:
        raise bad_sample("bad_key", f"{where}: keys must be non-empty and contain no dots")
    if sample.key in seen:
        raise bad_sample("repeated_key", f"{where}: key repeated (also in shard {seen[sample.key]})")
    found = find_image(sample.members, fields.image)
    if found is None:
        raise bad_sample("no_image", f"{where}: no image member ({'/'.join('.' + e for e in fields.image)})")
    source = None
    if "json" in sample.members:  # materialize parses it to add `weight`: refuse it here, not there
        source = sample_source(decode_json(sample.members["json"], where=where))
        if source is not None:
            where = f"{where} (file {source})"
    with _because("image_undecodable"):
        shape = decode_image(found[1], found[0], where=where, max_pixels=max_pixels).shape
    label = None
    if fields.label:
        if fields.label not in sample.members:
            raise bad_sample("no_label", f"{where}: missing label member .{fields.label}")
        with _because("bad_label"):
            label = decode_label(sample.members[fields.label], where=where)
        bound = MAX_CLASSES if num_classes is None else num_classes
        if not 0 <= label < bound:
            hint = "" if num_classes is not None else " (the bound without num_classes in the catalog entry)"
            raise bad_sample("label_out_of_range", f"{where}: label {label} outside [0, {bound}){hint}")
    caption = None
    if fields.caption and require_caption:
        caption = check_caption(sample, where, fields.caption)
    elif fields.caption and fields.caption in sample.members:
        text = decode_caption(sample.members[fields.caption], where)
        caption = text if text.strip() else None  # empty: no caption
    return label, caption, shape, source


def expected_sizes(shard: str) -> int | None:
    """The sample count sizes.json beside a shard records for it, if any.

    A tar cut exactly at a member boundary reads as a shorter valid tar; this count is
    how such truncation is caught.
    """
    sizes = os.path.join(os.path.dirname(shard), "sizes.json")
    if not os.path.isfile(sizes):
        return None
    return read_sizes(sizes).get(os.path.basename(shard))


def check_dense(table: pa.Table, dataset: str) -> None:
    """Without num_classes, the classes are 0..max label: each needs a training sample, or a
    class would be learned from nothing (and a typo like 7 for 70 would pass unnoticed)."""
    labels = table.column("label").drop_null().to_numpy()
    if len(labels) == 0:
        return
    missing = np.setdiff1d(np.arange(labels.max() + 1), labels)
    if len(missing):
        listed = ", ".join(str(c) for c in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise CurateError(f"index: dataset '{dataset}' has no training sample of class(es) {listed} "
                          f"({len(missing)} of classes 0..{labels.max()} missing); labels must be 0..C-1 without gaps, "
                          "or set num_classes in the catalog entry")


class IndexStage(Stage):
    name = "index"
    version = 4  # 2: samples of a captioned dataset need a non-empty caption; 3: hostile-input limits; 4: source
    resources = Resources(cpus=1)

    def config(self, cfg, sel, entry=None):
        c = {"dataset": cfg.dataset, "on_error": cfg.index.on_error,
             "max_member_bytes": cfg.index.max_member_bytes, "max_pixels": cfg.index.max_pixels}
        if cfg.uses_captions:
            c["require_captions"] = True
        if cfg.needs_validation:
            has_val = entry is not None and "val" in entry.splits
            c["validation"] = "catalog val split" if has_val else {"val_fraction": cfg.index.val_fraction, "seed": cfg.seed}
        return c

    def external_inputs(self, cfg, sel, entry=None):
        has_val = entry is not None and "val" in entry.splits
        return [(cfg.dataset, "train")] + ([(cfg.dataset, "val")] if cfg.needs_validation and has_val else [])

    def run(self, ctx: StageContext) -> None:
        name = ctx.cfg.dataset
        entry = ctx.catalog.entry(name)
        require = ctx.config.get("require_captions", False)
        if require and not entry.fields.caption:
            raise CurateError(f"index: this is an image-text run (captions are embedded, scored, selected on or "
                              f"trained on) but dataset '{name}' declares no caption field")
        shards = ctx.catalog.shards(name, "train")
        scan = SplitScan(name, entry, skip=ctx.config["on_error"] == "skip", require_captions=require,
                         max_member_bytes=ctx.config["max_member_bytes"], max_pixels=ctx.config["max_pixels"],
                         workers=ctx.cfg.index.workers or default_workers(shards))
        with ctx.progress(len(shards), f"index {name}: train shards", "shards") as step:
            train = scan.read(shards, step)
        if entry.fields.label and entry.num_classes is None:
            check_dense(train, name)
        val = None
        validation = ctx.config.get("validation")
        if validation == "catalog val split":
            shards = ctx.catalog.shards(name, "val")
            with ctx.progress(len(shards), f"index {name}: val shards", "shards") as step:
                val = scan.read(shards, step)
        elif validation and validation["val_fraction"] > 0:
            train, val = holdout(train, validation["val_fraction"], validation["seed"])
        if scan.n_skipped:
            reasons = ", ".join(f"{r}: {n}" for r, n in sorted(scan.by_reason.items()))
            print(f"index: skipped {scan.n_skipped} bad sample(s) of '{name}' ({reasons}); "
                  "listed in index/_stage.json metrics")
        if train.num_rows == 0:
            raise CurateError(f"index: dataset '{name}' has no usable training samples")
        meta = dict(stage=self.name, stage_version=self.version, fingerprint=ctx.fingerprint)
        write_parquet(train, ctx.out / "index.parquet", **meta)
        if val is not None:
            if val.num_rows == 0:
                raise CurateError(f"index: dataset '{name}' has an empty validation split")
            write_parquet(val, ctx.out / "val.parquet", **meta)
        ctx.metrics.update({"samples": train.num_rows, "val_samples": 0 if val is None else val.num_rows,
                            "skipped": scan.n_skipped, "skipped_by_reason": dict(sorted(scan.by_reason.items())),
                            "skipped_samples": scan.skipped,
                            "image_shapes": sorted(list(s) for s in scan.shapes)[:10],
                            "channels": max(1 if len(s) == 2 else s[2] for s in scan.shapes),
                            "classes": sorted(set(train.column("label").drop_null().to_pylist()))})


def renumber(table: pa.Table) -> pa.Table:
    return table.set_column(0, "row", pa.array(range(table.num_rows), pa.int64()))


def holdout(table: pa.Table, fraction: float, seed: int) -> tuple[pa.Table, pa.Table]:
    """Split off a stratified, seeded validation part; both parts keep index order, rows renumbered."""
    from pipeline.sampling import budget_count, random_subset, stratified_subset

    labels = table.column("label").fill_null(-1).to_numpy()
    classes, counts = np.unique(labels[labels >= 0], return_counts=True)
    if (counts < 2).any():
        raise CurateError(f"index: class {int(classes[counts < 2][0])} has one training sample; a validation holdout "
                          "needs at least 2 per class (add a `val` split to the catalog entry)")
    k = budget_count(float(fraction), table.num_rows)
    rows = stratified_subset(labels, k, seed) if (labels >= 0).all() else random_subset(len(labels), k, seed)
    is_val = np.zeros(table.num_rows, bool)
    is_val[rows] = True
    return renumber(table.filter(pa.array(~is_val))), renumber(table.filter(pa.array(is_val)))


@dataclass
class ShardScan:
    """What checking one shard found, in sample order (picklable: worker processes send it back).
    `rows`: the kept samples' columns (no row numbers yet); `skipped`: (offset, record) of refused
    samples, the truncation last; `error`: on_error raise, the first bad sample's (message, reason),
    after the rows before it."""

    shard: str
    rows: dict[str, list]
    skipped: list[tuple[float, dict]]
    shapes: set
    error: tuple[str, str] | None = None


def scan_shard(shard: str, dataset: str, fields, num_classes: int | None, skip: bool, require_captions: bool,
               max_member_bytes: int, max_pixels: int | None, storage_options: dict | None = None) -> ShardScan:
    """Check every sample of one shard (check_sample) and collect what index.parquet keeps of it.
    Keys repeated within the shard are found here; repeats of earlier shards' keys by the caller,
    which alone sees every shard. Runs in a worker process (SplitScan) or inline."""
    names = [f.name for f in COMMON_SCHEMA if f.name != "row"] + [SOURCE_FIELD.name]
    out = ShardScan(shard, {k: [] for k in names}, [], set())
    seen: dict[str, str] = {}  # this shard's keys: `key in seen`, seen[key] -> shard
    expected, count = expected_sizes(shard), 0
    try:
        for sample in iter_shard(shard, max_member_bytes, storage_options):
            count += 1
            try:
                label, caption, shape, source = check_sample(sample, shard, fields, num_classes, seen,
                                                             require_captions, max_pixels)
            except ShardError as exc:
                if not skip:
                    out.error = (str(exc), reason_of(exc))
                    return out
                out.skipped.append((sample.offset, _skip_record(shard, sample.key, exc, _source_of(sample))))
                continue
            seen[sample.key] = shard
            out.shapes.add(shape)
            for k, v in (("uid", f"{dataset}/{sample.key}"), ("key", sample.key), ("shard", shard),
                         ("offset", sample.offset), ("label", label), ("caption", caption), ("source", source)):
                out.rows[k].append(v)
        if expected is not None and count != expected:
            raise ShardError(f"shard {shard}: truncated or corrupt tar: {count} samples, sizes.json says {expected}")
    except ShardError as exc:
        if not skip or "truncated or corrupt" not in str(exc):
            out.error = (str(exc), reason_of(exc))
            return out
        exc.reason = "truncated_shard"  # the rest of a truncated shard is unreadable: one counted skip
        out.skipped.append((math.inf, _skip_record(shard, None, exc)))
    return out


def _skip_record(shard: str, key: str | None, exc: Exception, source: str | None = None) -> dict:
    return {"shard": shard, "key": key, "source": source, "reason": reason_of(exc), "error": str(exc)}


AUTO_WORKERS_BYTES = 64 << 20  # index.workers: null uses processes from this much local shard data up


def default_workers(shards: list[str]) -> int:
    """Processes for the index's decode check (index.workers: null): the CPUs this process may use,
    at most 8, where the split is worth starting them for (a process costs about a second to start:
    at least AUTO_WORKERS_BYTES of local shards, or a remote split of several shards); else 1."""
    from pipeline.storage import is_url

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    local = [s for s in shards if not is_url(s)]
    size = sum(os.path.getsize(s) for s in local if os.path.isfile(s))
    big = size >= AUTO_WORKERS_BYTES or len(shards) - len(local) >= 4
    return max(1, min(8, cpus)) if big else 1


class SplitScan:
    """Reads and checks the samples of a split's shards, skipping or raising per on_error.

    The per-sample check (decoding every image) runs in `workers` processes, a shard each, at most
    two shards per worker in flight; results are taken in shard order, so the table, the skip list
    and the first error are the same for any number of workers, byte for byte. (One fault per
    sample is reported: a repeat of an earlier shard's key is found after the sample's own checks.)"""

    def __init__(self, dataset: str, entry, skip: bool, require_captions: bool = False,
                 max_member_bytes: int = MAX_MEMBER_BYTES, max_pixels: int | None = None, workers: int = 1):
        self.dataset, self.entry, self.skip, self.require_captions = dataset, entry, skip, require_captions
        self.max_member_bytes, self.max_pixels, self.workers = max_member_bytes, max_pixels, workers
        self.seen = SeenKeys()
        self.skipped: list[dict] = []
        self.shapes: set[tuple] = set()
        self.n_skipped = 0
        self.by_reason: dict[str, int] = {}

    def _count(self, record: dict) -> None:
        self.n_skipped += 1
        self.by_reason[record["reason"]] = self.by_reason.get(record["reason"], 0) + 1
        if len(self.skipped) < MAX_LISTED:
            self.skipped.append(record)

    def _scans(self, shards: list[str]):
        """ShardScan per shard, in shard order."""
        from pipeline.storage import is_url, options_for

        args = (self.dataset, self.entry.fields, self.entry.num_classes, self.skip, self.require_captions,
                self.max_member_bytes, self.max_pixels)
        opts = {s: options_for(s) if is_url(s) else None for s in shards}
        import multiprocessing

        # a daemonic process (a Dask worker's, by default) may not start processes: check inline there
        if self.workers <= 1 or len(shards) < 2 or multiprocessing.current_process().daemon:
            for s in shards:
                yield scan_shard(s, *args, opts[s])
            return
        from collections import deque
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool
        from itertools import islice

        # spawn: the caller may hold threads (Prefect, torch) that fork would copy mid-lock
        ex = ProcessPoolExecutor(min(self.workers, len(shards)), mp_context=multiprocessing.get_context("spawn"))
        try:
            todo = iter(shards)
            pending = deque(ex.submit(scan_shard, s, *args, opts[s]) for s in islice(todo, 2 * self.workers))
            while pending:
                try:
                    res = pending.popleft().result()
                except BrokenProcessPool:
                    raise CurateError("index: a worker process checking shards died (killed, or out of memory); "
                                      "index.workers: 1 checks them in this process") from None
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(ex.submit(scan_shard, nxt, *args, opts[nxt]))
                yield res
        finally:
            ex.shutdown(wait=True, cancel_futures=True)

    def read(self, shards: list[str], step=None) -> pa.Table:
        """The split's rows; built shard by shard into Arrow batches, so what stays in memory for
        the whole split is columnar (about the size of index.parquet), not Python objects.
        `step(1)` is told after each shard (the unit's progress)."""
        schema = COMMON_SCHEMA.append(SOURCE_FIELD)
        batches, rows = [], 0
        for scan in self._scans(shards):
            shard, cols = scan.shard, scan.rows
            repeats = self.seen.earlier(cols["key"])  # keys of earlier shards, in sample order
            for i in repeats:
                key = cols["key"][i]
                exc = bad_sample("repeated_key", f"shard {shard}: sample {key!r}: key repeated "
                                                 f"(also in shard {self.seen[key]})")
                if not self.skip:
                    raise exc
                scan.skipped.append((cols["offset"][i], _skip_record(shard, key, exc, cols["source"][i])))
            if scan.error is not None:
                exc = ShardError(scan.error[0])
                exc.reason = scan.error[1]
                raise exc
            if repeats:
                drop = set(repeats)
                cols = {k: [v for i, v in enumerate(col) if i not in drop] for k, col in cols.items()}
            for _, record in sorted(scan.skipped, key=lambda r: r[0]):
                self._count(record)
            self.shapes |= scan.shapes
            cols["row"] = list(range(rows, rows + len(cols["key"])))
            batch = pa.record_batch({k: cols[k] for k in schema.names}, schema=schema)
            rows += batch.num_rows
            batches.append(batch)
            self.seen.close_shard(shard, batch.column(schema.get_field_index("key")))
            if step is not None:
                step(1)
        return pa.Table.from_batches(batches, schema=schema)  # written as one table: same bytes as one chunk


class SeenKeys:
    """The keys of the shards indexed so far, for the repeated-key check, without a Python string
    per sample: their hashes as a sorted int64 array (a hit is confirmed against the shard's Arrow
    key column). `seen.earlier(keys)`, `key in seen`, `seen[key]` -> shard."""

    def __init__(self):
        self.hashes = np.empty(0, np.int64)
        self.owner = np.empty(0, np.int32)  # per hash: position in self.shards
        self.shards: list[tuple[str, pa.Array]] = []

    def close_shard(self, shard: str, keys: pa.Array) -> None:
        h = np.fromiter((hash(k) for k in keys.to_pylist()), np.int64, len(keys))
        self.shards.append((shard, keys))
        h = np.sort(h)  # two sorted runs: the stable sort (timsort) merges them in linear time
        hashes = np.concatenate([self.hashes, h])
        owner = np.concatenate([self.owner, np.full(len(h), len(self.shards) - 1, np.int32)])
        order = np.argsort(hashes, kind="stable")
        self.hashes, self.owner = hashes[order], owner[order]

    def earlier(self, keys: list[str]) -> list[int]:
        """Positions of the keys that an earlier shard holds."""
        if not len(self.hashes) or not keys:
            return []
        h = np.fromiter((hash(k) for k in keys), np.int64, len(keys))
        at = np.minimum(np.searchsorted(self.hashes, h), len(self.hashes) - 1)  # hashes are sorted
        return [int(i) for i in np.flatnonzero(self.hashes[at] == h) if keys[i] in self]

    def _find(self, key: str) -> str | None:
        h = hash(key)
        i = int(np.searchsorted(self.hashes, h))
        while i < len(self.hashes) and self.hashes[i] == h:
            shard, keys = self.shards[self.owner[i]]
            if key in keys.to_pylist():  # a hash hit: rare (a repeated key, or a collision)
                return shard
            i += 1
        return None

    def __contains__(self, key: str) -> bool:
        return self._find(key) is not None

    def __getitem__(self, key: str) -> str:
        found = self._find(key)
        if found is None:
            raise KeyError(key)
        return found


def _source_of(sample) -> str | None:
    """A refused sample's source file, for the skip list (None if its json does not parse)."""
    try:
        return sample_source(decode_json(sample.members["json"])) if "json" in sample.members else None
    except ShardError:
        return None
