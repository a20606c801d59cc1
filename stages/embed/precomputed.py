"""embed precomputed: embeddings the user already has (clip-retrieval, img2dataset, DataComp),
aligned to the index by key and written as the other methods write theirs.

Sources (embed.path, and embed.text_path for captions):
- a `.npy` [M, D] whose rows `embed.keys` names: a Parquet file with a `key` (or `uid`) column,
  row for row;
- Parquet: one file, a folder (its *.parquet) or a glob, each file with a `key` (or `uid`)
  column and a float list column (fixed-size or not): `embed.column`, else the one named
  `embedding`, else the only list column.
A `key` column matches index.parquet's `key` (the WebDataset `__key__`), a `uid` column its
`uid` (`<dataset>/<key>`). Rows of the index's val.parquet (held-out validation rows) are
matched too and go to val_embeddings.npy.

Every indexed row needs exactly one finite embedding of one dimension (and, with text_path, a
caption embedding of the same dimension: they are compared by cosine): a missing key, a key
given twice, a row of another length, a NaN or infinite value, a null, or values that are not
float are one-line errors naming the first offender. Keys that are in no index row (extra
keys) are an error too, unless `index.on_error: skip`: then the index may have left out
samples the embeddings still cover, so extra keys are counted (metrics `extra_keys`) and
ignored. A missing or bad embedding of an indexed row stays an error under skip, since selection
cannot leave out a row the index kept: remove the sample from the shards or fix its embedding.

Two passes: the keys of every file first (Arrow strings; one hash lookup against the index),
so key errors come before any embedding is read; then the values, BATCH rows at a time (Parquet
read through a small buffer, a .npy by plain reads: neither is mapped into memory), written
with positional writes into a preallocated .npy. Memory: the keys, one int64 per source row,
and a batch; never [N, D]. float16 sources stay float16 (as open_clip writes); others float32.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config.embed import PRECOMPUTED_FIELDS
from pipeline.errors import CurateError
from pipeline.fingerprint import hash_file_cached

BATCH = 8192  # rows per batch of values (8192 x 512 float32 = 16 MB; Arrow's peak is a few times that)
READ_BUFFER = 1 << 22  # Parquet read buffer: a large row group is streamed, not loaded whole
FIELDS = PRECOMPUTED_FIELDS  # path, keys, text_path, column, text_column
KEY_COLUMNS = ("key", "uid")  # a `key` column matches the index's key, a `uid` column its uid
EMBEDDING_COLUMN = "embedding"


def _fail(msg: str):
    raise CurateError(f"embed precomputed: {msg}")


def source_files(path: str) -> list[Path]:
    """The files `path` names: itself, a folder's *.parquet, or a glob's matches, sorted."""
    if any(ch in path for ch in "*?["):
        return sorted(Path(p) for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    p = Path(path)
    if p.is_dir():
        return sorted(q for q in p.glob("*.parquet") if q.is_file())
    return [p] if p.is_file() else []


def stage_config(embed, on_error: str) -> dict:
    """embed's fingerprinted config for method precomputed: the settings and the sha256 of every
    file they name (so a changed byte, or a file added to a folder, makes embed stale)."""
    c = {"method": "precomputed", **{f: getattr(embed, f) for f in FIELDS}, "on_error": on_error}
    c["files"] = {f: [[str(p), hash_file_cached(p)] for p in source_files(c[f])]
                  for f in ("path", "keys", "text_path") if c[f] is not None}
    return c


# ----------------------------------------------------------------- sources
@dataclass
class Source:
    """One file: its keys (all of them, as Arrow strings), which index column they match, and
    its values in batches of [m, D] floats."""

    name: str
    keys: pa.Array
    kind: str  # "key" or "uid"
    dtype: np.dtype  # of the values as stored
    batches: Callable[[], Iterator[tuple[int, np.ndarray]]]  # (first row, values)


def _key_column(names: list[str], where: str) -> str:
    for k in KEY_COLUMNS:
        if k in names:
            return k
    _fail(f"{where} has no key or uid column (columns: {', '.join(names)})")


def _strings(arr, where: str) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], arr.type)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        _fail(f"{where}: keys must be strings, the key column is {arr.type}")
    if arr.null_count:
        _fail(f"{where} row {int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])} has no key (null)")
    return arr.cast(pa.string())


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _embedding_column(schema: pa.Schema, column: str | None, where: str) -> str:
    if column is not None:
        if column not in schema.names:
            _fail(f"{where} has no column {column!r} (columns: {', '.join(schema.names)})")
        name = column
    elif EMBEDDING_COLUMN in schema.names:
        name = EMBEDDING_COLUMN
    else:
        lists = [f.name for f in schema if _is_list(f.type)]
        if not lists:
            _fail(f"{where} has no list column of embeddings (columns: {', '.join(schema.names)})")
        if len(lists) > 1:
            _fail(f"{where} has several list columns ({', '.join(lists)}): name one with embed.column")
        name = lists[0]
    t = schema.field(name).type
    if not _is_list(t):
        _fail(f"{where}: column {name!r} is {t}, not a list of floats")
    if not pa.types.is_floating(t.value_type):
        _fail(f"{where}: column {name!r} holds {t.value_type}, not floats (float16/32/64)")
    return name


def _list_rows(arr, keys: pa.Array, where: str) -> np.ndarray:
    """A list column's batch as [m, D] numpy (no Python objects); a null row, a null value or a
    row of another length than the batch's first is an error naming its key."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    m = len(arr)
    if arr.null_count:
        i = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        _fail(f"{where}: key {keys[i].as_py()!r} has no embedding (null)")
    if pa.types.is_fixed_size_list(arr.type):
        d = arr.type.list_size
    else:
        lengths = np.diff(arr.offsets.to_numpy())
        d = int(lengths[0]) if m else 0
        bad = np.flatnonzero(lengths != d)
        if len(bad):
            i = int(bad[0])
            _fail(f"{where}: key {keys[i].as_py()!r} has {int(lengths[i])} values, key {keys[0].as_py()!r} has {d}")
    flat = arr.flatten()
    if flat.null_count:
        i = int(np.flatnonzero(flat.is_null().to_numpy(zero_copy_only=False))[0]) // max(d, 1)
        _fail(f"{where}: key {keys[i].as_py()!r} has a null value")
    return flat.to_numpy(zero_copy_only=False).reshape(m, d)


def _open_parquet(f: Path, where: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(f, pre_buffer=False, buffer_size=READ_BUFFER)
    except (pa.ArrowException, OSError) as exc:
        _fail(f"{where}: not a readable Parquet file ({str(exc).splitlines()[0]})")


def parquet_source(f: Path, column: str | None) -> Source:
    where = f.name
    pf = _open_parquet(f, where)
    schema = pf.schema_arrow
    kind = _key_column(schema.names, where)
    col = _embedding_column(schema, column, where)
    keys = _strings(pf.read(columns=[kind]).column(kind), where)

    def batches():
        first = 0
        for rb in _open_parquet(f, where).iter_batches(batch_size=BATCH, columns=[col], use_threads=False):
            yield first, _list_rows(rb.column(0), keys.slice(first, rb.num_rows), where)
            first += rb.num_rows

    return Source(where, keys, kind, np.dtype(schema.field(col).type.value_type.to_pandas_dtype()), batches)


def npy_source(path: Path, keys_path: str) -> Source:
    """A .npy read by plain file reads at row offsets (a memory map would count its pages as ours)."""
    where = path.name
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(fh) if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0(fh))
            offset = fh.tell()
    except (ValueError, OSError, EOFError) as exc:
        _fail(f"{path}: not a readable .npy ({str(exc).splitlines()[0]})")
    if len(shape) != 2:
        _fail(f"{where} has shape {list(shape)}, expected [rows, dim]")
    if dtype.kind != "f":
        _fail(f"{where} holds {dtype}, not floats (float16/32/64)")
    if fortran and shape[0] > 1 and shape[1] > 1:
        _fail(f"{where} is Fortran-ordered: save it row-major (np.save(path, np.ascontiguousarray(x)))")
    if os.path.getsize(path) < offset + shape[0] * shape[1] * dtype.itemsize:
        _fail(f"{where} is shorter than its header's shape {list(shape)} (truncated)")
    kfiles = source_files(keys_path)
    if len(kfiles) != 1 or kfiles[0].suffix == ".npy":
        _fail(f"keys {keys_path}: expected one Parquet file with a key or uid column")
    kf = _open_parquet(kfiles[0], f"keys {kfiles[0].name}")
    kind = _key_column(kf.schema_arrow.names, kfiles[0].name)
    keys = _strings(kf.read(columns=[kind]).column(kind), kfiles[0].name)
    if len(keys) != shape[0]:
        _fail(f"keys {kfiles[0].name} has {len(keys)} rows, {where} has {shape[0]}: they must match row for row")
    rows, d = shape

    def batches():
        with open(path, "rb") as fh:
            for first in range(0, rows, BATCH):
                m = min(BATCH, rows - first)
                fh.seek(offset + first * d * dtype.itemsize)
                yield first, np.fromfile(fh, dtype=dtype, count=m * d).reshape(m, d)

    return Source(where, keys, kind, dtype, batches)


def sources_of(path: str, keys: str | None, column: str | None, what: str) -> list[Source]:
    files = source_files(path)
    if not files:
        _fail(f"{what} {path}: no such file (or no *.parquet there)")
    if files[0].suffix == ".npy":
        if len(files) > 1:
            _fail(f"{what} {path}: names {len(files)} .npy files; give one, with keys")
        return [npy_source(files[0], keys)]
    return [parquet_source(f, column) for f in files]


# ----------------------------------------------------------------- aligning to the index
@dataclass
class Targets:
    """The rows embeddings are aligned to: the index (positions 0..n-1), then the val rows."""

    key: pa.Array
    uid: pa.Array
    n_index: int

    @property
    def total(self) -> int:
        return len(self.key)

    def label(self, pos: int) -> str:
        part, row = ("index", pos) if pos < self.n_index else ("val", pos - self.n_index)
        return f"{part} row {row} (key {self.key[pos].as_py()!r})"


def targets_of(index: pa.Table, val: pa.Table | None) -> Targets:
    tables = [index] + ([val] if val is not None else [])
    col = lambda t, c: t.column(c).combine_chunks().cast(pa.string())  # noqa: E731
    if val is not None and val.num_rows:
        both = pc.is_in(col(val, "key"), value_set=col(index, "key"))
        if pc.any(both).as_py():
            k = col(val, "key").filter(both)[0].as_py()
            _fail(f"the index and its val rows share key {k!r}: embeddings named by key cannot tell them apart")
    return Targets(pa.concat_arrays([col(t, "key") for t in tables]), pa.concat_arrays([col(t, "uid") for t in tables]),
                   index.num_rows)


def positions(sources: list[Source], t: Targets, skip_extra: bool, what: str) -> tuple[list[np.ndarray], int, str | None]:
    """Per source, the target position of each row (-1: an extra key, allowed under skip); checks
    that no key repeats and every target row is covered. (positions, extras, first extra key)."""
    pos: list[np.ndarray | None] = [None] * len(sources)
    for kind in KEY_COLUMNS:  # one hash lookup per kind, over all files' keys together
        which = [i for i, s in enumerate(sources) if s.kind == kind]
        if not which:
            continue
        keys = pa.concat_arrays([sources[i].keys for i in which])
        found = pc.index_in(keys, value_set=t.key if kind == "key" else t.uid)
        flat = found.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        for i, part in zip(which, np.split(flat, np.cumsum([len(sources[i].keys) for i in which])[:-1])):
            pos[i] = part
    extra, first_extra = 0, None
    seen = np.full(t.total, -1, np.int64)  # which source row (counted over all sources) holds each position
    base = 0
    for s, p in zip(sources, pos):
        miss = np.flatnonzero(p < 0)
        if len(miss):
            if not skip_extra:
                _fail(f"{what} {s.name} row {int(miss[0])}: {s.kind} {s.keys[int(miss[0])].as_py()!r} is in no index "
                      "row (extra key; index.on_error: skip ignores them)")
            extra += len(miss)
            first_extra = first_extra or s.keys[int(miss[0])].as_py()
        ok = np.flatnonzero(p >= 0)
        again = ok[(seen[p[ok]] >= 0) | _later_duplicates(p[ok])]
        if len(again):
            r = int(again[0])
            _fail(f"{what} {s.name} row {r}: {s.kind} {s.keys[r].as_py()!r} has a second embedding (key repeated)")
        seen[p[ok]] = base + ok
        base += len(p)
    missing = np.flatnonzero(seen < 0)
    if len(missing):
        _fail(f"{what}: {t.label(int(missing[0]))} has no embedding (missing key; {len(missing)} of {t.total} rows "
              "missing)")
    return pos, extra, first_extra


def _later_duplicates(p: np.ndarray) -> np.ndarray:
    """True where a position repeats an earlier one of `p`."""
    order = np.argsort(p, kind="stable")
    dup = np.zeros(len(p), bool)
    dup[1:] = p[order][1:] == p[order][:-1]
    out = np.zeros(len(p), bool)
    out[order] = dup
    return out


class NpyRows:
    """A preallocated .npy (np.save's header and layout) written by row with positional writes:
    the page cache holds the data, not this process; rows adjacent in the file go in one write."""

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, int]):
        if shape[0] == 0:
            np.save(path, np.zeros(shape, dtype))
            self.fd = None
            return
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)  # header + sparse body
        self.offset = mm.offset
        del mm
        self.fd = os.open(path, os.O_WRONLY)
        self.row_bytes = shape[1] * np.dtype(dtype).itemsize

    def write(self, pos: np.ndarray, rows: np.ndarray) -> None:
        if not len(pos):
            return
        order = np.argsort(pos, kind="stable")
        pos, rows = pos[order], np.ascontiguousarray(rows[order])
        cuts = np.flatnonzero(np.diff(pos) != 1) + 1
        for a, b in zip([0, *cuts], [*cuts, len(pos)]):
            os.pwrite(self.fd, memoryview(rows[a:b]).cast("B"), self.offset + int(pos[a]) * self.row_bytes)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def write_part(sources: list[Source], pos: list[np.ndarray], t: Targets, paths: list[Path], what: str,
               dim: int | None, progress=None) -> tuple[int, np.dtype]:
    """The values pass: check and write every source row that has a target. (dim, dtype written)."""
    dtype = np.dtype(np.float16 if all(s.dtype == np.float16 for s in sources) else np.float32)
    outs: list[NpyRows] | None = None
    sizes = [t.n_index, t.total - t.n_index][:len(paths)]
    try:
        for s, p in zip(sources, pos):
            for first, vals in s.batches():
                m, d = vals.shape
                if m == 0:
                    continue
                where = f"{what} {s.name} row {first}: {s.kind} {s.keys[first].as_py()!r}"
                if dim is None:
                    dim = d
                if d != dim:
                    _fail(f"{where} has dimension {d}, expected {dim} "
                          + ("(the image embeddings': they are compared by cosine)" if what == "text_path"
                             else "(the first row's)"))
                if outs is None:
                    outs = [NpyRows(path, dtype, (n, dim)) for path, n in zip(paths, sizes)]
                with np.errstate(over="ignore"):
                    cast = vals.astype(dtype, copy=False)
                q = p[first:first + m]
                bad = ~np.isfinite(cast).all(1) & (q >= 0)  # an ignored extra row is not checked
                if bad.any():
                    r = first + int(np.flatnonzero(bad)[0])
                    why = "overflows float32" if np.isfinite(vals[r - first]).all() else "has a NaN or infinite value"
                    _fail(f"{what} {s.name} row {r}: {s.kind} {s.keys[r].as_py()!r} {why}")
                lo, hi = (q >= 0) & (q < t.n_index), q >= t.n_index
                outs[0].write(q[lo], cast[lo])
                if hi.any():
                    outs[1].write(q[hi] - t.n_index, cast[hi])
                if progress is not None:
                    progress(m)
        if outs is None:  # no rows anywhere (an empty index and empty files)
            outs = [NpyRows(path, dtype, (n, dim or 0)) for path, n in zip(paths, sizes)]
    finally:
        for o in outs or []:
            o.close()
    return int(dim or 0), dtype


def count_rows(path: str, keys: str | None = None) -> int:
    """Rows the files of `path` hold (Parquet metadata, the .npy's keys): the progress bar's total."""
    total = 0
    for f in source_files(path):
        try:
            total += pq.ParquetFile(f).metadata.num_rows if f.suffix != ".npy" else \
                pq.ParquetFile(source_files(keys or "")[0]).metadata.num_rows
        except (OSError, IndexError, pa.ArrowException):
            pass  # the read itself reports it
    return total


# ----------------------------------------------------------------- the embed step
def write_precomputed(c: dict, index: pa.Table, val: pa.Table | None, out: Path, progress=None) -> dict:
    """Write embeddings.npy (and text_embeddings.npy, val_*.npy where the index has val rows,
    embeddings.json) under `out` from config `c` (stage_config's); returns the metrics.
    `progress(n)` hears every batch of n source rows."""
    t = targets_of(index, val)
    skip = c["on_error"] == "skip"
    parts = [("path", c["path"], c["column"], ("embeddings.npy", "val_embeddings.npy")),
             ("text_path", c["text_path"], c["text_column"], ("text_embeddings.npy", "val_text_embeddings.npy"))]
    parts = [p for p in parts if p[1] is not None]
    meta: dict = {"method": "precomputed"}
    metrics: dict = {"samples": index.num_rows}
    found = []
    for what, path, column, names in parts:  # every key check before any value is read
        sources = sources_of(path, c["keys"], column, what)
        found.append((sources, *positions(sources, t, skip, what)))
    dim = None
    for (what, path, column, names), (sources, pos, extra, first_extra) in zip(parts, found):
        outputs = [out / n for n in names[:2 if val is not None else 1]]
        dim, dtype = write_part(sources, pos, t, outputs, what, dim, progress)
        meta.update({n: [rows, dim] for n, rows in zip(names, [t.n_index, t.total - t.n_index][:len(outputs)])})
        meta[f"{what}_files"] = [s.name for s in sources]
        meta["dtype" if what == "path" else "text_dtype"] = str(dtype)
        suffix = "" if what == "path" else "_text"
        metrics[f"extra_keys{suffix}"] = extra
        if first_extra is not None:
            metrics[f"first_extra_key{suffix}"] = first_extra
    (out / "embeddings.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    metrics["dim"] = int(dim or 0)
    return metrics
