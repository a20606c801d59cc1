"""The stage contract: what a stage declares and what it is handed when it runs.

A stage is small and composable (datatrove's PipelineStep, NeMo Curator's declared
resources): it names its version, the config it depends on, its upstream units and
resources, and implements `run(ctx)`, writing only under `ctx.out`. The runner
(pipeline.runner) does fingerprints, skipping, atomic placement and `_stage.json`.

A stage sees the rest of the run only through its context: `ctx.upstream(unit)` (the path
and record of a unit it declared), `ctx.index()` (the training pool), `ctx.images(...)`,
`ctx.ancestors()` (every unit upstream, for curation cost). It imports no other stage and
reads no `_stage.json` itself.

A *unit* is one output directory: `index`, `embed`, `select/<sel>`,
`materialize/<sel>`, `experts`, `distill/<name>`, `verify/<set>`, `report`. Per-selection
stages have one unit per selection; `distill` has one per distill spec and `verify` one per
training set (`item` resolves the name).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from .errors import CurateError

if TYPE_CHECKING:
    import pyarrow as pa

    from .catalog import Catalog, DatasetEntry
    from .config import RunConfig, SelectSpec


@dataclass(frozen=True)
class Resources:
    """What one unit needs to run: executors place it (GPU units on GPU workers) and the
    unit's `_stage.json` records it. gpus > 0 means "a GPU when the run has one"."""

    cpus: float = 1
    gpus: float = 0
    gpu_memory_gb: float = 0

    def dump(self) -> dict[str, float]:
        return {"cpus": self.cpus, "gpus": self.gpus, "gpu_memory_gb": self.gpu_memory_gb}


@dataclass(frozen=True)
class Upstream:
    """A finished unit this one reads: where its outputs are, and what the runner recorded."""

    unit: str
    path: Path
    record: dict


@dataclass
class Pool:
    """The training pool (or its validation part) as the index stage wrote it."""

    table: "pa.Table"
    labels: np.ndarray  # int64, -1 where missing
    channels: int  # every split is converted to the pool's channel count
    num_classes: int | None


@dataclass
class StageContext:
    run_dir: Path
    unit: str
    out: Path  # temporary directory; renamed into place when run() returns
    cfg: "RunConfig"
    catalog: "Catalog"
    config: dict  # the part of the config this unit depends on
    fingerprint: str
    sel: "SelectSpec | None" = None
    upstreams: dict[str, Upstream] = field(default_factory=dict)  # the units this one declared
    ancestor_units: dict[str, Upstream] = field(default_factory=dict)  # every unit upstream, transitively
    graph: dict[str, list[str]] = field(default_factory=dict)  # ancestor -> the units it declared upstream
    metrics: dict[str, Any] = field(default_factory=dict)

    def upstream(self, unit: str) -> Upstream:
        if unit not in self.upstreams:
            raise CurateError(f"{self.unit} reads {unit}, which its stage does not declare upstream")
        return self.upstreams[unit]

    def input_dir(self, unit: str) -> Path:
        return self.upstream(unit).path

    def has_upstream(self, unit: str) -> bool:
        return unit in self.upstreams

    def ancestors(self, of: str | None = None) -> list[Upstream]:
        """Every unit upstream of this one, or of `of` (itself included), in pipeline order."""
        if of is None:
            return list(self.ancestor_units.values())
        seen, todo = set(), [of]
        while todo:
            u = todo.pop()
            if u not in seen:
                seen.add(u)
                todo += self.graph.get(u, [])
        return [up for u, up in self.ancestor_units.items() if u in seen]

    @property
    def entry(self) -> "DatasetEntry":
        return self.catalog.entry(self.cfg.dataset)

    def index(self, part: str = "index") -> Pool:
        """The training pool (`index`) or the validation rows (`val`) of the index unit."""
        from .arrays import label_array
        from .manifest import read_parquet

        up = self.upstream("index")
        table = read_parquet(up.path / f"{part}.parquet")
        return Pool(table, label_array(table), int(up.record["metrics"]["channels"]), self.entry.num_classes)

    def has_val(self) -> bool:
        return (self.upstream("index").path / "val.parquet").exists()

    def images(self, table: "pa.Table", image_size: int | None) -> np.ndarray:
        """uint8 [N, C, H, W] of a manifest's rows (shard + offset), in the pool's channels,
        within the index's member and pixel caps."""
        from .arrays import load_images

        channels = int(self.upstream("index").record["metrics"]["channels"])
        return load_images(table.column("shard").to_pylist(), table.column("offset").to_pylist(),
                           self.entry.fields.image, image_size, channels=channels,
                           max_member_bytes=self.cfg.index.max_member_bytes, max_pixels=self.cfg.index.max_pixels)

    def index_arrays(self, image_size: int | None, part: str = "index"):
        """(pool, images) of the training pool or its validation rows."""
        pool = self.index(part)
        return pool, self.images(pool.table, image_size)

    def progress(self, total: int, desc: str, unit: str = ""):
        """A context manager yielding `step(n)`: a terminal bar, and the orchestrator's report."""
        from .progress import progress

        return progress(total, desc, unit)

    @property
    def device(self):
        from .device import resolve_device

        return resolve_device(self.config.get("device", "auto"))


class Stage(ABC):
    name: ClassVar[str]
    version: ClassVar[int] = 1
    per_selection: ClassVar[bool] = False
    resources: ClassVar[Resources] = Resources()

    def units(self, cfg: "RunConfig") -> list[str]:
        if self.per_selection:
            return [f"{self.name}/{s.sel_name}" for s in cfg.select]
        return [self.name]

    def item(self, cfg: "RunConfig", name: str):
        """The spec a unit `<stage>/<name>` stands for (a selection here; distill overrides)."""
        return cfg.selection(name) if self.per_selection else None

    def config(self, cfg: "RunConfig", sel: "SelectSpec | None", entry: "DatasetEntry | None" = None) -> dict:
        """The settings this unit depends on (its fingerprint covers exactly these)."""
        return getattr(cfg, self.name).model_dump()

    def upstream(self, cfg: "RunConfig", sel: "SelectSpec | None") -> list[str]:
        """Units whose outputs this unit reads."""
        return []

    def external_inputs(self, cfg: "RunConfig", sel: "SelectSpec | None",
                        entry: "DatasetEntry | None" = None) -> list[tuple[str, str]]:
        """(dataset, split) pairs read straight from the catalog."""
        return []

    def unit_resources(self, cfg: "RunConfig", sel: "SelectSpec | None") -> Resources:
        """What this unit needs; a stage whose need depends on its config overrides this."""
        return self.resources

    @abstractmethod
    def run(self, ctx: StageContext) -> None:
        """Compute the unit's outputs into ctx.out and put figures in ctx.metrics."""
