"""Run store and stage runner: fingerprints chained from inputs, skip when fresh,
stale when anything upstream changed, atomic outputs, `_stage.json` per unit.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import platform
import shutil
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .catalog import Catalog
from .config import RunConfig, load_config
from .errors import CurateError
from .fingerprint import hash_file, stage_fingerprint
from .locks import UnitLock, critical, is_stale, lock_path, read_holder, track_tmp, untrack_tmp, describe
from .shards import write_text_atomic

STAGE_FILE = "_stage.json"
RUN_FORMAT = "curate-run/1"  # marks a run.json curate wrote: only such a directory is reused


def load_plugin(group: str, name: str):
    """The object registered as `name` in an entry-point group (`curate.stages`: the stage
    registry; `curate.flows`: the flow runner, serve and deploy). pipeline imports no stage and
    no flow: they are handed in."""
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group=group) if ep.name == name]
    if len(found) != 1:
        raise CurateError(f"no entry point '{name}' in group '{group}': reinstall curate (`pip install -e .`)")
    return found[0].load()


def versions() -> dict[str, str]:
    import numpy
    import pyarrow
    import torch

    return {"curate": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "pyarrow": pyarrow.__version__}


class Runner:
    """Everything about one run directory: its config, units, states and execution."""

    def __init__(self, cfg: RunConfig, catalog: Catalog, run_dir: str | os.PathLike | None = None,
                 stages: dict | None = None):
        self.cfg = cfg
        self.catalog = catalog
        self.run_dir = Path(run_dir or cfg.run).absolute()
        self.stages = stages if stages is not None else load_plugin("curate.stages", "registry")
        self.entry = catalog.entries.get(cfg.dataset)
        self._fp: dict[str, str] = {}
        self._ext: dict[tuple[str, str], str] = {}
        self.wait = False  # a unit locked by another process: wait for it instead of failing

    # ------------------------------------------------------------ loading
    @classmethod
    def from_run_dir(cls, run_dir: str | os.PathLike, config: str | None = None,
                     overrides: list[str] = (), catalog: str | None = None, wait: bool = False) -> "Runner":
        """Config from `config` if given, else from run_dir/run.json; then overrides."""
        run_dir = Path(run_dir)
        recorded = read_run_json(run_dir) or {}
        if config is None and not recorded:
            raise CurateError(f"run {run_dir}: no run.json here; pass --config CONFIG.yaml")
        source = config if config is not None else recorded["config"]
        cfg = load_config(source, list(overrides))
        cat_path = catalog or os.environ.get("CURATE_CATALOG") or recorded.get("catalog")
        runner = cls(cfg, Catalog.load(cat_path), run_dir)
        runner.wait = wait
        return runner

    def claim(self) -> None:
        """Refuse a run directory curate did not create: only a new or empty one is adopted, and
        one with a curate run.json reused (nothing else in it is ever replaced)."""
        if read_run_json(self.run_dir) is not None or not self.run_dir.exists():
            return
        with os.scandir(self.run_dir) as it:
            first = next(it, None)
        if first is not None:
            raise CurateError(f"run {self.run_dir}: directory holds {first.name} but no curate run.json; "
                              "curate writes only into a new or empty run directory")

    def write_run_json(self) -> None:
        """Save the config (only if it changed: a cached run in a read-only directory needs no write)."""
        self.claim()
        body = {"format": RUN_FORMAT, "config": self.cfg.model_dump(mode="json"), "dataset": self.cfg.dataset,
                "dataset_entry": self.catalog.entry(self.cfg.dataset).model_dump(),
                "catalog": str(self.catalog.path), "versions": versions()}
        text = json.dumps(body, indent=1, sort_keys=True) + "\n"
        path = self.run_dir / "run.json"
        try:
            if path.is_file() and path.read_text() == text:
                return
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, text)
        except OSError as exc:
            raise CurateError(f"run {self.run_dir}: cannot write run.json ({exc.strerror})") from None

    # ------------------------------------------------------------ units
    def units(self, stage: str | None = None) -> list[str]:
        """Every unit of the run in pipeline order (the registry's), or those of one stage."""
        names = [stage] if stage else list(self.stages)
        for n in names:
            if n not in self.stages:
                raise CurateError(f"no stage named '{n}' (stages: {', '.join(self.stages)})")
        return [u for n in names for u in self.stages[n].units(self.cfg)]

    def _resolve(self, unit: str):
        name, _, sel_name = unit.partition("/")
        if name not in self.stages:
            raise CurateError(f"no stage named '{name}'")
        stage = self.stages[name]
        return stage, stage.item(self.cfg, sel_name)

    def upstream(self, unit: str) -> list[str]:
        """The units `unit` reads, as its stage declares them."""
        stage, sel = self._resolve(unit)
        return list(stage.upstream(self.cfg, sel))

    def ancestors(self, unit: str) -> list[str]:
        """Every unit upstream of `unit`, transitively, in pipeline order."""
        seen: set[str] = set()
        todo = self.upstream(unit)
        while todo:
            u = todo.pop()
            if u not in seen:
                seen.add(u)
                todo += self.upstream(u)
        return [u for u in self.units() if u in seen]

    def resources(self, unit: str):
        stage, sel = self._resolve(unit)
        return stage.unit_resources(self.cfg, sel)

    def unit_config(self, unit: str) -> dict:
        stage, sel = self._resolve(unit)
        return stage.config(self.cfg, sel, self.entry)

    def external_fingerprint(self, dataset: str, split: str) -> str:
        if (dataset, split) not in self._ext:
            self._ext[(dataset, split)] = self.catalog.fingerprint(dataset, split)
        return self._ext[(dataset, split)]

    def inputs(self, unit: str) -> dict[str, str]:
        stage, sel = self._resolve(unit)
        ins = {u: self.fingerprint(u) for u in stage.upstream(self.cfg, sel)}
        for ds, split in stage.external_inputs(self.cfg, sel, self.entry):
            ins[f"dataset:{ds}:{split}"] = self.external_fingerprint(ds, split)
        return ins

    def fingerprint(self, unit: str) -> str:
        """What the unit's fingerprint should be given the config and current inputs."""
        if unit not in self._fp:
            stage, sel = self._resolve(unit)
            self._fp[unit] = stage_fingerprint(stage.name, stage.version, self.unit_config(unit), self.inputs(unit))
        return self._fp[unit]

    def record(self, unit: str) -> dict | None:
        """The unit's `_stage.json`; None if absent, {} if unreadable (so never fresh)."""
        path = self.run_dir / unit / STAGE_FILE
        try:
            rec = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return rec if isinstance(rec, dict) else {}

    def state(self, unit: str, rehash: bool = False) -> str:
        """'done' (fresh), 'stale' (outputs from other inputs or config, changed on disk, or an
        upstream unit is not done) or 'missing'."""
        return self.explain(unit, rehash)[0]

    def explain(self, unit: str, rehash: bool = False, memo: dict | None = None) -> tuple[str, str]:
        """(state, why). Outputs are checked against the sizes and mtimes `_stage.json` recorded;
        a file whose mtime moved is rehashed, and rehash=True rehashes every file. `memo` shares
        the upstream answers between the units of one status call."""
        memo = {} if memo is None else memo
        if unit not in memo:
            memo[unit] = self._explain(unit, rehash, memo)
        return memo[unit]

    def _explain(self, unit: str, rehash: bool, memo: dict) -> tuple[str, str]:
        rec = self.record(unit)
        if rec is None:
            return "missing", ""
        if rec.get("fingerprint") != self.fingerprint(unit):
            return "stale", "config or inputs changed" if rec else "_stage.json unreadable"
        changed = outputs_changed(self.run_dir / unit, rec.get("outputs"), rehash)
        if changed:
            return "stale", changed
        # an upstream recomputed since (e.g. --force on a GPU, where outputs may differ) makes this stale too
        for up, recorded in rec.get("upstream_outputs", {}).items():
            up_rec = self.record(up)
            if up_rec is None or up_rec.get("output_hash") != recorded:
                return "stale", f"{up} was recomputed"
            up_state = self.explain(up, rehash, memo)[0]
            if up_state != "done":
                return "stale", f"{up} is {up_state}"
        return "done", ""

    def holder(self, unit: str) -> dict | None:
        """Who computes the unit right now (a live lock), or None."""
        info = read_holder(lock_path(self.run_dir / unit))
        return None if info is None or is_stale(info) else info

    # ------------------------------------------------------------ running
    def run(self, unit: str, force: bool = False) -> dict:
        """Run one unit unless fresh; returns {unit, fingerprint, status, wall_seconds}.

        A fresh unit is answered without any write (a read-only run directory works). Otherwise
        the unit's lock is taken (another process computing it: CurateError naming it, or a wait
        with `self.wait`), and the output is written beside the unit and renamed into place."""
        stage, sel = self._resolve(unit)
        fp = self.fingerprint(unit)
        cached = {"unit": unit, "fingerprint": fp, "status": "cached", "wall_seconds": 0.0}
        if not force and self.state(unit) == "done":
            return cached
        for up in stage.upstream(self.cfg, sel):
            st = self.state(up)
            if st != "done":
                raise CurateError(f"{unit} needs {up}, which is {st}: run `curate stage {up.split('/')[0]} --run {self.run_dir}` first")
        final = self.run_dir / unit
        try:
            if read_run_json(self.run_dir) is None:
                self.write_run_json()
            check_replaceable(final, unit, stage.name)
            with UnitLock(final, unit, wait=self.wait, on_wait=print):
                if not force and self.state(unit) == "done":  # finished by the process we waited for
                    return cached
                check_replaceable(final, unit, stage.name)
                wall = self._compute(unit, stage, sel, fp, final)
        except OSError as exc:
            raise os_error(unit, final, exc) from None
        return {"unit": unit, "fingerprint": fp, "status": "computed", "wall_seconds": round(wall, 3)}

    def context(self, unit: str, out: Path, fp: str | None = None):
        """What a unit is handed when it runs: its config, and the paths and records of the units
        upstream of it (benchmarks build one to call a stage's pieces directly)."""
        from .stage import StageContext, Upstream

        stage, sel = self._resolve(unit)

        def view(u: str) -> Upstream:
            return Upstream(u, self.run_dir / u, self.record(u) or {})

        ancestors = self.ancestors(unit)
        return StageContext(run_dir=self.run_dir, unit=unit, out=out, cfg=self.cfg, catalog=self.catalog,
                            config=self.unit_config(unit), fingerprint=fp or self.fingerprint(unit), sel=sel,
                            upstreams={u: view(u) for u in stage.upstream(self.cfg, sel)},
                            ancestor_units={u: view(u) for u in ancestors},
                            graph={u: self.upstream(u) for u in ancestors})

    def _compute(self, unit: str, stage, sel, fp: str, final: Path) -> float:
        _clean_leftovers(final)  # under the lock: only a dead process's leftovers match
        tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        track_tmp(tmp)
        ctx = self.context(unit, tmp, fp)
        started = datetime.now(timezone.utc)
        t0 = time.perf_counter()
        try:
            with UnitUsage() as usage:
                stage.run(ctx)
            wall = time.perf_counter() - t0
            device = ctx.config.get("device")
            outputs = describe_outputs(tmp)
            rec = {"stage": stage.name, "unit": unit, "stage_version": stage.version, "fingerprint": fp,
                   "inputs": self.inputs(unit), "config": ctx.config,
                   "resources": stage.unit_resources(self.cfg, sel).dump(),
                   "started": started.isoformat(), "ended": datetime.now(timezone.utc).isoformat(),
                   "wall_seconds": round(wall, 3), "device": str(ctx.device) if device else "cpu",
                   "host": platform.node(), "pid": os.getpid(), "output_hash": hash_outputs(outputs),
                   "worker": worker_name(), "cpu_seconds": usage.cpu_seconds, "peak_rss_bytes": usage.peak_rss_bytes,
                   "outputs": outputs,
                   "upstream_outputs": {up: self.record(up).get("output_hash") for up in stage.upstream(self.cfg, sel)},
                   "metrics": ctx.metrics}
            (tmp / STAGE_FILE).write_text(json.dumps(rec, indent=1, sort_keys=True, default=str) + "\n")
            with critical():
                _swap_into_place(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            untrack_tmp(tmp)
        return wall

    def run_all(self, force: bool = False) -> list[dict]:
        self.write_run_json()
        return [self.run(u, force) for u in self.units()]

    def status(self, rehash: bool = False) -> list[dict]:
        rows, memo = [], {}
        for unit in self.units():
            rec = self.record(unit) or {}
            state, why = self.explain(unit, rehash, memo)
            holder = self.holder(unit)
            if holder is not None:
                state, why = "running", describe(holder)
            rows.append({"unit": unit, "state": state, "why": why, "fingerprint": self.fingerprint(unit)[:12],
                         "wall_seconds": rec.get("wall_seconds"), "ended": rec.get("ended")})
        return rows


def open_run(config: str | None = None, overrides: list[str] = (), catalog: str | None = None,
             run_dir: str | None = None, *, dry_run: bool = False, announce=print) -> Runner:
    """The runner of a whole-flow run, validated before anything is written.

    From `config` (a YAML file; None: the demo) with `overrides`, or, with `run_dir` alone, the
    config saved in that run's run.json (a run you return to). Unless `dry_run`, the config is
    saved to run.json; replacing a different saved config is announced, never silent."""
    if config is None and run_dir is not None:
        runner = Runner.from_run_dir(run_dir, overrides=list(overrides), catalog=catalog)
    else:
        cfg = load_config(config, list(overrides))
        runner = Runner(cfg, Catalog.load(catalog), run_dir)
    runner.catalog.entry(runner.cfg.dataset)  # the dataset must be in the catalog
    runner.claim()
    if not dry_run:
        save_config(runner, announce)
    return runner


def save_config(runner: Runner, announce=print) -> None:
    """Write run.json; replacing a different saved config is announced, never silent."""
    saved = read_run_json(runner.run_dir)
    new = runner.cfg.model_dump(mode="json")
    if saved is not None and saved["config"] != new:
        changed = sorted(k for k in set(saved["config"]) | set(new) if saved["config"].get(k) != new.get(k))
        announce(f"{runner.run_dir}/run.json: the saved config differs in {', '.join(changed)}; replaced "
                 f"(`curate run --run {runner.run_dir}` reruns a saved run as it is)")
    runner.write_run_json()


@contextmanager
def config_kept_on_failure(run_dir: Path):
    """A command that saved a new config to run.json and then failed (say, a budget larger than
    the dataset) puts the previous run.json back: a failed `--set` changes no saved config."""
    path = Path(run_dir) / "run.json"
    before = path.read_text() if path.is_file() else None
    try:
        yield
    except CurateError:
        try:
            if before is not None and path.read_text() != before:
                write_text_atomic(path, before)
        except OSError:
            pass
        raise


def read_run_json(run_dir: Path) -> dict | None:
    """The run.json of a curate run directory; None where there is none; CurateError where the
    path is a file or the run.json is not one curate wrote."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise CurateError(f"run {run_dir}: is a file, not a run directory")
    path = run_dir / "run.json"
    if not path.exists():
        return None
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CurateError(f"run {run_dir}: run.json is unreadable or not JSON ({type(exc).__name__}); "
                          "it is not a curate run: choose a new or empty run directory") from None
    legacy = (isinstance(body, dict) and {"config", "dataset", "dataset_entry", "catalog", "versions"} <= body.keys()
              and isinstance(body["versions"], dict) and "curate" in body["versions"])  # written before RUN_FORMAT
    if not isinstance(body, dict) or not (body.get("format") == RUN_FORMAT or legacy) \
            or not isinstance(body.get("config"), dict):
        raise CurateError(f"run {run_dir}: run.json was not written by curate; choose a new or empty run directory")
    return body


def check_replaceable(final: Path, unit: str, stage: str) -> None:
    """A unit directory is replaced only if it holds curate's `_stage.json` for that stage."""
    if not final.exists() and not final.is_symlink():
        return
    rec = None
    if final.is_dir() and not final.is_symlink():
        try:
            rec = json.loads((final / STAGE_FILE).read_text())
        except (OSError, ValueError):
            rec = None
    if not isinstance(rec, dict) or rec.get("stage") != stage:
        raise CurateError(f"{unit}: {final} exists and was not written by curate (no valid {STAGE_FILE}); "
                          "move it away: curate replaces only its own outputs")


def os_error(unit: str, final: Path, exc: OSError) -> CurateError:
    """One line for a failed write: which unit, which file, and (disk full) how much space is left."""
    where = exc.filename or final.parent
    if exc.errno == errno.ENOSPC:
        probe = final.parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        return CurateError(f"{unit}: no space left on device writing {where} ({free / 2**20:.1f} MiB free); "
                           "the previous output, if any, is intact")
    return CurateError(f"{unit}: cannot write {where} ({exc.strerror or exc})")


def _clean_leftovers(final: Path) -> None:
    """Remove temporary directories a killed run of this unit left behind. Called under the
    unit's lock, so none of them is live; this unit's only: `.tmp-cifar-*` must not match
    `.tmp-cifar-big-*`."""
    pattern = re.compile(rf"\.(tmp|old)-{re.escape(final.name)}-[0-9a-f]{{8}}")
    for p in final.parent.iterdir():
        if pattern.fullmatch(p.name):
            shutil.rmtree(p, ignore_errors=True)


def worker_name() -> str:
    """Who ran the unit, for `_stage.json`: the Dask worker's address when this process is one
    (distributed already imported: it never is imported here for this), else `hostname:pid`."""
    dist = sys.modules.get("distributed")
    if dist is not None:
        try:
            return dist.get_worker().address
        except (ValueError, AttributeError):
            pass
    return f"{platform.node()}:{os.getpid()}"


class UnitUsage:
    """CPU time and peak memory of one unit, for `_stage.json` (never in a fingerprint).

    cpu_seconds: user + system CPU time of the process that ran the unit, over the unit's run,
    plus that of the child processes it started and waited for (RUSAGE_CHILDREN; children of
    children that were reaped elsewhere, e.g. by a forkserver, are not counted). Exact where the
    unit has its process to itself (a Dask worker with one thread, `curate stage`); an upper
    bound where units run side by side in one process (the default thread runner).

    peak_rss_bytes: the largest resident set size of that process while the unit ran (child
    processes not included): the RSS sampled every 50 ms by a thread, raised to the process's
    ru_maxrss where that grew during the unit (then the lifetime peak fell inside the unit, and
    spikes between samples are caught too). Not the process lifetime maximum."""

    INTERVAL = 0.05

    def __init__(self):
        self.cpu_seconds = 0.0
        self.peak_rss_bytes = 0

    @staticmethod
    def _cpu() -> float:
        import resource

        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    @staticmethod
    def _maxrss() -> int:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)

    def _sample(self) -> None:
        try:
            rss = self._proc.memory_info().rss
        except Exception:  # psutil.Error: /proc unreadable; the ru_maxrss part still counts
            return
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)

    def _watch(self) -> None:
        while not self._stop.wait(self.INTERVAL):
            self._sample()

    def __enter__(self) -> "UnitUsage":
        import psutil

        self._proc = psutil.Process()
        self._cpu0, self._maxrss0 = self._cpu(), self._maxrss()
        self._sample()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="curate-unit-usage", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.cpu_seconds = round(self._cpu() - self._cpu0, 3)
        maxrss = self._maxrss()
        if maxrss > self._maxrss0:
            self.peak_rss_bytes = max(self.peak_rss_bytes, maxrss)


def describe_outputs(directory: Path) -> dict[str, list]:
    """relative name -> [size, mtime_ns, sha256] of every output file (not _stage.json): what
    `state` checks to notice an output edited or deleted after the unit finished."""
    out = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != STAGE_FILE:
            st = p.stat()
            out[str(p.relative_to(directory))] = [st.st_size, st.st_mtime_ns, hash_file(p)]
    return out


def hash_outputs(outputs: dict[str, list]) -> str:
    """sha256 over the relative names and bytes of the output files."""
    h = hashlib.sha256()
    for rel, (_, _, digest) in sorted(outputs.items()):
        h.update(rel.encode() + b"\0" + digest.encode())
    return h.hexdigest()


def outputs_changed(directory: Path, outputs: dict | None, rehash: bool = False) -> str | None:
    """Why the recorded outputs no longer match the files, or None. Size first, then the hash of
    any file whose mtime moved (a copy keeps content but not mtimes)."""
    for rel, (size, mtime_ns, digest) in (outputs or {}).items():
        p = directory / rel
        try:
            st = p.stat()
        except OSError:
            return f"output {rel} is missing"
        if st.st_size != size or ((rehash or st.st_mtime_ns != mtime_ns) and hash_file(p) != digest):
            return f"output {rel} was changed"
    return None


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Replace `final` with the complete `tmp` by renames: never a half-written `final`."""
    old = None
    if final.exists():
        old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
