"""The Prefect flow: one task per unit of the run, in the order the stages' declared upstream
units give (index -> embed -> score -> select -> materialize -> verify, experts -> distill
beside it); a new stage needs no edit here.

The flow holds no computation: each task runs one stage unit through pipeline.runner,
passing only the run directory, the unit name and the catalog path (never arrays).
A fresh unit returns a Completed state named "Cached". With `flow.task_runner: dask`
the same tasks run on a distributed.LocalCluster through prefect-dask.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.states import Completed  # noqa: E402

from pipeline.catalog import Catalog  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.errors import CurateError  # noqa: E402
from pipeline.locks import install_sigterm_handler  # noqa: E402
from pipeline.runner import Runner  # noqa: E402
from pipeline.report import table_rows  # noqa: E402


@task(retries=0, persist_result=False)
def stage_task(run_dir: str, unit: str, catalog: str, wait: bool = False):
    res = Runner.from_run_dir(run_dir, catalog=catalog, wait=wait).run(unit)
    if res["status"] == "cached":
        return Completed(name="Cached", message=f"{unit} is fresh ({res['fingerprint'][:12]})", data=res)
    return res


def submit_units(runner: Runner, run_dir: str, catalog: str, wait: bool = False) -> dict:
    """One task per unit of the run, each waiting for the units its stage declares upstream; GPU
    units carry the `gpu` tag (a Prefect tag concurrency limit bounds them)."""
    futures: dict = {}
    pending = runner.units()
    while pending:
        ready = [u for u in pending if all(up in futures for up in runner.upstream(u))]
        if not ready:
            raise CurateError(f"units {', '.join(pending)} wait on units that are not part of the run")
        for unit in ready:
            stage = unit.split("/")[0]
            tags = ["curate", f"stage:{stage}"] + (["gpu"] if runner.resources(unit).gpus else [])
            futures[unit] = stage_task.with_options(name=stage, task_run_name=unit, tags=tags).submit(
                run_dir, unit, catalog, wait, wait_for=[futures[up] for up in runner.upstream(unit)])
        pending = [u for u in pending if u not in futures]
    return futures


@flow(name="curate", log_prints=True)
def curate_flow(run_dir: str, catalog: str, wait: bool = False) -> str:
    install_sigterm_handler()  # over Prefect's own: stop within seconds, even with tasks still computing
    runner = Runner.from_run_dir(run_dir, catalog=catalog)
    results = [f.result() for f in submit_units(runner, run_dir, catalog, wait).values()]
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


def run_flow(config: str | None = None, overrides: list[str] = (), catalog: str | None = None,
             wait: bool = False) -> str:
    """Validate the config, write run.json, run the flow; returns the report path."""
    cfg = load_config(config, list(overrides))
    cat = Catalog.load(catalog)
    runner = Runner(cfg, cat)
    runner.write_run_json()
    fl = curate_flow
    tr = task_runner_for(cfg)
    if tr is not None:
        fl = curate_flow.with_options(task_runner=tr)
    return fl(str(runner.run_dir), str(cat.path), wait)
