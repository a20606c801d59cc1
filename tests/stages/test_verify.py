"""verify: one protocol for every training set, one unit per set; the report unit compares them;
the same accuracies as training every set in one go; every figure reported."""

import json

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.errors import CurateError
from pipeline.report import plot_report

PROTOCOL = {"recipe": "convnet3", "width": 32, "epochs": 4, "seeds": 2, "batch_size": 32, "lr": 0.1}
FIELDS = ("acc_mean", "acc_std", "rel_error", "train_seconds", "speedup", "curation_seconds", "e2e_seconds",
          "e2e_speedup", "backprop_samples")


@pytest.fixture(scope="module")
def verified(digits_catalog, tmp_path_factory):
    from pipeline.catalog import Catalog
    from pipeline.runner import Runner
    from tests.helpers import fast_config

    run = tmp_path_factory.mktemp("verify") / "run"
    cfg = load_config(fast_config(run, embed={"epochs": 2},
                                  select=[{"method": "craig", "budget": 0.3, "features": "embeddings"}],
                                  verify={**PROTOCOL, "online": [{"method": "uniform", "budget": 0.3}]}))
    runner = Runner(cfg, Catalog.load(digits_catalog))
    runner.write_run_json()
    runner.run_all()
    return runner, json.loads((run / "report" / "report.json").read_text())


def test_report_has_every_set_and_figure(verified):
    runner, report = verified
    rows = {r["name"]: r for r in report["rows"]}
    n = report["train_samples"]
    k = int(round(0.3 * n))
    assert list(rows) == ["full", "craig-0.3", "uniform-0.3", f"random-n{k}"]
    for r in rows.values():
        for f in FIELDS:
            assert r[f] is not None and np.isfinite(r[f]), (r["name"], f)
        assert len(r["accs"]) == 2 and r["energy_ratio"] is None  # CPU: no NVML counter
    full, craig = rows["full"], rows["craig-0.3"]
    assert full["rel_error"] == 0 and full["speedup"] == 1 and full["curation_seconds"] == 0
    assert full["acc_mean"] > 0.85  # convnet3 learns digits in 4 epochs
    # craig's cost: the proxy embedding and its own selection, from the stages' records
    assert set(craig["curation"]) == {"embed", "select/craig-0.3"} and craig["curation_seconds"] > 0
    assert craig["e2e_speedup"] < craig["speedup"]
    assert craig["rel_error"] == pytest.approx((1 - craig["acc_mean"]) - (1 - full["acc_mean"]))
    assert craig["weighted"] and craig["samples"] == k
    # every set trains the same number of epochs: backprop cost follows the budget
    assert full["backprop_samples"] == 4 * n and craig["backprop_samples"] == 4 * k
    online = rows["uniform-0.3"]
    assert online["kind"] == "online" and online["probe_samples"] == 4 * n
    assert abs(online["backprop_samples"] - 4 * k) <= 4 * 45  # top 30% of every 32-sample batch
    md = (runner.run_dir / "report" / "report.md").read_text()
    assert "| craig-0.3 | craig | 0.3 |" in md and "end-to-end speed-up" in md


def test_one_unit_per_set_reading_only_its_own_inputs(verified):
    runner, report = verified
    k = report["rows"][-1]["samples"]
    assert runner.units("verify") == ["verify/full", "verify/craig-0.3", "verify/uniform-0.3", "verify/random-0.3"]
    assert runner.upstream("verify/full") == runner.upstream("verify/uniform-0.3") == ["index"]
    assert runner.upstream("verify/random-0.3") == ["index"]
    assert runner.upstream("verify/craig-0.3") == ["index", "materialize/craig-0.3"]
    assert runner.upstream("report") == runner.units("verify")
    assert runner.resources("verify/full").gpus == 1 and runner.resources("report").gpus == 0
    assert "online" not in runner.unit_config("verify/full") and "ipc_epochs" not in runner.unit_config("verify/full")
    assert runner.unit_config("verify/uniform-0.3")["online"]["method"] == "uniform"
    result = json.loads((runner.run_dir / "verify" / "random-0.3" / "result.json").read_text())
    assert result["row"]["name"] == f"random-n{k}" and [t["acc"] for t in result["trainings"]] == result["row"]["accs"]
    assert {"seconds", "energy_j", "epochs"} <= set(result["trainings"][0])


def test_same_accuracies_as_every_set_trained_in_one_go(verified, tmp_path):
    """The per-set units report what one process training every set after the other (the
    single verify unit before them) gets for the same seeds: train_once called directly."""
    from pipeline.arrays import num_classes_of
    from pipeline.energy import EnergyMeter
    from pipeline.manifest import read_parquet
    from pipeline.sampling import random_subset
    from stages.verify import TrainingSet, load_test_split, subset_images, train_once

    runner, report = verified
    ctx = runner.context("verify/full", tmp_path)
    c = ctx.config
    pool, images = ctx.index_arrays(None)
    labels, n = pool.labels, len(pool.labels)
    test = load_test_split(ctx, None)
    n_classes = num_classes_of(ctx.entry, labels)
    manifest = read_parquet(runner.run_dir / "materialize" / "craig-0.3" / "manifest.parquet")
    craig_rows = manifest.column("row").to_numpy()
    craig_x = subset_images(runner.context("verify/craig-0.3", tmp_path), "craig-0.3", None)
    online = runner.unit_config("verify/uniform-0.3")["online"]
    k = int(round(0.3 * n))
    sets = [(TrainingSet("full", "full", "full", 1.0), lambda s: (images, labels)),
            (TrainingSet("craig-0.3", "selection", "craig", 0.3, craig_rows, manifest.column("weight").to_numpy()),
             lambda s: (craig_x, labels[craig_rows])),
            (TrainingSet("uniform-0.3", "online", "uniform", 0.3, online=online), lambda s: (images, labels)),
            (TrainingSet(f"random-n{k}", "random", "random", k, np.arange(k)),
             lambda s: (images[random_subset(n, k, 7919 + s)], labels[random_subset(n, k, 7919 + s)]))]
    accs = {ts.name: [train_once(c, ts, *data(s), test, n_classes, s, ctx.device, EnergyMeter(ctx.device))["acc"]
                      for s in range(2)] for ts, data in sets}
    assert {r["name"]: r["accs"] for r in report["rows"]} == accs


def test_plots_render(verified, tmp_path):
    from matplotlib import image

    runner, report = verified
    for name in ("accuracy_vs_budget.png", "accuracy_vs_time.png"):
        img = image.imread(runner.run_dir / "report" / name)
        assert img.shape[0] > 400 and img.shape[1] > 700
        assert img[..., :3].std() > 0.05  # not a blank canvas
    assert plot_report(report, tmp_path) == ["accuracy_vs_budget.png", "accuracy_vs_time.png"]


@pytest.mark.parametrize("verify, msg", [
    ({"recipe": "vgg"}, "verify.recipe: Input should be"),
    ({"online": [{"method": "crest", "budget": 1.5}]}, "budget 1.5 is out of range"),
    ({"online": [{"method": "big_loss", "budget": [0.1, 0.1]}]}, "online names repeat: big_loss-0.1"),
    ({"epochs": 10, "milestones": [10]}, "milestone 10 is outside the training"),
    ({"online": [{"method": "random", "budget": 0.1}]}, "verify.online.0.method: Input should be"),
])
def test_bad_verify_settings_are_one_line_errors(tmp_path, verify, msg):
    with pytest.raises(CurateError, match=msg):
        load_config({"run": str(tmp_path), "dataset": "digits", "verify": verify})


def test_online_name_may_not_shadow_a_selection(tmp_path):
    with pytest.raises(CurateError, match="'big_loss-0.1' is also a selection's name"):
        load_config({"run": str(tmp_path), "dataset": "digits",
                     "select": {"method": "random", "budget": 0.1, "name": "big_loss-0.1"},
                     "verify": {"online": {"method": "big_loss", "budget": 0.1}}})


def test_curation_cost_follows_every_upstream_unit(tmp_path, digits_catalog):
    """A score-based selection pays for the proxy too; a pooled one for its pool's selection."""
    from pipeline.catalog import Catalog
    from pipeline.runner import Runner
    from stages.verify import curation_cost

    cfg = load_config({"run": str(tmp_path), "dataset": "digits", "score": {"methods": ["el2n"]},
                       "select": [{"method": "difficulty", "score": "el2n", "budget": 0.1},
                                  {"method": "dedup", "eps": 0.01},
                                  {"method": "craig", "budget": 0.1, "pool": "dedup-eps0.01"},
                                  {"method": "random", "budget": 0.1}]})
    runner = Runner(cfg, Catalog.load(digits_catalog))

    def cost(sel):  # what the unit verify/<sel> is handed: the units upstream of it alone
        return sorted(curation_cost(runner.context(f"verify/{sel}", tmp_path / "out"), f"select/{sel}"))

    assert cost("difficulty-0.1") == ["embed", "score", "select/difficulty-0.1"]
    assert cost("craig-0.1") == ["embed", "select/craig-0.1", "select/dedup-eps0.01"]
    assert cost("random-0.1") == ["select/random-0.1"]
    assert runner.upstream("verify/random-dedup-eps0.01") == ["index", "select/dedup-eps0.01"]


def test_convnet3_on_tiny_images_is_a_one_line_error():
    from stages.verify import check_input_size

    with pytest.raises(CurateError, match="convnet3 needs images of at least 8 x 8 px, got 6 x 6"):
        check_input_size("convnet3", (1, 6, 6))
    check_input_size("mlp", (1, 6, 6))


def test_a_killed_verify_unit_resumes_with_the_same_accuracies(verified, monkeypatch, tmp_path):
    """Seeds trained before a crash are not trained again (the unit's journal), and the unit's
    result matches an unbroken run's. On a copy of the shared run, which other tests read."""
    import shutil

    import stages.verify as verify
    from pipeline.runner import Runner

    shared, report = verified
    shutil.copytree(shared.run_dir, tmp_path / "run")
    runner = Runner(shared.cfg, shared.catalog, tmp_path / "run")
    unit = runner.run_dir / "verify" / "full"
    before = json.loads((unit / "result.json").read_text())
    real, calls = verify.train_once, []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(verify, "train_once", crash_on_second)
    with pytest.raises(RuntimeError, match="killed"):
        runner.run("verify/full", force=True)
    assert not any(unit.parent.glob(".tmp-full*"))  # nothing half-written in place
    assert len(list((runner.run_dir / ".verify-progress").glob("*.jsonl"))) == 1
    calls.clear()
    monkeypatch.setattr(verify, "train_once", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    runner.run("verify/full", force=True)
    assert len(calls) == 1  # 2 seeds, 1 already done
    again = json.loads((unit / "result.json").read_text())
    assert again["row"]["accs"] == before["row"]["accs"] == report["rows"][0]["accs"]
    assert json.loads((unit / "_stage.json").read_text())["metrics"]["resumed_trainings"] == 1
    assert not list((runner.run_dir / ".verify-progress").glob("*.jsonl"))  # done: the journal is gone
    assert runner.state("report") == "stale"  # verify/full's outputs changed (its timings): report redraws
    assert runner.state("verify/craig-0.3") == "done"


def test_training_sets_and_their_units(tmp_path):
    """One unit per set; random baselines per budget (a `random` selection is its budget's), named
    by the size as far as the config knows it; a set without a budget gets one of its size."""
    cfg = load_config({"run": str(tmp_path), "dataset": "digits",
                       "select": [{"method": "random", "budget": 0.1}, {"method": "stratified", "budget": [0.1, 0.2]},
                                  {"method": "stratified", "budget": 50}, {"method": "dedup", "eps": 0.3}],
                       "distill": [{"method": "dm", "ipc": [1, 2]}],
                       "verify": {"online": [{"method": "uniform", "budget": [0.2, 0.3]}]}})
    assert [(s.name, s.kind) for s in cfg.verify_sets()] == [
        ("full", "full"), ("random-0.1", "selection"), ("stratified-0.1", "selection"),
        ("stratified-0.2", "selection"), ("stratified-50", "selection"), ("dedup-eps0.3", "selection"),
        ("uniform-0.2", "online"), ("uniform-0.3", "online"), ("dm-ipc1", "distilled"), ("dm-ipc2", "distilled"),
        ("random-ipc1", "random"), ("random-ipc2", "random"), ("random-0.2", "random"), ("random-n50", "random"),
        ("random-dedup-eps0.3", "random"), ("random-0.3", "random")]
    plain = load_config({"run": str(tmp_path), "dataset": "digits", "select": {"method": "stratified", "budget": 0.2},
                         "verify": {"random_baseline": False}})
    assert [s.name for s in plain.verify_sets()] == ["full", "stratified-0.2"]


@pytest.mark.parametrize("select", [{"method": "stratified", "budget": 0.2, "name": "full"},
                                    [{"method": "stratified", "budget": 0.2},
                                     {"method": "stratified", "budget": 0.3, "name": "random-0.2"}]])
def test_a_set_named_like_full_or_a_baseline_is_a_one_line_error(tmp_path, select):
    with pytest.raises(CurateError, match="names two of verify's training sets"):
        load_config({"run": str(tmp_path), "dataset": "digits", "select": select})
