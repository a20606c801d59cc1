"""Run store and stage runner: fingerprints chained from inputs, skip when fresh,
stale when anything upstream changed, atomic outputs, `_stage.json` per unit.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import platform
import shutil
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .catalog import Catalog
from .config import RunConfig, SelectSpec, load_config
from .errors import CurateError
from .fingerprint import hash_file, stage_fingerprint
from .shards import write_text_atomic

STAGE_FILE = "_stage.json"
STAGE_ORDER = ["index", "embed_part", "embed", "score", "select", "materialize", "experts", "distill", "verify"]


def _stages():
    from stages.registry import STAGES  # stages depend on pipeline, not the reverse at import

    return STAGES


def versions() -> dict[str, str]:
    import numpy
    import pyarrow
    import torch

    return {"curate": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "pyarrow": pyarrow.__version__}


class Runner:
    """Everything about one run directory: its config, units, states and execution."""

    def __init__(self, cfg: RunConfig, catalog: Catalog, run_dir: str | os.PathLike | None = None):
        self.cfg = cfg
        self.catalog = catalog
        self.run_dir = Path(run_dir or cfg.run).absolute()
        if cfg.dataset in catalog.entries:
            cfg._dataset_splits = dict(catalog.entries[cfg.dataset].splits)
        self._fp: dict[str, str] = {}
        self._ext: dict[tuple[str, str], str] = {}

    # ------------------------------------------------------------ loading
    @classmethod
    def from_run_dir(cls, run_dir: str | os.PathLike, config: str | None = None,
                     overrides: list[str] = (), catalog: str | None = None) -> "Runner":
        """Config from `config` if given, else from run_dir/run.json; then overrides."""
        run_dir = Path(run_dir)
        recorded = {}
        if (run_dir / "run.json").exists():
            recorded = json.loads((run_dir / "run.json").read_text())
        if config is None and not recorded:
            raise CurateError(f"run {run_dir}: no run.json here; pass --config CONFIG.yaml")
        source = config if config is not None else recorded["config"]
        cfg = load_config(source, list(overrides))
        cat_path = catalog or os.environ.get("CURATE_CATALOG") or recorded.get("catalog")
        return cls(cfg, Catalog.load(cat_path), run_dir)

    def write_run_json(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        body = {"config": self.cfg.model_dump(mode="json"), "dataset": self.cfg.dataset,
                "dataset_entry": self.catalog.entry(self.cfg.dataset).model_dump(),
                "catalog": str(self.catalog.path), "versions": versions()}
        write_text_atomic(self.run_dir / "run.json", json.dumps(body, indent=1, sort_keys=True) + "\n")

    # ------------------------------------------------------------ units
    def units(self, stage: str | None = None) -> list[str]:
        names = [stage] if stage else STAGE_ORDER
        for n in names:
            if n not in _stages():
                raise CurateError(f"no stage named '{n}' (stages: {', '.join(STAGE_ORDER)})")
        return [u for n in names for u in _stages()[n].units(self.cfg)]

    def _resolve(self, unit: str):
        name, _, sel_name = unit.partition("/")
        if name not in _stages():
            raise CurateError(f"no stage named '{name}'")
        stage = _stages()[name]
        return stage, stage.item(self.cfg, sel_name)

    def external_fingerprint(self, dataset: str, split: str) -> str:
        if (dataset, split) not in self._ext:
            self._ext[(dataset, split)] = self.catalog.fingerprint(dataset, split)
        return self._ext[(dataset, split)]

    def inputs(self, unit: str) -> dict[str, str]:
        stage, sel = self._resolve(unit)
        ins = {u: self.fingerprint(u) for u in stage.upstream(self.cfg, sel)}
        for ds, split in stage.external_inputs(self.cfg, sel):
            ins[f"dataset:{ds}:{split}"] = self.external_fingerprint(ds, split)
        return ins

    def fingerprint(self, unit: str) -> str:
        """What the unit's fingerprint should be given the config and current inputs."""
        if unit not in self._fp:
            stage, sel = self._resolve(unit)
            self._fp[unit] = stage_fingerprint(stage.name, stage.version, stage.config(self.cfg, sel), self.inputs(unit))
        return self._fp[unit]

    def record(self, unit: str) -> dict | None:
        path = self.run_dir / unit / STAGE_FILE
        return json.loads(path.read_text()) if path.exists() else None

    def state(self, unit: str) -> str:
        """'done' (fresh), 'stale' (outputs from other inputs or config) or 'missing'."""
        rec = self.record(unit)
        if rec is None:
            return "missing"
        if rec["fingerprint"] != self.fingerprint(unit):
            return "stale"
        # an upstream recomputed since (e.g. --force on a GPU, where outputs may differ) makes this stale too
        for up, recorded in rec.get("upstream_outputs", {}).items():
            up_rec = self.record(up)
            if up_rec is None or up_rec.get("output_hash") != recorded:
                return "stale"
        return "done"

    # ------------------------------------------------------------ running
    def run(self, unit: str, force: bool = False) -> dict:
        """Run one unit unless fresh; returns {unit, fingerprint, status, wall_seconds}."""
        stage, sel = self._resolve(unit)
        fp = self.fingerprint(unit)
        if not force and self.state(unit) == "done":
            return {"unit": unit, "fingerprint": fp, "status": "cached", "wall_seconds": 0.0}
        for up in stage.upstream(self.cfg, sel):
            st = self.state(up)
            if st != "done":
                raise CurateError(f"{unit} needs {up}, which is {st}: run `curate stage {up.split('/')[0]} --run {self.run_dir}` first")
        from .stage import StageContext

        final = self.run_dir / unit
        final.parent.mkdir(parents=True, exist_ok=True)
        _clean_leftovers(final)
        tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        ctx = StageContext(run_dir=self.run_dir, unit=unit, out=tmp, cfg=self.cfg, catalog=self.catalog,
                           config=stage.config(self.cfg, sel), fingerprint=fp, sel=sel)
        started = datetime.now(timezone.utc)
        t0 = time.perf_counter()
        try:
            stage.run(ctx)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        wall = time.perf_counter() - t0
        device = ctx.config.get("device")
        rec = {"stage": stage.name, "unit": unit, "stage_version": stage.version, "fingerprint": fp,
               "inputs": self.inputs(unit), "config": ctx.config, "resources": stage.resources,
               "started": started.isoformat(), "ended": datetime.now(timezone.utc).isoformat(),
               "wall_seconds": round(wall, 3), "device": str(ctx.device) if device else "cpu",
               "host": platform.node(), "pid": os.getpid(), "output_hash": output_hash(tmp),
               "upstream_outputs": {up: self.record(up).get("output_hash") for up in stage.upstream(self.cfg, sel)},
               "metrics": ctx.metrics}
        (tmp / STAGE_FILE).write_text(json.dumps(rec, indent=1, sort_keys=True, default=str) + "\n")
        _swap_into_place(tmp, final)
        return {"unit": unit, "fingerprint": fp, "status": "computed", "wall_seconds": round(wall, 3)}

    def run_all(self, force: bool = False) -> list[dict]:
        self.write_run_json()
        return [self.run(u, force) for u in self.units()]

    def status(self) -> list[dict]:
        rows = []
        for unit in self.units():
            rec = self.record(unit) or {}
            rows.append({"unit": unit, "state": self.state(unit), "fingerprint": self.fingerprint(unit)[:12],
                         "wall_seconds": rec.get("wall_seconds"), "ended": rec.get("ended")})
        return rows


def _clean_leftovers(final: Path) -> None:
    """Remove temporary directories a killed run of this unit left behind (this unit's only:
    `.tmp-cifar-*` must not match a concurrent `.tmp-cifar-big-*`)."""
    pattern = re.compile(rf"\.(tmp|old)-{re.escape(final.name)}-[0-9a-f]{{8}}")
    for p in final.parent.iterdir():
        if pattern.fullmatch(p.name):
            shutil.rmtree(p, ignore_errors=True)


def output_hash(directory: Path) -> str:
    """sha256 over the relative names and bytes of every output file (not _stage.json)."""
    h = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != STAGE_FILE:
            h.update(str(p.relative_to(directory)).encode() + b"\0" + hash_file(p).encode())
    return h.hexdigest()


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Replace `final` with the complete `tmp` by renames: never a half-written `final`."""
    old = None
    if final.exists():
        old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
