"""materialize: the compact shards of each selection."""

from __future__ import annotations

from pydantic import Field

from .base import Section


class MaterializeConfig(Section):
    shard_size: int = Field(10000, ge=1)
