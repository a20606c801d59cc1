"""The Prefect flow: one task per unit of the run, in the order the stages' declared upstream
units give (index -> embed -> score -> select -> materialize -> verify, experts -> distill
beside it); a new stage needs no edit here.

The flow holds no computation: each task runs one stage unit through pipeline.runner,
passing only the run directory, the unit name and the catalog path (never arrays).
A fresh unit returns a Completed state named "Cached". The units run in a subflow whose task
runner the config chooses: with `flow.task_runner: dask` the same tasks run through prefect-dask
on a distributed.LocalCluster, or, with `flow.address`, on the running Dask cluster there, also
when the flow runs as a deployment. On Dask a unit that will use a GPU asks the scheduler for a
worker advertising the `GPU` resource (see `gpu_request`), and a unit no worker can take fails
the flow after `flow.placement_timeout` seconds instead of waiting forever.
"""

from __future__ import annotations

import functools
import json
import os
import time
from contextlib import nullcontext

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


def submit_units(runner: Runner, run_dir: str, catalog: str, wait: bool = False, needs: dict | None = None) -> dict:
    """One task per unit of the run, each waiting for the units its stage declares upstream; GPU
    units carry the `gpu` tag (a Prefect tag concurrency limit bounds them). `needs` (unit ->
    Dask worker resources, on a Dask task runner) is annotated on each submission: prefect-dask's
    client.submit goes through distributed's Client._graph_to_futures, which merges
    `dask.get_annotations()` into the task's restrictions on the scheduler (one task, no graph
    optimisation to drop them; checked on a real cluster in tests/flows/test_dask_cluster.py)."""
    needs = needs or {}
    futures: dict = {}
    pending = runner.units()
    while pending:
        ready = [u for u in pending if all(up in futures for up in runner.upstream(u))]
        if not ready:
            raise CurateError(f"units {', '.join(pending)} wait on units that are not part of the run")
        for unit in ready:
            stage = unit.split("/")[0]
            tags = ["curate", f"stage:{stage}"] + (["gpu"] if runner.resources(unit).gpus else [])
            with annotate(needs.get(unit)):
                futures[unit] = stage_task.with_options(name=stage, task_run_name=unit, tags=tags).submit(
                    run_dir, unit, catalog, wait, wait_for=[futures[up] for up in runner.upstream(unit)])
        pending = [u for u in pending if u not in futures]
    return futures


@flow(name="curate-units", log_prints=True)
def units_flow(run_dir: str, catalog: str, wait: bool = False) -> list[dict]:
    """Every unit of a saved run, as tasks on this flow's task runner (chosen by `flow:`)."""
    install_sigterm_handler()  # Prefect installs its own again for a subflow
    runner = Runner.from_run_dir(run_dir, catalog=catalog)
    if runner.cfg.flow.task_runner != "dask":
        return [f.result() for f in submit_units(runner, run_dir, catalog, wait).values()]
    from prefect.context import FlowRunContext

    client = FlowRunContext.get().task_runner.client
    address = runner.cfg.flow.address
    gpu_present = any(w.get("resources", {}).get("GPU", 0) > 0
                      for w in client.scheduler_info()["workers"].values()) if address else local_gpu()
    needs = {u: gpu_request(runner, u, gpu_present) for u in runner.units()}
    futures = submit_units(runner, run_dir, catalog, wait, needs)
    await_placement(futures, needs, client, runner.cfg.flow.placement_timeout, address or "the LocalCluster")
    return [f.result() for f in futures.values()]


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
        units, api = units_flow, nullcontext()
        if runner.cfg.flow.task_runner == "dask":
            units, api = units_flow.with_options(task_runner=dask_runner(runner.cfg)), workers_api(runner.cfg)
        with api:
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


FAKE_GPU = "CURATE_FAKE_GPU"


def fake_gpu() -> bool:
    """CURATE_FAKE_GPU=1: the units that use a GPU when there is one are placed as GPU units (a
    worker advertising `GPU`) although they compute on the CPU: placement is testable on a
    machine without a GPU. Placement only: no output byte, fingerprint or device changes."""
    return os.environ.get(FAKE_GPU, "").strip() not in ("", "0")


def local_gpu() -> bool:
    """Whether this machine has CUDA (what `device: auto` finds in a LocalCluster's workers)."""
    import torch

    return torch.cuda.is_available()


def gpu_request(runner: Runner, unit: str, gpu_present: bool) -> dict[str, float]:
    """The Dask worker resources `unit` is submitted with: {"GPU": n} where its stage declares n
    GPUs and the unit will use one: its `device` names CUDA, or is `auto` and the cluster has a
    GPU (`gpu_present`: a worker advertising `GPU`, or this machine's CUDA for a LocalCluster)
    or CURATE_FAKE_GPU is set; else {} (a CPU run places GPU-capable units anywhere)."""
    gpus = runner.resources(unit).gpus
    device = str(runner.unit_config(unit).get("device", "auto"))
    if gpus and (device.startswith("cuda") or (device == "auto" and (gpu_present or fake_gpu()))):
        return {"GPU": gpus}
    return {}


def annotate(resources: dict | None):
    """dask.annotate(resources=...) around a submission that needs some, else nothing."""
    if not resources:
        return nullcontext()
    import dask

    return dask.annotate(resources=resources)


def await_placement(futures: dict, needs: dict, client, timeout: float, where: str, poll: float = 0.5) -> None:
    """Wait for every unit's Dask future. A unit the scheduler keeps in its `no-worker` state (no
    connected worker offers its resources) for `timeout` seconds cancels what is left and fails
    the flow with one line naming it: a cluster without a GPU worker never hangs the flow. The
    scheduler's own state is read (get_task_status), so a restriction lost on the way would show
    as the unit running elsewhere, not as this error."""
    wrapped = {unit: f.wrapped_future for unit, f in futures.items()}
    since: dict[str, float] = {}
    while pending := {u: fut for u, fut in wrapped.items() if not fut.done()}:
        states = client.sync(client.scheduler.get_task_status, keys=[fut.key for fut in pending.values()])
        now = time.monotonic()
        for unit, fut in pending.items():
            if states.get(fut.key) == "no-worker":
                since.setdefault(unit, now)
            else:
                since.pop(unit, None)
        stuck = [u for u in pending if u in since and now - since[u] >= timeout]
        if stuck:
            client.cancel(list(pending.values()))
            workers = client.scheduler_info()["workers"]
            more = f" (and {len(stuck) - 1} more)" if len(stuck) > 1 else ""
            need = ", ".join(f"{k}={v:g}" for k, v in (needs.get(stuck[0]) or {}).items())
            want = f"a Dask worker with resource {need}" if need else "a Dask worker"
            raise CurateError(f"{stuck[0]}{more} needs {want}, and no worker at {where} offers it "
                              f"({len(workers)} connected; waited {timeout:g} s, flow.placement_timeout)")
        time.sleep(poll)


def check_scheduler(address: str, timeout: float = 10.0) -> None:
    """One line, before Prefect starts the subflow, where nothing listens at flow.address."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(address)
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=timeout).close()
    except OSError as exc:
        raise CurateError(f"flow.address: no Dask scheduler answers at {address} "
                          f"({exc.strerror or type(exc).__name__})") from None


def workers_api(cfg):
    """Settings under which the units subflow runs on Dask: workers on this machine report to this
    process's Prefect API. prefect-dask hands them the flow's settings, and where PREFECT_API_URL
    is unset (`curate run` on its temporary server) each worker process started a temporary
    server of its own: its task runs never reached the flow's server, its start could time out on
    a busy machine, and its shutdown made the worker outlive the nanny's grace period at cluster
    close. Workers of a cluster elsewhere need PREFECT_API_URL set to a server they can reach."""
    from urllib.parse import urlsplit

    from prefect.settings import PREFECT_API_URL, temporary_settings

    host = urlsplit(cfg.flow.address).hostname if cfg.flow.address else "localhost"
    if PREFECT_API_URL.value() or not (host == "localhost" or host.startswith("127.") or host == "::1"):
        return nullcontext()
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the one get_client() started for this flow
    return temporary_settings({PREFECT_API_URL: server.api_url}) if server.running else nullcontext()


WORKER_EXIT_S = 60  # how long a LocalCluster worker process may take to exit before it is killed


@functools.cache
def patient_nanny():
    """distributed's Nanny, giving its worker process WORKER_EXIT_S (not 0.8 * 5 s) to exit when
    the LocalCluster closes. A worker that has run torch and Prefect took longer than 4 s to
    finalise on a busy machine (its interpreter's final garbage collection): the nanny SIGKILLed
    it ("Worker process still alive after 4.0 seconds, killing"), the join of the killed process
    timed out, and the cluster's close failed in the fire-and-forget `_correct_state` callback that
    `scale(0)` schedules, which tornado logged as a traceback (a TimeoutError in our runs; the
    CommClosedError reported in the issue where a comm had closed first)."""
    from distributed import Nanny

    class PatientNanny(Nanny):
        async def close(self, timeout: float = 5, reason: str = "nanny-close"):
            return await super().close(timeout=max(timeout, WORKER_EXIT_S), reason=reason)

    return PatientNanny


def dask_runner(cfg):
    """prefect-dask's task runner: attached to the scheduler at `flow.address`, or a LocalCluster
    of `flow.n_workers` one-thread worker processes, each advertising one `GPU` where this
    machine has CUDA (they share it) or CURATE_FAKE_GPU is set."""
    from prefect_dask import DaskTaskRunner

    if cfg.flow.address:
        check_scheduler(cfg.flow.address)
        return DaskTaskRunner(address=cfg.flow.address)
    kwargs = {"n_workers": cfg.flow.n_workers, "processes": True, "threads_per_worker": 1, "dashboard_address": None,
              "worker_class": patient_nanny()}
    if local_gpu() or fake_gpu():
        kwargs["resources"] = {"GPU": 1}
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)


def run_flow(config: str | None = None, overrides: list[str] = (), catalog: str | None = None,
             wait: bool = False, run_dir: str | None = None) -> str:
    """`curate run`: the flow in this process; returns the report path. The config is validated
    first, so a bad one is one line, not a failed flow run."""
    open_run(config, list(overrides), catalog, run_dir, dry_run=True)
    return curate_flow(config, list(overrides), catalog, run_dir, wait)
