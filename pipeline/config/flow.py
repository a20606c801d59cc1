"""flow: how `curate run` executes the units (affects no output)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import Section

# tcp://HOST:PORT (tls:// too): a Dask scheduler's address, as `dask scheduler` prints it
ADDRESS = re.compile(r"(tcp|tls)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})")


class FlowConfig(Section):
    task_runner: Literal["default", "dask"] = "default"
    n_workers: int = Field(2, ge=1)  # workers of the LocalCluster the dask runner starts (no `address`)
    address: str | None = None  # a running Dask scheduler to attach to instead of starting a LocalCluster
    # seconds a unit may wait for a worker offering what it needs (a GPU) before the flow fails
    placement_timeout: float = Field(120.0, gt=0)

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is None:
            return v
        m = ADDRESS.fullmatch(v)
        if m is None or not 0 < int(m.group(3)) < 65536:
            raise ValueError(f"{v!r} is not a Dask scheduler address tcp://HOST:PORT (or tls://HOST:PORT)")
        return v

    @model_validator(mode="after")
    def _address_needs_dask(self):
        if self.address is not None and self.task_runner != "dask":
            raise ValueError("address needs task_runner: dask")
        return self
