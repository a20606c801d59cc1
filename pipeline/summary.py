"""What `curate run` prints when it ends: the report's table in plain text and one line that says
what it shows, both computed from report.json's rows (no claim is written by hand, so the demo
says what this run really measured).

Each subset is compared with full data and with the random set of the same size (the baseline
verify trains beside every selection): a subset that only beats full data because a random set
of its size does too is not curation's doing.
"""

from __future__ import annotations

from pipeline.report import full_row

SUBSET_KINDS = ("selection", "online", "distilled")


def random_twin(row: dict, rows: list[dict]) -> dict | None:
    """The random baseline with as many samples as `row` (verify trains one per selection size)."""
    return next((r for r in rows if r.get("kind") == "random" and r.get("samples") == row.get("samples")), None)


def _acc(r: dict | None) -> str:
    return "n/a" if r is None else f"{100 * r['acc_mean']:.2f}"


def _pp(a: dict | None, b: dict | None) -> str:
    return "n/a" if a is None or b is None else f"{100 * (a['acc_mean'] - b['acc_mean']):+.2f}"


def terminal_table(report: dict) -> str:
    """The rows as aligned plain text: size, accuracy, and the two comparisons that matter."""
    rows, full = report["rows"], full_row(report["rows"])
    head = ["training set", "samples", "share", "test acc (%)", "vs full (pp)", "vs random same size (pp)",
            "train loss"]
    body = []
    for r in rows:
        twin = random_twin(r, rows) if r.get("kind") in SUBSET_KINDS else None
        loss = r.get("train_loss")
        body.append([str(r["name"]), str(r["samples"]), f"{100 * r['fraction']:.0f}%",
                     f"{_acc(r)} ± {100 * r['acc_std']:.2f}", "" if r is full else _pp(r, full),
                     _pp(r, twin) if twin else "", "n/a" if not isinstance(loss, (int, float)) else f"{loss:.3f}"])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([caption(report), "", fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)])


def caption(report: dict) -> str:
    """What every row was trained and tested on, in one line."""
    if report.get("training_protocol") == "steps":
        how = f"every set trained for the same {report['steps']} optimiser steps"
    else:
        how = f"{report.get('epochs')} epochs per set"
    return (f"{report['dataset']}: {report.get('recipe')} recipe, {how}, mean ± std over {report.get('seeds')} "
            f"seed(s), tested on {report.get('test_samples')} held-out samples")


def headline(report: dict) -> str:
    """One line: the best subset against full data, the smallest subset at least as accurate as
    full data, and the subsets a random set of their size beats."""
    rows, full = report["rows"], full_row(report["rows"])
    subsets = [r for r in rows if r.get("kind") in SUBSET_KINDS]
    if full is None or not subsets:
        return "No full-data row and subsets to compare: see the table."
    acc = lambda r: 100 * r["acc_mean"]  # noqa: E731
    parts = []
    best = max(subsets, key=lambda r: (r["acc_mean"], -r["samples"]))
    twin = random_twin(best, rows)
    parts.append(f"best: {best['name']} at {acc(best):.2f}% with {100 * best['fraction']:.0f}% of the samples, "
                 f"{acc(best) - acc(full):+.2f} points against full data's {acc(full):.2f}%"
                 + (f" (a random set of its size: {acc(twin):.2f}%)" if twin and twin is not best else ""))
    level = sorted((r for r in subsets if r["acc_mean"] >= full["acc_mean"]), key=lambda r: (r["samples"], r["name"]))
    if level and level[0] is not best:
        small = level[0]
        parts.append(f"{small['name']} matches full data with {100 * small['fraction']:.0f}% of it "
                     f"({small['samples']} samples, {acc(small):.2f}%)")
    elif not level:
        near = min(subsets, key=lambda r: (full["acc_mean"] - r["acc_mean"], r["samples"]))
        parts.append(f"no subset reaches full data; the closest is {near['name']}, "
                     f"{acc(full) - acc(near):.2f} points below")
    losers = [(r, random_twin(r, rows)) for r in subsets]
    losers = [(r, t) for r, t in losers if t is not None and t["acc_mean"] > r["acc_mean"]]
    if losers:
        parts.append("below a random set of their size: " + ", ".join(
            f"{r['name']} ({acc(r):.2f}% vs {acc(t):.2f}%)" for r, t in losers))
    else:
        parts.append("every subset beats a random set of its size")
    return "In short: " + "; ".join(parts) + "."
