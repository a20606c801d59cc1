"""materialize: the compact shards of each selection, and their catalog entry."""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field, field_validator

from pipeline.storage import is_secret, is_url, redact_url

from .base import Section


class MaterializeConfig(Section):
    # Shard sizing (pipeline.shards.plan_shards): balanced shards of at most `shard_size` samples,
    # at least `min_shards` of them while each keeps 8 samples (so any subset of 64 or more
    # samples has 8 shards for DataLoader workers to share), split further where a shard
    # would pass `shard_bytes`.
    shard_size: int = Field(10000, ge=1)
    shard_bytes: int = Field(64 * 2**20, ge=1)
    min_shards: int = Field(8, ge=1)
    # register_entry: add (or update) the catalog entry `<dataset>/<run folder name>/<selection>` for the subset;
    # an entry curate did not create is never replaced, and a catalog that cannot be written
    # leaves the subset unregistered, with a note, rather than failing the unit.
    register_entry: bool = True
    # export: also upload each subset (shards/, sizes.json, then manifest.parquet last) to
    # `<export>/<selection>/`, an fsspec URL (s3://bucket/prefix) or an absolute path; the run keeps
    # its copy. storage_options: fsspec's options for it (unset: the dataset entry's). No credentials
    # here, since the config is saved in run.json: they come from the environment, a profile or
    # the catalog entry.
    export: str | None = None
    storage_options: dict[str, Any] | None = None

    @field_validator("export")
    @classmethod
    def _where(cls, v):
        if v is not None:
            if not (is_url(v) or os.path.isabs(v)):
                raise ValueError("must be a URL (s3://bucket/prefix) or an absolute path")
            if redact_url(v) != v:
                raise ValueError("must not hold credentials (they come from the environment or a profile)")
        return v

    @field_validator("storage_options")
    @classmethod
    def _no_credentials(cls, v):
        def check(d, where):
            for k, x in d.items():
                if is_secret(k):
                    raise ValueError(f"'{where}{k}' is a credential; a run config is saved in run.json, so "
                                     "credentials come from the environment, a profile or the catalog entry")
                if isinstance(x, dict):
                    check(x, f"{where}{k}.")
        check(v or {}, "")
        return v
