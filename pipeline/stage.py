"""The stage contract: what a stage declares and what it is handed when it runs.

A stage is small and composable (datatrove's PipelineStep, NeMo Curator's declared
resources): it names its version, the config it depends on, its upstream units and
resources, and implements `run(ctx)`, writing only under `ctx.out`. The runner
(pipeline.runner) does fingerprints, skipping, atomic placement and `_stage.json`.

A *unit* is one output directory: `index`, `embed`, `select/<sel>`,
`materialize/<sel>`, `experts`, `distill/<name>`, `verify`. Per-selection stages have one
unit per selection; `distill` has one per distill spec (`item` resolves the name).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .catalog import Catalog
    from .config import RunConfig, SelectSpec


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
    metrics: dict[str, Any] = field(default_factory=dict)

    def input_dir(self, unit: str) -> Path:
        return self.run_dir / unit

    @property
    def device(self):
        from .device import resolve_device

        return resolve_device(self.config.get("device", "auto"))


class Stage(ABC):
    name: ClassVar[str]
    version: ClassVar[int] = 1
    per_selection: ClassVar[bool] = False
    resources: ClassVar[dict[str, Any]] = {"cpu": 1}

    def units(self, cfg: "RunConfig") -> list[str]:
        if self.per_selection:
            return [f"{self.name}/{s.sel_name}" for s in cfg.select]
        return [self.name]

    def item(self, cfg: "RunConfig", name: str):
        """The spec a unit `<stage>/<name>` stands for (a selection here; distill overrides)."""
        return cfg.selection(name) if self.per_selection else None

    def config(self, cfg: "RunConfig", sel: "SelectSpec | None") -> dict:
        """The settings this unit depends on (its fingerprint covers exactly these)."""
        return getattr(cfg, self.name).model_dump()

    def upstream(self, cfg: "RunConfig", sel: "SelectSpec | None") -> list[str]:
        """Units whose outputs this unit reads."""
        return []

    def external_inputs(self, cfg: "RunConfig", sel: "SelectSpec | None") -> list[tuple[str, str]]:
        """(dataset, split) pairs read straight from the catalog."""
        return []

    @abstractmethod
    def run(self, ctx: StageContext) -> None:
        """Compute the unit's outputs into ctx.out and put figures in ctx.metrics."""
