"""index: reading the training split (and holding out validation data)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Section


class IndexConfig(Section):
    on_error: Literal["raise", "skip"] = "raise"
    # held out of train when a validated score needs it and the catalog has no `val` split
    val_fraction: float = Field(0.1, gt=0, lt=1)
    # hostile input: a member larger than this is never read (64 MiB = pipeline.shards.MAX_MEMBER_BYTES),
    # an image whose header declares more pixels is never decoded (2**25: 8K UHD fits; PIL warns at 89M)
    max_member_bytes: int = Field(67_108_864, ge=1)
    max_pixels: int = Field(33_554_432, ge=1)
    # processes that decode and check shards (None: the CPUs this process may use, at most 8, where the
    # split holds 64 MiB of shards or more, else one); the index is the same for any count, so this
    # is not in its fingerprint
    workers: int | None = Field(None, ge=1, le=256)
