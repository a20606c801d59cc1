"""verify's training budget and what the report says about each training: equal steps
(`verify.steps`) beside fixed epochs, the final fit on each set's own training data, a
full-data baseline that has not converged flagged, median timings with their range, and the
curation cost from the units' CPU seconds.

One thread: the sets here are small and the CPU shared."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.errors import CurateError
from pipeline.report import MAX_LOSS_RATIO, convergence, render_markdown
from stages.report import compare_with_full
from stages.verify import TrainingSet, summarise, timing, unit_cost

from tests.helpers import FMNIST, digits_split, fast_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 30
DM = {"method": "dm", "ipc": 2, "iterations": 5, "width": 16, "batch_real": 64, "dsa": "flip_crop"}


@pytest.fixture(scope="module")
def equal_steps(digits_catalog, tmp_path_factory, one_torch_thread):
    from pipeline.catalog import Catalog
    from pipeline.runner import Runner

    run = tmp_path_factory.mktemp("steps") / "run"
    cfg = load_config(fast_config(run, distill={"specs": [DM]},
                                  verify={"recipe": "convnet3", "width": 16, "steps": STEPS, "seeds": 2,
                                          "batch_size": 32, "lr": 0.1,
                                          "online": [{"method": "uniform", "budget": 0.3}]}))
    runner = Runner(cfg, Catalog.load(digits_catalog))
    runner.write_run_json()
    runner.run_all()
    return runner, json.loads((run / "report" / "report.json").read_text())


def test_every_set_gets_the_same_optimiser_steps(equal_steps):
    runner, report = equal_steps
    assert report["training_protocol"] == "steps" and report["steps"] == STEPS and report["epochs"] is None
    rows = {r["name"]: r for r in report["rows"]}
    assert {"full", "random-0.1", "stratified-0.2", "uniform-0.3", "dm-ipc2", "random-ipc2"} <= set(rows)
    for unit in runner.units("verify"):
        result = json.loads((runner.run_dir / unit / "result.json").read_text())
        assert [t["steps"] for t in result["trainings"]] == [STEPS, STEPS], unit
        r = result["row"]
        assert r["steps"] == STEPS
        if r["kind"] != "online":  # one batch of 32 per step: the epochs follow from the set's size
            assert r["epochs"] == pytest.approx(STEPS / math.ceil(r["samples"] / 32), abs=1e-4), unit
    # full data (1438 samples) does not finish one epoch; the 20 distilled images run 30 epochs
    assert rows["full"]["epochs"] < 1 and rows["dm-ipc2"]["epochs"] == STEPS
    assert rows["full"]["backprop_samples"] == STEPS * 32  # 30 of its 45 batches, all full
    sub = rows["random-0.1"]
    assert sub["samples"] == 144 and sub["backprop_samples"] == 6 * 144  # 5 batches an epoch: 6 whole epochs
    # the budget that governs is the one a unit's fingerprint holds
    assert runner.unit_config("verify/full")["steps"] == STEPS and "epochs" not in runner.unit_config("verify/full")
    assert "ipc_epochs" not in runner.unit_config("verify/dm-ipc2")
    md = (runner.run_dir / "report" / "report.md").read_text()
    assert f"equal steps: {STEPS} optimiser steps per training set (epochs derived per set)" in md
    assert "| steps (equal) | epochs |" in md and f"| {STEPS} | 0.6667 |" in md  # full data: 30 of 45 batches


def test_every_training_records_its_fit_and_the_report_checks_full_data(equal_steps):
    runner, report = equal_steps
    for r in report["rows"]:
        assert len(r["train_accs"]) == len(r["train_losses"]) == 2
        assert r["train_acc"] == pytest.approx(np.mean(r["train_accs"]))
        assert r["train_loss"] == pytest.approx(np.mean(r["train_losses"])) and r["train_loss"] > 0
        assert 0 <= r["train_acc"] <= 1
    # 20 distilled images, 30 steps: fitted far better than 1438 real ones in the same steps
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["dm-ipc2"]["train_acc"] > rows["full"]["train_acc"]
    check = report["convergence"]
    assert check == convergence(rows["full"])
    full = rows["full"]
    assert full["classes"] == 10
    assert check["converged"] == (full["train_loss"] <= MAX_LOSS_RATIO * np.log(10) and full["late_loss_drop"] <= 0.1)
    md = (runner.run_dir / "report" / "report.md").read_text()
    assert ("WARNING: the full-data baseline has not converged" in md) == (check["converged"] is False)
    if check["converged"] is False:
        assert check["warning"].startswith("the full-data baseline has not converged: ")


def test_median_timings_and_curation_from_cpu_seconds(equal_steps):
    runner, report = equal_steps
    for unit in runner.units("verify"):
        result = json.loads((runner.run_dir / unit / "result.json").read_text())
        r, secs = result["row"], [t["seconds"] for t in result["trainings"]]
        assert r["train_seconds"] == pytest.approx(np.median(secs)) and r["train_seconds_per_seed"] == secs
        assert (r["train_seconds_min"], r["train_seconds_max"]) == (min(secs), max(secs))
    strat = next(r for r in report["rows"] if r["name"] == "stratified-0.2")
    assert set(strat["curation"]) == {"select/stratified-0.2"}
    rec = json.loads((runner.run_dir / "select" / "stratified-0.2" / "_stage.json").read_text())
    unit = strat["curation_units"]["select/stratified-0.2"]
    if rec.get("cpu_seconds") is not None:  # the runner records CPU seconds: the cost is those
        assert unit["basis"] == strat["curation_basis"] == "cpu" and unit["seconds"] == rec["cpu_seconds"]
        assert strat["curation_peak_rss_bytes"] == rec["peak_rss_bytes"] > 0
    else:
        assert unit["basis"] == "wall" and unit["seconds"] == rec["wall_seconds"]
    assert strat["curation_seconds"] == unit["seconds"]


def test_median_not_mean_and_speedup_of_medians():
    """Constructed timings: one slow seed moves a mean, not a median."""
    def fits(seconds):
        return [{"acc": 0.9, "energy_j": None, "seconds": s, "steps": 10, "epochs": 2, "backprop_samples": 100,
                 "probe_samples": 0, "train_loss": 0.1, "train_acc": 0.95, "classes": 10, "loss_curve": [1.0, 0.5, 0.4]}
                for s in seconds]

    assert timing([3.0, 1.0, 10.0, 2.0]) == {"train_seconds": 2.5, "train_seconds_min": 1.0,
                                             "train_seconds_max": 10.0, "train_seconds_per_seed": [3.0, 1.0, 10.0, 2.0]}
    full = summarise(TrainingSet("full", "full", "full", 1.0), fits([4.0, 17.0, 5.0]), 100)
    sub = summarise(TrainingSet("r", "random", "random", 10, np.arange(10)), fits([1.0, 1.25, 9.0]), 100)
    assert full["train_seconds"] == 5.0 and sub["train_seconds"] == 1.25  # means: 8.67 and 3.75
    assert (sub["train_seconds_min"], sub["train_seconds_max"]) == (1.0, 9.0)
    assert sub["late_loss_drop"] == pytest.approx(0.2)
    rows = [full, sub]
    compare_with_full(rows)
    assert sub["speedup"] == pytest.approx(4.0)


@pytest.mark.parametrize("record, want", [
    ({"wall_seconds": 10.0, "cpu_seconds": 14.5, "peak_rss_bytes": 2**30, "device": "cpu"}, (14.5, "cpu", 2**30)),
    ({"wall_seconds": 10.0, "cpu_seconds": 3.0, "peak_rss_bytes": 2**30, "device": "cuda:0"}, (10.0, "wall", 2**30)),
    ({"wall_seconds": 10.0, "device": "cpu"}, (10.0, "wall", None)),  # a record from before CPU seconds
])
def test_unit_cost_prefers_cpu_seconds_where_they_measure_the_work(record, want):
    cost = unit_cost(record)
    assert (cost["seconds"], cost["basis"], cost["peak_rss_bytes"]) == want and cost["wall_seconds"] == 10.0


def test_curation_summary_says_which_basis():
    from stages.verify import curation_summary

    s = curation_summary({"embed": unit_cost({"wall_seconds": 5.0, "cpu_seconds": 9.0, "peak_rss_bytes": 300,
                                              "device": "cpu"}),
                          "select/x": unit_cost({"wall_seconds": 2.0})})
    assert s["curation"] == {"embed": 9.0, "select/x": 2.0} and s["curation_seconds"] == 11.0
    assert s["curation_basis"] == "mixed" and s["curation_peak_rss_bytes"] == 300
    assert curation_summary({})["curation_basis"] is None


def report_of(rows, protocol="steps"):
    compare_with_full(rows)
    steps = protocol == "steps"
    return {"metric": "test accuracy", "dataset": "d", "recipe": "small_cnn", "epochs": None if steps else 5,
            "steps": 500 if steps else None,
            "training_protocol": protocol, "seeds": 3, "device": "cpu", "train_samples": 100, "test_samples": 50,
            "protocol": {}, "convergence": convergence(rows[0]), "rows": rows}


def row(name, kind, train_loss, drop=0.01, secs=(1.0, 2.0, 4.0)):
    """A row as verify summarises it, of three seeds' trainings on a 10-class set."""
    return summarise(TrainingSet(name, kind, kind, 1.0), [
        {"acc": 0.5, "energy_j": None, "seconds": s, "steps": 500, "epochs": 5, "backprop_samples": 500,
         "probe_samples": 0, "train_loss": train_loss, "train_acc": 0.55, "classes": 10,
         "loss_curve": [1.0, 1.0, 1.0 - drop]} for s in secs], 100)


def test_report_md_names_the_protocol_and_warns_on_an_unconverged_baseline(tmp_path):
    md = render_markdown(report_of([row("full", "full", 1.4), row("sub", "random", 0.3)]))
    assert "Recipe `small_cnn`, equal steps: 500 optimiser steps per training set (epochs derived per set)" in md
    warning = next(line for line in md.splitlines() if "WARNING" in line)
    assert warning == ("**WARNING: the full-data baseline has not converged**: its training loss is 1.400, 61% of a "
                       "uniform guess's 2.303 (at most 50%; training accuracy 55.0%); every comparison is against an "
                       "undertrained model (train longer: `verify.epochs` or `verify.steps`, or raise `verify.lr` / "
                       "lower `verify.batch_size`).")
    # steps, epochs, test acc, train loss, train acc, rel. error, median seconds (min–max)
    assert "| 1.000 | 500 | 5 | 50.00 ± 0.00 | 1.400 | 55.00 | +0.00 | 2.00 (1.00–4.00) |" in md
    ok = render_markdown(report_of([row("full", "full", 0.7), row("sub", "random", 0.3)], protocol="epochs"))
    assert "WARNING" not in ok and "Recipe `small_cnn`, fixed epochs: 5 epochs per training set, 3 seed(s)" in ok
    still = convergence(row("full", "full", 0.7, drop=0.3))
    assert still["converged"] is False and "still fell 30.0% over the last tenth" in still["warning"]
    # a loss under 5% of chance (0.115 for 10 classes) is fitted: a memorising net's last halving of it is not
    # undertraining (the demo's small CNN on noisy digits ends at 0.03 with 99.6% training accuracy)
    assert convergence(row("full", "full", 0.03, drop=0.3))["converged"] is True
    assert convergence(row("full", "full", 0.2, drop=0.3))["converged"] is False


def test_curate_report_prints_the_warning(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    (tmp_path / "report").mkdir()
    report = report_of([row("full", "full", 1.4), row("sub", "random", 0.3)])
    del report["convergence"]  # a report.json without the check: `curate report` still makes it
    (tmp_path / "report" / "report.json").write_text(json.dumps(report))
    res = CliRunner().invoke(app, ["report", "--run", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "**WARNING: the full-data baseline has not converged**: its training loss is 1.400, 61%" in res.output


@pytest.mark.parametrize("verify, msg", [
    ({"steps": 100, "epochs": 5}, "verify.epochs and verify.steps are both set: exactly one governs"),
    ({"steps": 100, "milestones": [100]}, r"milestone 100 is outside the training \(1..99 steps\)"),
    ({"recipe": "clip", "steps": 100}, "verify.steps trains classifiers"),
    ({"steps": 0}, "verify.steps: Input should be greater than or equal to 1"),
])
def test_bad_protocol_settings_are_one_line_errors(tmp_path, verify, msg):
    with pytest.raises(CurateError, match=msg):
        load_config({"run": str(tmp_path), "dataset": "digits", "verify": verify})


def test_the_protocol_survives_run_json(tmp_path):
    """run.json holds the validated config; reading it back must not see both budgets set."""
    from pipeline.config.run import RunConfig

    steps = load_config({"run": str(tmp_path), "dataset": "digits", "verify": {"steps": 200}})
    again = RunConfig.model_validate(json.loads(json.dumps(steps.model_dump(mode="json"))))
    assert (again.verify.steps, again.verify.epochs, again.verify.protocol) == (200, None, "steps")
    default = load_config({"run": str(tmp_path), "dataset": "digits"})
    assert (default.verify.epochs, default.verify.steps, default.verify.protocol) == (20, None, "epochs")


def verify_config(**verify) -> dict:
    """verify's validated settings, as its units read them."""
    return load_config({"run": "/tmp/unused", "dataset": "digits", "verify": verify}).verify.model_dump()


def train_full(x, y, test, recipe: str, **verify):
    """One full-data training the way verify trains it (train_once), summarised as its row."""
    import torch

    from pipeline.energy import EnergyMeter
    from stages.verify import train_once

    c = verify_config(recipe=recipe, **verify)
    ts = TrainingSet("full", "full", "full", 1.0)
    cpu = torch.device("cpu")
    fits = [train_once(c, ts, x, y, test, 10, s, cpu, EnergyMeter(cpu)) for s in range(c["seeds"])]
    return summarise(ts, fits, len(y))


def test_an_undertrained_baseline_is_flagged_and_a_trained_one_not_digits():
    """Real handwritten digits (sklearn's): a tiny lr leaves the model far from fitting its
    training set; the same steps at a workable lr fit it."""
    x, y, xt, yt = digits_split()
    common = {"steps": 200, "batch_size": 32, "seeds": 1, "width": 64}
    weak = train_full(x, y, (xt, yt), "mlp", lr=1e-4, **common)
    good = train_full(x, y, (xt, yt), "mlp", lr=0.05, **common)
    assert weak["steps"] == good["steps"] == 200
    assert convergence(weak)["converged"] is False and weak["train_loss"] > MAX_LOSS_RATIO * np.log(10)
    assert convergence(good)["converged"] is True and good["acc_mean"] > 0.9


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST not found (set CURATE_FMNIST)")
def test_the_issues_recipe_on_noisy_fashion_mnist_is_flagged():
    """The issue's case on real images: small_cnn on 3,800 Fashion-MNIST training images with 10%
    of the labels flipped. Batch 256, lr 0.01, 15 epochs (lr x0.1 half-way) stalls far from
    fitting the data; batch 64, lr 0.05 fits it (as far as the noise lets it)."""
    from pipeline.ingest import read_idx_arrays

    xtr, ytr = read_idx_arrays(str(FMNIST), "train")
    xte, yte = read_idx_arrays(str(FMNIST), "t10k")
    rng = np.random.default_rng(0)
    pick = rng.permutation(len(ytr))[:3800]
    x, y = xtr[pick][:, None].copy(), ytr[pick].astype(np.int64)
    flip = rng.random(len(y)) < 0.1
    y[flip] = (y[flip] + rng.integers(1, 10, int(flip.sum()))) % 10
    test = (xte[:2000][:, None].copy(), yte[:2000].astype(np.int64))
    weak = train_full(x, y, test, "small_cnn", epochs=15, batch_size=256, lr=0.01, seeds=1)
    good = train_full(x, y, test, "small_cnn", epochs=15, batch_size=64, lr=0.05, seeds=1)
    for name, r in (("batch 256, lr 0.01", weak), ("batch 64, lr 0.05", good)):
        print(f"{name}: train loss {r['train_loss']:.3f} ({r['train_loss'] / np.log(10):.2f} x ln 10), "
              f"train acc {r['train_acc']:.3f}, test acc {r['acc_mean']:.3f}, late drop {r['late_loss_drop']:+.3f}")
    assert convergence(weak)["converged"] is False and weak["train_loss"] > MAX_LOSS_RATIO * np.log(10)
    assert convergence(good)["converged"] is True
    assert good["acc_mean"] > weak["acc_mean"] + 0.08
