"""Scheduling the curate flow with Prefect's own machinery: `serve` (a long-lived process that
runs a deployment on a schedule) and `deploy` (a deployment for a work pool, run by
`prefect worker start --pool POOL`).

Both validate the config, overrides and catalog before registering anything, and store
them as the deployment's default parameters with absolute paths, so `prefect deployment run
curate/NAME` needs no parameter and a worker's directory does not matter. A deployment
runs at most one flow run at a time (a run that would overlap the previous one is
cancelled, Prefect's CANCEL_NEW); two deployments on one run directory are kept apart by
the run's unit locks.
"""

from __future__ import annotations

from pathlib import Path

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from flows.curate import curate_flow
from pipeline.errors import CurateError
from pipeline.runner import open_run

ENTRYPOINT = "flows/curate.py:curate_flow"
ONE_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)


def deployment_parameters(config: str, overrides: list[str], catalog: str | None) -> tuple[dict, list[str]]:
    """The flow's parameters, validated now (a bad config is refused before anything is
    registered), and the deployment's tags."""
    runner = open_run(config, overrides, catalog, dry_run=True)
    params = {"config": str(Path(config).absolute()), "overrides": list(overrides), "catalog": str(runner.catalog.path)}
    return params, ["curate", f"dataset:{runner.cfg.dataset}"]


def _schedule(cron: str | None, interval: float | None) -> dict:
    if cron is not None and interval is not None:
        raise CurateError("give --cron or --interval, not both")
    if interval is not None and interval <= 0:
        raise CurateError(f"--interval {interval}: must be a positive number of seconds")
    return {"cron": cron} if cron is not None else {"interval": interval} if interval is not None else {}


def serve(config: str, name: str, *, cron: str | None = None, interval: float | None = None,
          overrides: list[str] = (), catalog: str | None = None) -> None:
    """Serve deployment `curate/<name>` until SIGTERM or Ctrl-C (its schedule is paused then)."""
    from prefect import serve as prefect_serve

    schedule = _schedule(cron, interval)
    if not schedule:
        raise CurateError("curate serve needs --cron EXPR or --interval SECONDS")
    params, tags = deployment_parameters(config, list(overrides), catalog)
    deployment = curate_flow.to_deployment(name=name, parameters=params, tags=tags, concurrency_limit=ONE_AT_A_TIME,
                                           description=f"curate {params['config']}", **schedule)
    prefect_serve(deployment)


def deploy(config: str, name: str, pool: str, *, cron: str | None = None, interval: float | None = None,
           overrides: list[str] = (), catalog: str | None = None) -> str:
    """Register deployment `curate/<name>` for work pool `pool`; returns its id. The flow's code
    is read from this installation (no image is built)."""
    params, tags = deployment_parameters(config, list(overrides), catalog)
    source = Path(__file__).resolve().parents[1]
    flow = curate_flow.from_source(source=str(source), entrypoint=ENTRYPOINT)
    return str(flow.deploy(name=name, work_pool_name=pool, build=False, push=False, parameters=params, tags=tags,
                           concurrency_limit=ONE_AT_A_TIME, description=f"curate {params['config']}",
                           print_next_steps=False, **_schedule(cron, interval)))
