"""The verification report: markdown table and PNG plots from report.json's rows.

Plain functions of the report dict, so `curate report` can redraw them without training.
"""

from __future__ import annotations

from pathlib import Path

COLUMNS = ("name", "method", "budget", "samples", "backprop_share", "acc_mean", "acc_std", "probe_mean", "rel_error",
           "train_seconds", "speedup",
           "curation_seconds", "e2e_seconds", "e2e_speedup", "energy_ratio")


def _fmt(v, spec: str, na: str = "n/a") -> str:
    return na if v is None else format(v, spec)


def _pct(v):
    return None if v is None else 100 * v


def _ipc_note(report: dict) -> str:
    """Distilled sets and their random-ipc baselines train for verify.ipc_epochs instead."""
    ipc = [r for r in report["rows"] if r["kind"] == "distilled" or str(r["name"]).startswith("random-ipc")]
    return f"; distilled and random-ipc sets {ipc[0]['epochs']} epochs" if ipc and "epochs" in ipc[0] else ""


def render_markdown(report: dict) -> str:
    metric = report.get("metric", "test accuracy")
    probe = any("probe_mean" in r for r in report["rows"])
    head = f"{'zero-shot' if metric == 'zero-shot accuracy' else 'test'} acc (%)"
    lines = [f"# curate verification: {report['dataset']}", "",
             f"Recipe `{report['recipe']}`, {report['epochs']} epochs, {report['seeds']} seed(s), "
             f"{report['train_samples']} training / {report['test_samples']} test samples, device {report['device']}"
             + _ipc_note(report) + ".", "",
             f"| training set | method | budget | samples | backprop share | {head} | "
             + ("linear probe (%) | " if probe else "") + "rel. error (pp) | train (s) "
             "| train speed-up | curation (s) | end-to-end speed-up | energy ratio |",
             "|---|---|---|---|---|---|" + ("---|" if probe else "") + "---|---|---|---|---|---|"]
    for r in report["rows"]:
        probe_cell = (f"{_fmt(_pct(r.get('probe_mean')), '.2f')} ± {_fmt(_pct(r.get('probe_std')), '.2f')} | "
                      if probe else "")
        lines.append(f"| {r['name']} | {r['method']} | {r['budget']} | {r['samples']} | {r.get('backprop_share', r['fraction']):.3f} | "
                     f"{100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f} | {probe_cell}{100 * r['rel_error']:+.2f} | "
                     f"{r['train_seconds']:.2f} | {r['speedup']:.2f}x | {r['curation_seconds']:.2f} | "
                     f"{r['e2e_speedup']:.2f}x | {_fmt(r.get('energy_ratio'), '.3f')} |")
    if metric == "zero-shot accuracy":
        lines += ["", f"- zero-shot: each test image's nearest class prompt ({', '.join(repr(p) for p in report['prompts'])} "
                      "with the catalog's class names) in the CLIP trained on that set; linear probe: logistic "
                      "regression on that CLIP's image features of the whole training pool, on the test split.",
                  f"- captions longer than the text context ({report['clip']['context']} tokens), truncated: "
                  f"{report['captions_truncated']}."]
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
        if r["kind"] != "full":
            out.setdefault(r["method"], []).append(r)
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
    ylabel = f"{report.get('metric', 'test accuracy')} (%)"
    full = next(r for r in rows if r["kind"] == "full")
    series = _series(rows)
    colours = plt.get_cmap("tab10")
    written = []

    fig, ax = plt.subplots(figsize=(8.5, 4.5), dpi=120)
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
                           f"{report['dataset']}: accuracy vs budget ({report['recipe']}, {report['seeds']} seed(s))", ylabel))

    fig, ax = plt.subplots(figsize=(8.5, 4.5), dpi=120)
    ax.scatter([full["e2e_seconds"]], [100 * full["acc_mean"]], marker="*", s=120, color="black", label="full data", zorder=3)
    for i, (m, rs) in enumerate(series.items()):
        ax.errorbar([r["e2e_seconds"] for r in rs], [100 * r["acc_mean"] for r in rs],
                    yerr=[100 * r["acc_std"] for r in rs], marker="o", ms=4, ls="none", capsize=3,
                    color=colours(i % 10), label=m)
        for r in rs:
            ax.annotate(f"{100 * r['fraction']:.0f}%", (r["e2e_seconds"], 100 * r["acc_mean"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    written.append(_finish(fig, ax, out_dir / "accuracy_vs_time.png", "total wall time: curation + training (s, log scale)",
                           f"{report['dataset']}: accuracy vs total time", ylabel))
    return written


def table_rows(report: dict) -> list[dict]:
    """The report's rows with the columns a Prefect table artifact shows."""
    return [{k: r.get(k) for k in COLUMNS} for r in report["rows"]]
