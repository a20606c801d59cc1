"""The `curate` command line: ingest, run, stage, status, report; inspect, methods, config show, clean.

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
                                                 help="fmnist-pairs: fraction of train captions naming a wrong class, in [0, 1) (default 0.3); "
                                                      "digits: fraction of train labels flipped (default 0)"),
           seed: Optional[int] = typer.Option(None, "--seed", help="fmnist-pairs: seed of the subset and the captions; "
                                                                  "digits: of the flips (default 0)"),
           train_size: Optional[int] = typer.Option(None, "--train-size",
                                                    help="fmnist-pairs: keep a seeded, class-stratified subset of N train images (default all 60,000)")):
    """Write train/test WebDataset shards and sizes.json, and add the catalog entry NAME.

    fmnist-pairs: an image-caption benchmark from the Fashion-MNIST idx files in --src.
    Train captions "a photo of a {name}" / "a {adjective} {name}"; exactly
    round(noise * N) of them name a wrong class. .cls keeps the true class, .json holds
    {"caption_class": c}; test captions are clean. Example:
    curate ingest fmnist-pairs --src ../shared/datasets/fashion-mnist --out data/fmnist-pairs
    --name fmnist-pairs --noise 0.3 --seed 0 --train-size 5000

    digits --noise F: exactly round(F * N) train labels moved to another class (seeded), each
    flipped sample's .json holding {"true_label": y}; the demo's `digits-noisy` is F = 0.1.
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
    _print_summary(Path(report))
    if config is None and run_dir is None:
        _print_planted(list(set_), catalog)
    typer.echo(f"report: {report}")


def _print_planted(overrides: list[str], catalog: str | None) -> None:
    """The demo knows which labels it planted wrong: say how many each cleaning selection found."""
    from .catalog import Catalog
    from .config import load_config
    from .demo import cleaning_lines
    from .ingest import DEMO_DATASET

    try:
        cfg = load_config(None, overrides)
        names = [s.sel_name for s in cfg.select if s.method == "clean"]
        if cfg.dataset == DEMO_DATASET and names:
            typer.echo("\n".join(cleaning_lines(Path(cfg.run), Catalog.load(catalog), DEMO_DATASET, names)))
    except (CurateError, OSError, KeyError, ValueError):  # a line the run can do without
        pass


def _print_summary(report_md: Path) -> None:
    """After a run: the report's table, its plots and one line that says what it shows (the
    report stays the record; a report.json that cannot be read prints nothing here)."""
    from .report import read_report
    from .summary import headline, terminal_table

    try:
        data = read_report(report_md.with_name("report.json"))
        text = [terminal_table(data), ""]
        if (data.get("convergence") or {}).get("warning"):
            text += [f"WARNING: {data['convergence']['warning']}", ""]
        text += [f"plot: {p}" for p in sorted(report_md.parent.glob("*.png"))] + [headline(data)]
    except (CurateError, KeyError, TypeError, ValueError):
        return
    typer.echo("\n".join(text))


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
    """Each stage unit: done / stale / missing / running, fingerprint, wall and CPU time, peak memory,
    the worker that computed it, and why it is not done."""
    from .runner import Runner

    try:
        runner = Runner.from_run_dir(run_dir, catalog=catalog)
        rows = runner.status(rehash=verify)
        records = {r["unit"]: runner.record(r["unit"]) or {} for r in rows}
    except CurateError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(_os_line(exc))
    typer.echo(f"{'unit':<32} {'state':<8} {'fingerprint':<12}  {'wall':>9} {'cpu':>9} {'peak':>9}  "
               f"{'worker':<16} ended")
    for r in rows:
        rec = records[r["unit"]]
        wall = f"{r['wall_seconds']:.1f} s" if r["wall_seconds"] is not None else "-"
        cpu = _number(rec.get("cpu_seconds"), 1, " s")
        rss = _number(rec.get("peak_rss_bytes"), 1e6, " MB")
        worker = str(rec.get("worker") or "-")
        why = f"  ({r['why']})" if r["why"] else ""
        typer.echo(f"{r['unit']:<32} {r['state']:<8} {r['fingerprint']:<12}  {wall:>9} {cpu:>9} {rss:>9}  "
                   f"{worker:<16} {r['ended'] or '-'}{why}")


def _number(v, divisor: float, suffix: str) -> str:
    """A _stage.json figure for the status table: '-' when absent or not a number."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "-"
    return f"{v / divisor:.1f}{suffix}"


@app.command()
def inspect(unit: str = typer.Argument(..., help="select/<sel>, materialize/<sel>, score or distill/<name>"),
            run_dir: Path = typer.Option(..., "--run", help="run directory"),
            out: Optional[Path] = typer.Option(None, "--out", help="the contact sheet PNG "
                                                                   "(default: inspect-<run>-<unit>.png here)"),
            per_class: int = typer.Option(4, "--per-class", min=1, help="samples per class and side of the sheet"),
            pairs: int = typer.Option(24, "--pairs", min=1, help="dedup: removed / kept-twin pairs on the sheet"),
            score: Optional[str] = typer.Option(None, "--score", help="score unit: only this score")):
    """Show what a unit decided: a contact sheet (PNG) and a per-class table.

    dedup: removed images beside the kept twin each matched, with the similarity; scores and
    difficulty: the lowest and highest samples per class; image-caption selections: kept and
    dropped pairs with captions; distilled sets: the synthetic images per class."""
    from .inspect import inspect_unit

    if out is None:
        out = Path(f"inspect-{run_dir.absolute().name}-{unit.strip('/').replace('/', '-')}.png")
    try:
        result = inspect_unit(run_dir, unit, out, per_class=per_class, pairs=pairs, score=score)
    except CurateError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(_os_line(exc))
    typer.echo(result.text())
    typer.echo(f"contact sheet: {result.out} ({len(result.drawn)} images)")


@app.command()
def methods(kind: Optional[str] = typer.Argument(None, help="embed | score | select | online | distill (default: all)"),
            as_json: bool = typer.Option(False, "--json", help="machine-readable")):
    """Every embed, score, select, online and distill method with its options and defaults
    (read from the config models, so it is always the installed version's)."""
    from .method_list import KINDS, as_json as to_json, catalogue, render

    if kind is not None and kind not in KINDS:
        _fail(CurateError(f"no method kind '{kind}' (kinds: {', '.join(KINDS)})"))
    kinds = catalogue()
    if kind is not None:
        kinds = {kind: kinds[kind]}
    typer.echo(to_json(kinds) if as_json else render(kinds), nl=False)


config_app = typer.Typer(no_args_is_help=True, help="Run configurations.")
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(config: Optional[Path] = typer.Argument(None, help="run config YAML (default: the digits demo)"),
                set_: List[str] = typer.Option([], "--set", help="override, e.g. select.0.budget=0.2"),
                catalog: Optional[str] = typer.Option(None, "--catalog",
                                                      help="also check that the dataset is in this catalog")):
    """Print the validated config with every default filled in, as YAML (writes nothing)."""
    import yaml

    from .config import load_config

    try:
        cfg = load_config(str(config) if config else None, list(set_))
        if catalog is not None:
            from .catalog import Catalog

            Catalog.load(catalog).entry(cfg.dataset)
    except CurateError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(_os_line(exc))
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True), nl=False)


@app.command()
def clean(run_dir: Path = typer.Option(..., "--run", help="run directory"),
          dry_run: bool = typer.Option(False, "--dry-run", help="list what would be removed; remove nothing")):
    """Remove the unit directories the run's config (run.json) no longer has, e.g. a selection
    whose budget changed; only directories curate wrote, and of them only curate's files."""
    from .catalog import Catalog
    from .clean import clean as do_clean
    from .config import load_config
    from .runner import Runner, read_run_json

    try:
        body = read_run_json(run_dir)
        if body is None:
            raise CurateError(f"run {run_dir}: no run.json here (not a curate run)")
        cfg = load_config(body["config"])
        # the units follow from the config alone: no catalog is read
        units = Runner(cfg, Catalog(Path(body.get("catalog") or "data_catalog.yaml"), {}), run_dir).units()
        do_clean(run_dir, units, dry_run=dry_run, say=typer.echo)
    except CurateError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(_os_line(exc))


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
