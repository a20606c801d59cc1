"""The Prefect flow: one task per unit of the run, in the order the stages' declared upstream
units give (index -> embed -> score -> select -> materialize -> verify, experts -> distill
beside it); a new stage needs no edit here.

The flow holds no computation: each task runs one stage unit through pipeline.runner,
passing only the run directory, the unit name and the catalog path (never arrays).
A fresh unit returns a Completed state named "Cached". The units run in a subflow whose task
runner the config chooses: with `flow.task_runner: dask` the same tasks run on a
distributed.LocalCluster through prefect-dask, also when the flow runs as a deployment.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.states import Completed  # noqa: E402

from pipeline import progress  # noqa: E402
from pipeline.errors import CurateError  # noqa: E402
from pipeline.locks import install_sigterm_handler  # noqa: E402
from pipeline.runner import Runner, config_kept_on_failure, open_run, save_config  # noqa: E402
from pipeline.report import table_rows  # noqa: E402


class ProgressArtifact:
    """A unit's progress as a Prefect progress artifact (created on the first report)."""

    def __init__(self, unit: str):
        self.unit, self.id = unit, None

    def __call__(self, fraction: float, desc: str) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        if self.id is None:
            self.id = create_progress_artifact(100 * fraction, description=f"{self.unit}: {desc}")
        else:
            update_progress_artifact(self.id, 100 * fraction)


@task(retries=0, persist_result=False)
def stage_task(run_dir: str, unit: str, catalog: str, wait: bool = False):
    token = progress.LISTENER.set(ProgressArtifact(unit))
    try:
        res = Runner.from_run_dir(run_dir, catalog=catalog, wait=wait).run(unit)
    finally:
        progress.LISTENER.reset(token)
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


@flow(name="curate-units", log_prints=True)
def units_flow(run_dir: str, catalog: str, wait: bool = False) -> list[dict]:
    """Every unit of a saved run, as tasks on this flow's task runner (chosen by `flow:`)."""
    install_sigterm_handler()  # Prefect installs its own again for a subflow
    runner = Runner.from_run_dir(run_dir, catalog=catalog)
    return [f.result() for f in submit_units(runner, run_dir, catalog, wait).values()]


@flow(name="curate", log_prints=True)
def curate_flow(config: str | None = None, overrides: list[str] | None = None, catalog: str | None = None,
                run_dir: str | None = None, wait: bool = False) -> str:
    """The whole run of `config` (a YAML path; relative paths in it are relative to its folder)
    with `overrides` (`section.key=value`), or, with `run_dir` alone, the saved run there; None
    of both: the digits demo. Returns the report's path. A config that fails validation writes
    nothing; a run that fails leaves the previously saved config in run.json."""
    install_sigterm_handler()  # over Prefect's own: stop within seconds, even with tasks still computing
    runner = open_run(config, overrides or [], catalog, run_dir, dry_run=True)
    with config_kept_on_failure(runner.run_dir):
        save_config(runner)
        units = units_flow
        if runner.cfg.flow.task_runner == "dask":
            units = units_flow.with_options(task_runner=dask_runner(runner.cfg))
        results = units(str(runner.run_dir), str(runner.catalog.path), wait)
    logger = get_run_logger()
    for r in results:
        logger.info("%s: %s %s", r["unit"], r["status"], r["fingerprint"][:12])
    out = runner.run_dir / "report"
    report = json.loads((out / "report.json").read_text())
    create_table_artifact(key="curate-report", table=table_rows(report),
                          description=f"verification on {report['dataset']}")
    create_markdown_artifact(key="curate-report-md", markdown=(out / "report.md").read_text())
    return str(out / "report.md")


def dask_runner(cfg):
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs={"n_workers": cfg.flow.n_workers, "processes": True,
                                          "threads_per_worker": 1, "dashboard_address": None})


def run_flow(config: str | None = None, overrides: list[str] = (), catalog: str | None = None,
             wait: bool = False, run_dir: str | None = None) -> str:
    """`curate run`: the flow in this process; returns the report path. The config is validated
    first, so a bad one is one line, not a failed flow run."""
    open_run(config, list(overrides), catalog, run_dir, dry_run=True)
    return curate_flow(config, list(overrides), catalog, run_dir, wait)
