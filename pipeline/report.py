"""The verification report: markdown table and PNG plots from report.json's rows.

Plain functions of the report dict, so `curate report` can redraw them without training.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pipeline.errors import CurateError

COLUMNS = ("name", "method", "budget", "samples", "backprop_share", "acc_mean", "acc_std", "probe_mean", "rel_error",
           "train_seconds", "speedup",
           "curation_seconds", "e2e_seconds", "e2e_speedup", "energy_ratio")


_MD_SPECIAL = re.compile(r"([\\|*_`<>\[\]])")


def md_cell(value) -> str:
    """`value` as literal text in a Markdown table row: report.json is user-editable input, so a
    name holding `|`, markup, HTML or a newline must neither split the row nor render as markup."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(value).splitlines()))


def _code(value) -> str:
    """`value` as a Markdown code span (no escapes work inside one, so backticks and newlines go)."""
    return "`" + " ".join(str(value).replace("`", "'").splitlines()) + "`"


def _label(value) -> str:
    """`value` as plain matplotlib text: `$` would start mathtext (and may not parse), and a
    leading underscore hides a legend entry."""
    text = str(value).replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def full_row(rows: list[dict]) -> dict | None:
    """The full-data row every comparison is against; a hand-edited report may lack it."""
    return next((r for r in rows if r.get("kind") == "full"), None)


def read_report(path: Path) -> dict:
    """report.json as verify writes it: a JSON object whose `rows` is a non-empty list of objects.

    Anything else is a one-line CurateError naming the file, so `curate report` never shows a traceback.
    """
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise CurateError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CurateError(f"{path}: not JSON ({exc})") from None
    if not isinstance(report, dict):
        raise CurateError(f"{path}: not a curate report (a JSON object is expected)")
    rows = report.get("rows")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise CurateError(f"{path}: not a curate report ('rows' must be a list of objects)")
    if not rows:
        raise CurateError(f"{path}: holds no training-set rows, nothing to report (rerun verify)")
    return report


def _fmt(v, spec: str, unit: str = "") -> str:
    return "n/a" if v is None else format(v, spec) + unit


def _pct(v):
    return None if v is None else 100 * v


def _ipc_note(report: dict) -> str:
    """Distilled sets and their random-ipc baselines train for verify.ipc_epochs instead."""
    ipc = [r for r in report["rows"] if r.get("kind") == "distilled" or str(r.get("name")).startswith("random-ipc")]
    return f"; distilled and random-ipc sets {md_cell(ipc[0]['epochs'])} epochs" if ipc and "epochs" in ipc[0] else ""


def render_markdown(report: dict) -> str:
    """report.md: every string from the report escaped (`md_cell`); without a full-data row the
    comparison cells (relative error, speed-ups, energy ratio) are n/a."""
    metric = report.get("metric", "test accuracy")
    rows = report["rows"]
    full = full_row(rows)
    probe = any("probe_mean" in r for r in rows)
    head = f"{'zero-shot' if metric == 'zero-shot accuracy' else 'test'} acc (%)"
    e = md_cell
    lines = [f"# curate verification: {e(report['dataset'])}", "",
             f"Recipe {_code(report['recipe'])}, {e(report['epochs'])} epochs, {e(report['seeds'])} seed(s), "
             f"{e(report['train_samples'])} training / {e(report['test_samples'])} test samples, "
             f"device {e(report['device'])}" + _ipc_note(report) + ".", "",
             f"| training set | method | budget | samples | backprop share | {head} | "
             + ("linear probe (%) | " if probe else "") + "rel. error (pp) | train (s) "
             "| train speed-up | curation (s) | end-to-end speed-up | energy ratio |",
             "|---|---|---|---|---|---|" + ("---|" if probe else "") + "---|---|---|---|---|---|"]
    for r in rows:
        vs_full = {k: r.get(k) if full else None for k in ("rel_error", "speedup", "e2e_speedup", "energy_ratio")}
        probe_cell = (f"{_fmt(_pct(r.get('probe_mean')), '.2f')} ± {_fmt(_pct(r.get('probe_std')), '.2f')} | "
                      if probe else "")
        lines.append(f"| {e(r['name'])} | {e(r['method'])} | {e(r['budget'])} | {e(r['samples'])} | "
                     f"{r.get('backprop_share', r['fraction']):.3f} | "
                     f"{100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f} | {probe_cell}"
                     f"{_fmt(_pct(vs_full['rel_error']), '+.2f')} | {r['train_seconds']:.2f} | "
                     f"{_fmt(vs_full['speedup'], '.2f', 'x')} | {r['curation_seconds']:.2f} | "
                     f"{_fmt(vs_full['e2e_speedup'], '.2f', 'x')} | {_fmt(vs_full['energy_ratio'], '.3f')} |")
    if full is None:
        lines += ["", "No full-data row: relative error, speed-ups and energy ratio are n/a."]
    if metric == "zero-shot accuracy":
        lines += ["", f"- zero-shot: each test image's nearest class prompt ({', '.join(e(repr(p)) for p in report['prompts'])} "
                      "with the catalog's class names) in the CLIP trained on that set; linear probe: logistic "
                      "regression on that CLIP's image features of the whole training pool, on the test split.",
                  f"- captions longer than the text context ({e(report['clip']['context'])} tokens), truncated: "
                  f"{e(report['captions_truncated'])}."]
    lines += ["",
              "- rel. error: subset test error - full-data test error, in percentage points.",
              "- train speed-up: full-data training time / this set's training time (online methods: "
              "their selection work inside training included).",
              "- curation: embedding + scoring + selection seconds this set needed (from each stage's "
              "`_stage.json`); end-to-end speed-up: full-data training time / (curation + training time).",
              "- energy ratio: this set's training energy / full-data training energy (NVML counter, GPU only).",
              "- samples: training-set size; for online methods, the budget's samples per epoch. backprop share: "
              "samples backpropagated per epoch / training-set size, as measured (adaptive methods' full-data "
              "warm start raises it above the budget)."]
    return "\n".join(lines) + "\n"


def _series(rows):
    """Rows grouped by method (random baselines join the `random` series), sorted by budget."""
    out: dict[str, list] = {}
    for r in rows:
        if r.get("kind") != "full":
            out.setdefault(_label(r.get("method")), []).append(r)
    return {m: sorted(rs, key=lambda r: r["fraction"]) for m, rs in sorted(out.items())}


def _finish(fig, ax, path: Path, xlabel: str, title: str, ylabel: str) -> str:
    """Labels, grid and legend (outside, right) shared by both plots; saves and closes."""
    from matplotlib import pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def plot_report(report: dict, out_dir: Path) -> list[str]:
    """accuracy_vs_budget.png and accuracy_vs_time.png; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = report["rows"]
    ylabel = f"{_label(report.get('metric', 'test accuracy'))} (%)"
    full = full_row(rows)  # None: no full-data line or star
    series = _series(rows)
    colours = plt.get_cmap("tab10")
    dataset, recipe = _label(report["dataset"]), _label(report["recipe"])
    written = []

    fig, ax = plt.subplots(figsize=(8.5, 4.5), dpi=120)
    if full:
        ax.axhline(100 * full["acc_mean"], color="black", ls="--", lw=1, label=f"full data ({100 * full['acc_mean']:.2f}%)")
        ax.axhspan(100 * (full["acc_mean"] - full["acc_std"]), 100 * (full["acc_mean"] + full["acc_std"]),
                   color="black", alpha=0.08)
    for i, (m, rs) in enumerate(series.items()):
        ax.errorbar([100 * r["fraction"] for r in rs], [100 * r["acc_mean"] for r in rs],
                    yerr=[100 * r["acc_std"] for r in rs], marker="o", ms=4, capsize=3, color=colours(i % 10), label=m)
    ax.set_xscale("log")
    ticks = sorted({round(100 * r["fraction"], 1) for rs in series.values() for r in rs})
    ax.set_xticks(ticks, [f"{t:g}%" for t in ticks])
    ax.minorticks_off()
    written.append(_finish(fig, ax, out_dir / "accuracy_vs_budget.png", "budget (share of the training set, log scale)",
                           f"{dataset}: accuracy vs budget ({recipe}, {_label(report['seeds'])} seed(s))", ylabel))

    fig, ax = plt.subplots(figsize=(8.5, 4.5), dpi=120)
    if full:
        ax.scatter([full["e2e_seconds"]], [100 * full["acc_mean"]], marker="*", s=120, color="black",
                   label="full data", zorder=3)
    for i, (m, rs) in enumerate(series.items()):
        ax.errorbar([r["e2e_seconds"] for r in rs], [100 * r["acc_mean"] for r in rs],
                    yerr=[100 * r["acc_std"] for r in rs], marker="o", ms=4, ls="none", capsize=3,
                    color=colours(i % 10), label=m)
        for r in rs:
            ax.annotate(f"{100 * r['fraction']:.0f}%", (r["e2e_seconds"], 100 * r["acc_mean"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    written.append(_finish(fig, ax, out_dir / "accuracy_vs_time.png", "total wall time: curation + training (s, log scale)",
                           f"{dataset}: accuracy vs total time", ylabel))
    return written


def table_rows(report: dict) -> list[dict]:
    """The report's rows with the columns a Prefect table artifact shows."""
    return [{k: r.get(k) for k in COLUMNS} for r in report["rows"]]
