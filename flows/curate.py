"""The Prefect flow: index -> embed -> score -> select (per selection) -> materialize -> verify,
with index -> experts (if an mtt spec) -> distill (per spec) -> verify beside it.

The flow holds no computation: each task runs one stage unit through pipeline.runner,
passing only the run directory, the unit name and the catalog path (never arrays).
A fresh unit returns a Completed state named "Cached". With `flow.task_runner: dask`
the same tasks run on a distributed.LocalCluster through prefect-dask.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.states import Completed  # noqa: E402

from pipeline.catalog import Catalog  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.locks import install_sigterm_handler  # noqa: E402
from pipeline.runner import Runner  # noqa: E402
from stages.report import table_rows  # noqa: E402


@task(retries=0, persist_result=False)
def stage_task(run_dir: str, unit: str, catalog: str, wait: bool = False):
    res = Runner.from_run_dir(run_dir, catalog=catalog, wait=wait).run(unit)
    if res["status"] == "cached":
        return Completed(name="Cached", message=f"{unit} is fresh ({res['fingerprint'][:12]})", data=res)
    return res


def _submit_unit(unit: str, run_dir: str, catalog: str, wait_for: list, wait: bool = False):
    stage = unit.split("/")[0]
    return stage_task.with_options(name=stage, task_run_name=unit).submit(run_dir, unit, catalog, wait,
                                                                           wait_for=wait_for)


@flow(name="curate", log_prints=True)
def curate_flow(run_dir: str, catalog: str, wait: bool = False) -> str:
    install_sigterm_handler()  # over Prefect's own: stop within seconds, even with tasks still computing
    runner = Runner.from_run_dir(run_dir, catalog=catalog)
    _submit = functools.partial(_submit_unit, wait=wait)
    sels = [s.sel_name for s in runner.cfg.select]
    index = _submit("index", run_dir, catalog, [])
    parts = [_submit(u, run_dir, catalog, [index]) for u in runner.units("embed_part")]  # mapped, if any
    embed = _submit("embed", run_dir, catalog, [index, *parts])
    scores = [_submit(u, run_dir, catalog, [embed]) for u in runner.units("score")]  # none unless asked for
    by_name: dict = {}  # a spec's pool is an earlier selection, so list order is a valid order
    for spec in runner.cfg.select:
        after = [embed, *scores] + ([by_name[spec.pool]] if spec.pool else [])
        by_name[spec.sel_name] = _submit(f"select/{spec.sel_name}", run_dir, catalog, after)
    selects = list(by_name.values())
    mats = [_submit(f"materialize/{s}", run_dir, catalog, [f]) for s, f in zip(sels, selects)]
    experts = [_submit(u, run_dir, catalog, [index]) for u in runner.units("experts")]  # only with an mtt spec
    distills = [_submit(f"distill/{s.sel_name}", run_dir, catalog, [index, *(experts if s.method == "mtt" else [])])
                for s in runner.cfg.distill.specs]
    verify = _submit("verify", run_dir, catalog, [embed, *mats, *distills])
    results = [f.result() for f in [index, *parts, embed, *scores, *selects, *mats, *experts, *distills, verify]]
    logger = get_run_logger()
    for r in results:
        logger.info("%s: %s %s", r["unit"], r["status"], r["fingerprint"][:12])
    report = json.loads((Path(run_dir) / "verify" / "report.json").read_text())
    create_table_artifact(key="curate-report", table=table_rows(report),
                          description=f"verification on {report['dataset']}")
    create_markdown_artifact(key="curate-report-md", markdown=(Path(run_dir) / "verify" / "report.md").read_text())
    return str(Path(run_dir) / "verify" / "report.md")


def task_runner_for(cfg):
    if cfg.flow.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs={"n_workers": cfg.flow.n_workers, "processes": True,
                                              "threads_per_worker": 1, "dashboard_address": None})
    return None


def ensure_demo_data(catalog: Catalog) -> None:
    """The demo needs the digits shards: ingest them beside the catalog if absent."""
    try:
        catalog.shards("digits", "train")
        catalog.shards("digits", "test")
    except Exception:
        from pipeline.ingest import ingest

        ingest("digits", catalog.path.parent / "data" / "digits", "digits", catalog=str(catalog.path))


def run_flow(config: str | None = None, overrides: list[str] = (), catalog: str | None = None,
             wait: bool = False) -> str:
    """Validate the config, write run.json, run the flow; returns the report path."""
    cfg = load_config(config, list(overrides))
    cat = Catalog.load(catalog, missing_ok=config is None)
    if config is None and cfg.dataset == "digits":
        ensure_demo_data(cat)
        cat = Catalog.load(cat.path)
    runner = Runner(cfg, cat)
    runner.write_run_json()
    fl = curate_flow
    tr = task_runner_for(cfg)
    if tr is not None:
        fl = curate_flow.with_options(task_runner=tr)
    return fl(str(runner.run_dir), str(cat.path), wait)
