"""Parquet manifests: the common columns, and key-value metadata on every file."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import CurateError

COMMON_SCHEMA = pa.schema([
    ("row", pa.int64()),
    ("uid", pa.string()),
    ("key", pa.string()),
    ("shard", pa.string()),
    ("offset", pa.int32()),
    ("label", pa.int32()),
    ("caption", pa.string()),
])

# Where an ingested sample came from (its file, relative to the ingest's --src); null for sources
# without files (digits, idx, cifar). index.parquet adds it after the common columns, and every
# manifest built from the index carries it. It is not in COMMON_SCHEMA, so tables built without
# it (a distilled set's manifest, scores.parquet) stay valid.
SOURCE_FIELD = pa.field("source", pa.string())

SELECTION_FIELDS = [
    ("selected", pa.bool_()),
    ("weight", pa.float32()),
    ("rank", pa.int32()),
    ("method", pa.string()),
    ("budget", pa.float64()),
]


def write_parquet(table: pa.Table, path: str | os.PathLike, *, stage: str, stage_version: int,
                  fingerprint: str, extra: dict[str, str] | None = None) -> None:
    """Write `table` with stage/stage_version/fingerprint metadata; bytes depend only on content."""
    meta = {b"stage": stage.encode(), b"stage_version": str(stage_version).encode(),
            b"fingerprint": fingerprint.encode()}
    for k, v in (extra or {}).items():
        meta[k.encode()] = str(v).encode()
    table = table.replace_schema_metadata(meta)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, str(path), compression="zstd", write_statistics=True)


def read_parquet(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    if not os.path.isfile(path):
        raise CurateError(f"manifest {path}: no such file")
    return pq.read_table(str(path), columns=columns)


def parquet_metadata(path: str | os.PathLike) -> dict[str, str]:
    meta = pq.read_schema(str(path)).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items()}
