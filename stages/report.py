"""report: the comparison of every verify unit's training set with full data (no training).

Reads each `verify/<set>/result.json`, puts the rows in report order (full data, selections,
online methods, distilled sets, random baselines; one `random-n<k>` row per size, none where
a `random` selection has that size), adds relative error, speed-ups (of median training
times) and energy ratio against the full-data row, checks that the full-data baseline has
converged (pipeline.report.convergence), and writes report.json, report.md and the two PNG
plots (pipeline.report draws them; `curate report --run DIR` redraws them from report.json).
"""

from __future__ import annotations

import json

from pipeline.report import convergence, full_row, plot_report, render_markdown
from pipeline.stage import Stage, StageContext

# the recipe settings report.json's `protocol` shows
PROTOCOL = ("steps", "batch_size", "lr", "momentum", "nesterov", "weight_decay", "schedule", "milestones", "gamma",
            "augment", "bf16", "channels_last", "width", "ipc_epochs")


def compare_with_full(rows: list[dict]) -> None:
    """Relative error, speed-ups and energy ratio of every row against the full-data row; the
    speed-ups divide median training times (`train_seconds`, over seeds)."""
    full = rows[0]
    for r in rows:
        r["rel_error"] = (1 - r["acc_mean"]) - (1 - full["acc_mean"])
        r["speedup"] = full["train_seconds"] / max(r["train_seconds"], 1e-9)
        r["e2e_seconds"] = r["curation_seconds"] + r["train_seconds"]
        r["e2e_speedup"] = full["train_seconds"] / max(r["e2e_seconds"], 1e-9)
        r["energy_ratio"] = (r["energy_j"] / full["energy_j"]
                             if r["energy_j"] is not None and full["energy_j"] else None)


def report_rows(sets: list, results: list[dict]) -> list[dict]:
    """The rows of `results` (one per verify set, in pipeline.config's order) as the report
    lists them: a random subset of a size another baseline or a `random` selection already
    covers (a count and a fraction of the same size, a dedup that kept as many) is left out."""
    covered = {res["row"]["samples"] for vs, res in zip(sets, results)
               if vs.kind == "selection" and vs.spec.method == "random"}
    rows, names = [], set()
    for vs, res in zip(sets, results):
        row = res["row"]
        if vs.kind == "random" and not vs.ipc and (row["samples"] in covered or row["name"] in names):
            continue
        names.add(row["name"])
        rows.append(row)
    return rows


class ReportStage(Stage):
    name = "report"
    version = 2

    def config(self, cfg, sel, entry=None):
        """What the report's header states beside the rows."""
        v = cfg.verify
        c = {"recipe": v.recipe, "epochs": v.clip.epochs if v.recipe == "clip" else v.epochs, "seeds": v.seeds,
             "training_protocol": v.protocol, "steps": v.steps, "protocol": v.model_dump(include=set(PROTOCOL))}
        if v.recipe == "clip":
            c.update(prompts=v.prompts, clip=v.clip.model_dump())
        return c

    def upstream(self, cfg, sel):
        return [f"verify/{s.name}" for s in cfg.verify_sets()]

    def run(self, ctx: StageContext) -> None:
        c = ctx.config
        sets = ctx.cfg.verify_sets()
        results = [json.loads((ctx.input_dir(f"verify/{s.name}") / "result.json").read_text()) for s in sets]
        rows = report_rows(sets, results)
        compare_with_full(rows)
        full = results[0]  # verify/full: the figures every unit shares
        report = {"metric": full["metric"], "dataset": ctx.cfg.dataset, "recipe": c["recipe"], "epochs": c["epochs"],
                  "steps": c["steps"], "training_protocol": c["training_protocol"], "seeds": c["seeds"],
                  "device": full["device"], "train_samples": full["train_samples"],
                  "test_samples": full["test_samples"], "protocol": c["protocol"],
                  "convergence": convergence(full_row(rows)), "rows": rows}
        if c["recipe"] == "clip":
            report.update(captions_truncated=full["captions_truncated"], prompts=c["prompts"], clip=c["clip"])
        (ctx.out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        (ctx.out / "report.md").write_text(render_markdown(report))
        if report["convergence"]["converged"] is False:
            print(f"report: WARNING {report['convergence']['warning']}")
        try:
            plot_report(report, ctx.out)
        except Exception as exc:  # the trainings are worth more than their pictures
            print(f"report: plots not drawn ({type(exc).__name__}: {exc}); `curate report --run DIR` redraws them")
        ctx.metrics.update({r["name"]: round(r["acc_mean"], 4) for r in rows})
