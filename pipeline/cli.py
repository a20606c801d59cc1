"""The `curate` command line: ingest, run, stage, status, report.

Every user-fixable problem ends in one line on stderr and exit code 1.
"""

from __future__ import annotations

import json
import os
import tempfile
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import CurateError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Offline dataset curation: index, embed, select, materialize, verify.")


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(1)


@app.command()
def ingest(source: str = typer.Argument(..., help="digits | idx | cifar | imagefolder | fmnist-pairs"),
           out: Path = typer.Option(..., "--out", help="folder for the shards"),
           name: str = typer.Option(..., "--name", help="catalog entry to add or replace"),
           src: Optional[str] = typer.Option(None, "--src", help="source folder (idx, cifar, imagefolder, fmnist-pairs)"),
           catalog: Optional[str] = typer.Option(None, "--catalog"),
           shard_size: int = typer.Option(10000, "--shard-size", min=1),
           noise: Optional[float] = typer.Option(None, "--noise",
                                                 help="fmnist-pairs: fraction of train captions naming a wrong class, in [0, 1) (default 0.3)"),
           seed: Optional[int] = typer.Option(None, "--seed", help="fmnist-pairs: seed of the subset and the captions (default 0)"),
           train_size: Optional[int] = typer.Option(None, "--train-size",
                                                    help="fmnist-pairs: keep a seeded, class-stratified subset of N train images (default all 60,000)")):
    """Write train/test WebDataset shards and sizes.json, and add the catalog entry NAME.

    fmnist-pairs: an image-caption benchmark from the Fashion-MNIST idx files in --src.
    Train captions "a photo of a {name}" / "a {adjective} {name}"; exactly
    round(noise * N) of them name a wrong class. .cls keeps the true class, .json holds
    {"caption_class": c}; test captions are clean. Example:
    curate ingest fmnist-pairs --src ../shared/datasets/fashion-mnist --out data/fmnist-pairs
    --name fmnist-pairs --noise 0.3 --seed 0 --train-size 5000
    """
    from .ingest import ingest as do_ingest

    try:
        entry = do_ingest(source, out, name, src, catalog, shard_size, noise=noise, seed=seed, train_size=train_size)
    except CurateError as exc:
        _fail(exc)
    typer.echo(f"catalog entry '{name}': " + json.dumps(entry.splits))


@app.command()
def run(config: Optional[Path] = typer.Argument(None, help="run config YAML (default: the digits demo)"),
        set_: List[str] = typer.Option([], "--set", help="override, e.g. select.0.budget=0.2"),
        catalog: Optional[str] = typer.Option(None, "--catalog"),
        run_dir: Optional[Path] = typer.Option(None, "--run", help="rerun the run saved in this directory"),
        wait: bool = typer.Option(False, "--wait", help="a unit another process computes: wait for it")):
    """Run the whole flow through Prefect (CONFIG, a saved run with --run, or the demo)."""
    from .locks import install_sigterm_handler
    from .runner import load_plugin

    install_sigterm_handler()
    try:
        if config is not None and run_dir is not None:
            raise CurateError("give CONFIG or --run DIR, not both (a saved run keeps its own config)")
        if config is None and run_dir is None:
            from .ingest import ensure_demo_data

            ensure_demo_data(catalog)
        report = load_plugin("curate.flows", "run")(str(config) if config else None, list(set_), catalog, wait=wait,
                                                    run_dir=str(run_dir) if run_dir else None)
    except CurateError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(_os_line(exc))
    typer.echo(f"report: {report}")


@app.command()
def serve(config: Path = typer.Argument(..., help="run config YAML"),
          name: str = typer.Option(..., "--name", help="the deployment: curate/NAME"),
          cron: Optional[str] = typer.Option(None, "--cron", help='a cron schedule, e.g. "0 3 * * *"'),
          interval: Optional[float] = typer.Option(None, "--interval", help="seconds between runs"),
          set_: List[str] = typer.Option([], "--set"),
          catalog: Optional[str] = typer.Option(None, "--catalog")):
    """Serve a scheduled deployment of the flow until SIGTERM or Ctrl-C (needs a Prefect server:
    PREFECT_API_URL)."""
    from .runner import load_plugin

    try:
        load_plugin("curate.flows", "serve")(str(config), name, cron=cron, interval=interval, overrides=list(set_),
                                             catalog=catalog)
    except CurateError as exc:
        _fail(exc)


@app.command()
def deploy(config: Path = typer.Argument(..., help="run config YAML"),
           name: str = typer.Option(..., "--name", help="the deployment: curate/NAME"),
           pool: str = typer.Option(..., "--pool", help="a work pool (e.g. a process pool)"),
           cron: Optional[str] = typer.Option(None, "--cron"),
           interval: Optional[float] = typer.Option(None, "--interval"),
           set_: List[str] = typer.Option([], "--set"),
           catalog: Optional[str] = typer.Option(None, "--catalog")):
    """Register a deployment of the flow for a work pool; `prefect worker start --pool POOL` runs it."""
    from .runner import load_plugin

    try:
        dep = load_plugin("curate.flows", "deploy")(str(config), name, pool, cron=cron, interval=interval,
                                                    overrides=list(set_), catalog=catalog)
    except CurateError as exc:
        _fail(exc)
    typer.echo(f"deployment curate/{name} ({dep}) on pool {pool}: `prefect deployment run curate/{name}` runs it")


@app.command()
def stage(name: str = typer.Argument(..., help="index | embed | score | select | materialize | experts | distill | verify | report"),
          run_dir: Path = typer.Option(..., "--run", help="run directory"),
          config: Optional[Path] = typer.Option(None, "--config"),
          set_: List[str] = typer.Option([], "--set"),
          catalog: Optional[str] = typer.Option(None, "--catalog"),
          force: bool = typer.Option(False, "--force", help="recompute even if fresh"),
          wait: bool = typer.Option(False, "--wait", help="a unit another process computes: wait for it")):
    """Run one stage (every unit of it) without a Prefect server."""
    from .locks import install_sigterm_handler
    from .runner import Runner, config_kept_on_failure

    install_sigterm_handler()
    try:
        runner = Runner.from_run_dir(run_dir, str(config) if config else None, set_, catalog, wait=wait)
        units = runner.units(name)
        if not units:
            typer.echo(f"{name}: nothing to run in this config (e.g. no score methods or no selections)")
        with config_kept_on_failure(runner.run_dir):
            runner.write_run_json()
            for unit in units:
                res = runner.run(unit, force=force)
                typer.echo(f"{res['unit']}: {res['status']} ({res['wall_seconds']:.1f} s) {res['fingerprint'][:12]}")
    except CurateError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(_os_line(exc))


@app.command()
def status(run_dir: Path = typer.Option(..., "--run"), catalog: Optional[str] = typer.Option(None, "--catalog"),
           verify: bool = typer.Option(False, "--verify", help="rehash every output file, not only those whose "
                                                               "size or mtime changed")):
    """Each stage unit: done / stale / missing / running, fingerprint, wall time, and why."""
    from .runner import Runner

    try:
        rows = Runner.from_run_dir(run_dir, catalog=catalog).status(rehash=verify)
    except CurateError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(_os_line(exc))
    for r in rows:
        wall = f"{r['wall_seconds']:.1f} s" if r["wall_seconds"] is not None else "-"
        why = f"  ({r['why']})" if r["why"] else ""
        typer.echo(f"{r['unit']:<32} {r['state']:<8} {r['fingerprint']}  {wall:>9}  {r['ended'] or ''}{why}")


def _os_line(exc: OSError) -> CurateError:
    """A file-system failure outside any unit (reading a config, a catalog): one line."""
    return CurateError(f"{exc.filename or 'file system'}: {exc.strerror or exc}")


@app.command()
def report(run_dir: Path = typer.Option(..., "--run")):
    """Rewrite report/report.md and the PNG plots from report.json, and print the table."""
    from pipeline.report import plot_report, read_report, render_markdown

    folder = run_dir / "report"
    path = folder / "report.json"
    try:
        if not path.exists():
            raise CurateError(f"run {run_dir}: no report/report.json (run `curate stage report --run {run_dir}`)")
        data = read_report(path)
        md = render_markdown(data)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:  # all drawn before anything is replaced
            (Path(tmp) / "report.md").write_text(md, encoding="utf-8")
            for name in ["report.md", *plot_report(data, Path(tmp))]:
                os.replace(Path(tmp) / name, folder / name)
    except CurateError as exc:
        _fail(exc)
    except (ValueError, KeyError, TypeError) as exc:  # a hand-edited row lacks a field or holds a wrong type
        _fail(CurateError(f"{path}: not a curate report ({' '.join(f'{type(exc).__name__}: {exc}'.split())})"))
    except OSError as exc:  # a read-only report/, a folder where a plot goes, ...
        where = f": {exc.filename}" if exc.filename else ""
        _fail(CurateError(f"{folder}: cannot write the report ({exc.strerror or exc}{where})"))
    typer.echo(md)


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # python -m pipeline.cli
    main()
