"""flow: how `curate run` executes the units (affects no output)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Section


class FlowConfig(Section):
    task_runner: Literal["default", "dask"] = "default"
    n_workers: int = Field(2, ge=1)
