"""The verification report: markdown table and PNG plots from report.json's rows.

Plain functions of the report dict, so `curate report` can redraw them without training.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from pipeline.errors import CurateError

COLUMNS = ("name", "method", "budget", "samples", "backprop_share", "steps", "acc_mean", "acc_std", "probe_mean",
           "train_loss", "train_acc", "rel_error", "train_seconds", "train_seconds_min", "train_seconds_max",
           "speedup", "curation_seconds", "curation_basis", "e2e_seconds", "e2e_speedup", "energy_ratio")

# The full-data baseline counts as converged when, averaged over seeds, its final training loss
# (a clean pass over its own training set after training) is at most MAX_LOSS_RATIO of a uniform
# guess's, ln(classes), and its running training loss fell by at most MAX_LATE_DROP from the
# second-last to the last tenth of its steps (still falling: a longer training would change the
# comparison). A loss rule, not an accuracy one: label noise caps the accuracy a converged model
# reaches on its training labels (Fashion-MNIST with 10% flipped: 80%), while an lr too small
# for the batch leaves the loss near chance (the issue's recipe: 0.6 x ln 10; converged: 0.3 x).
# A final loss below FITTED_LOSS_RATIO x ln(classes) is fitted whatever its late fall: a net that
# memorises its training set (the demo's small CNN on noisy digits: loss 0.03, train acc 99.6%)
# still halves a near-zero loss in the end, and training longer changes nothing it is compared on.
MAX_LOSS_RATIO = 0.5
MAX_LATE_DROP = 0.1
FITTED_LOSS_RATIO = 0.05
RULE = (f"full-data final training loss <= {MAX_LOSS_RATIO:g} x ln(classes) (a uniform guess's loss) and running "
        f"training loss falling by <= {MAX_LATE_DROP:.0%} from the second-last to the last tenth of the steps "
        f"unless the final loss is below {FITTED_LOSS_RATIO:g} x ln(classes) (means over seeds)")


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


def convergence(full: dict | None) -> dict:
    """Has the full-data baseline converged (`RULE`)? Every row is compared with it, so an
    undertrained baseline (too small an lr, too few steps) makes every subset look as good as
    full data. `converged` is None where the row lacks the figures (no full row, recipe clip,
    a report from before they were measured)."""
    check = {"converged": None, "rule": RULE, "reasons": [], "warning": None}
    if not full or not all(isinstance(full.get(k), (int, float)) for k in ("train_loss", "train_acc", "classes")):
        return check
    loss, chance, drop = float(full["train_loss"]), math.log(max(2, full["classes"])), full.get("late_loss_drop")
    check.update(train_loss=loss, train_acc=float(full["train_acc"]), loss_ratio=loss / chance, late_loss_drop=drop)
    if loss > MAX_LOSS_RATIO * chance:
        check["reasons"].append(f"its training loss is {loss:.3f}, {loss / chance:.0%} of a uniform guess's "
                                f"{chance:.3f} (at most {MAX_LOSS_RATIO:.0%}; training accuracy "
                                f"{full['train_acc']:.1%})")
    if isinstance(drop, (int, float)) and drop > MAX_LATE_DROP and loss >= FITTED_LOSS_RATIO * chance:
        check["reasons"].append(f"its training loss still fell {drop:.1%} over the last tenth of its steps "
                                f"(more than {MAX_LATE_DROP:.0%})")
    check["converged"] = not check["reasons"]
    if check["reasons"]:
        check["warning"] = f"{UNCONVERGED}: {' and '.join(check['reasons'])}; {ADVICE.replace('`', '')}"
    return check


UNCONVERGED = "the full-data baseline has not converged"
ADVICE = ("every comparison is against an undertrained model (train longer: `verify.epochs` or `verify.steps`, "
          "or raise `verify.lr` / lower `verify.batch_size`)")


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
    """Distilled sets and their random-ipc baselines train for verify.ipc_epochs instead (fixed epochs)."""
    if report.get("training_protocol") == "steps":
        return ""
    ipc = [r for r in report["rows"] if r.get("kind") == "distilled" or str(r.get("name")).startswith("random-ipc")]
    return f"; distilled and random-ipc sets {md_cell(ipc[0]['epochs'])} epochs" if ipc and "epochs" in ipc[0] else ""


def _protocol(report: dict) -> str:
    """Which budget governed every training: equal steps or fixed epochs (a report from before
    both existed: its epochs, as it was written)."""
    e = md_cell
    if report.get("training_protocol") == "steps":
        return f"equal steps: {e(report['steps'])} optimiser steps per training set (epochs derived per set)"
    if report.get("training_protocol") == "epochs":
        return f"fixed epochs: {e(report['epochs'])} epochs per training set"
    return f"{e(report['epochs'])} epochs"


def _seconds(r: dict) -> str:
    """Median training seconds over seeds, with their range where the row has it."""
    lo, hi = r.get("train_seconds_min"), r.get("train_seconds_max")
    spread = f" ({lo:.2f}–{hi:.2f})" if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) else ""
    return f"{r['train_seconds']:.2f}{spread}"


def _curation(r: dict) -> str:
    basis = r.get("curation_basis")
    return f"{r['curation_seconds']:.2f}" + (f" {md_cell(basis)}" if basis else "")


def _mib(v) -> str:
    return "n/a" if not isinstance(v, (int, float)) else f"{v / 2**20:.0f}"


def render_markdown(report: dict) -> str:
    """report.md: every string from the report escaped (`md_cell`); without a full-data row the
    comparison cells (relative error, speed-ups, energy ratio) are n/a. The columns a report
    from an older version lacks (steps, training fit, curation memory) are left out, so it
    renders as it did; a full-data baseline that has not converged is a warning above the table."""
    metric = report.get("metric", "test accuracy")
    rows = report["rows"]
    full = full_row(rows)
    probe = any("probe_mean" in r for r in rows)
    steps = "training_protocol" in report and all("steps" in r for r in rows)
    fit = any("train_acc" in r for r in rows)
    rss = any(isinstance(r.get("curation_peak_rss_bytes"), (int, float)) for r in rows)
    head = f"{'zero-shot' if metric == 'zero-shot accuracy' else 'test'} acc (%)"
    governs = "steps (equal)" if report.get("training_protocol") == "steps" else "steps"
    e = md_cell
    check = report.get("convergence") or convergence(full)
    lines = [f"# curate verification: {e(report['dataset'])}", "",
             f"Recipe {_code(report['recipe'])}, {_protocol(report)}, {e(report['seeds'])} seed(s), "
             f"{e(report['train_samples'])} training / {e(report['test_samples'])} test samples, "
             f"device {e(report['device'])}" + _ipc_note(report) + ".", ""]
    if check.get("converged") is False:
        reasons = " and ".join(e(r) for r in check.get("reasons") or [])
        lines += [f"**WARNING: {UNCONVERGED}**: {reasons}; {ADVICE}.", ""]
    heads = (["training set", "method", "budget", "samples", "backprop share"] + ([governs, "epochs"] if steps else [])
             + [head] + (["linear probe (%)"] if probe else []) + (["train loss", "train acc (%)"] if fit else [])
             + ["rel. error (pp)", "train (s)", "train speed-up", "curation (s)"]
             + (["curation peak RSS (MiB)"] if rss else []) + ["end-to-end speed-up", "energy ratio"])
    lines += ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        vs_full = {k: r.get(k) if full else None for k in ("rel_error", "speedup", "e2e_speedup", "energy_ratio")}
        cells = [e(r["name"]), e(r["method"]), e(r["budget"]), e(r["samples"]),
                 f"{r.get('backprop_share', r['fraction']):.3f}"]
        if steps:
            cells += [e(r["steps"]), e(r.get("epochs", "n/a"))]
        cells.append(f"{100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f}")
        if probe:
            cells.append(f"{_fmt(_pct(r.get('probe_mean')), '.2f')} ± {_fmt(_pct(r.get('probe_std')), '.2f')}")
        if fit:
            cells += [_fmt(r.get("train_loss"), ".3f"), _fmt(_pct(r.get("train_acc")), ".2f")]
        cells += [_fmt(_pct(vs_full["rel_error"]), "+.2f"), _seconds(r), _fmt(vs_full["speedup"], ".2f", "x"),
                  _curation(r)]
        if rss:
            cells.append(_mib(r.get("curation_peak_rss_bytes")))
        cells += [_fmt(vs_full["e2e_speedup"], ".2f", "x"), _fmt(vs_full["energy_ratio"], ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    if full is None:
        lines += ["", "No full-data row: relative error, speed-ups and energy ratio are n/a."]
    if metric == "zero-shot accuracy":
        lines += ["", f"- zero-shot: each test image's nearest class prompt ({', '.join(e(repr(p)) for p in report['prompts'])} "
                      "with the catalog's class names) in the CLIP trained on that set; linear probe: logistic "
                      "regression on that CLIP's image features of the whole training pool, on the test split.",
                  f"- captions longer than the text context ({e(report['clip']['context'])} tokens), truncated: "
                  f"{e(report['captions_truncated'])}."]
    notes = ["- rel. error: subset test error - full-data test error, in percentage points."]
    if steps:
        notes.append("- steps: optimiser steps each training took; epochs: steps / batches per epoch (equal steps: "
                     "the last epoch may be partial; fixed epochs: steps follow the set's size).")
    if fit:
        notes.append("- train loss, train acc: the trained model on its own training set (one clean pass after "
                     "training: no augmentation, unweighted; online methods: the full data), mean over seeds. "
                     f"The full-data baseline must have converged: {e(check['rule'])}.")
    timed = any("train_seconds_min" in r for r in rows)
    basis = ("; `cpu`: the units' CPU seconds, `wall`: wall seconds where a unit ran on a GPU or its record has "
             "no CPU time") if any(r.get("curation_basis") for r in rows) else ""
    notes += ["- " + ("train (s): median over seeds (min–max); " if timed else "") + "train speed-up: full-data "
              "training time / this set's training time" + (", of the medians" if timed else "")
              + " (online methods: their selection work inside training included).",
              "- curation: embedding + scoring + selection seconds this set needed (from each stage's "
              f"`_stage.json`{basis}); end-to-end speed-up: full-data training time / (curation + training time)."]
    if rss:
        notes.append("- curation peak RSS: the largest peak resident memory among the units of this set's curation.")
    lines += ["", *notes,
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
    written.append(_finish(fig, ax, out_dir / "accuracy_vs_time.png", "total time: curation + training (s, log scale)",
                           f"{dataset}: accuracy vs total time", ylabel))
    return written


def table_rows(report: dict) -> list[dict]:
    """The report's rows with the columns a Prefect table artifact shows."""
    return [{k: r.get(k) for k in COLUMNS} for r in report["rows"]]
