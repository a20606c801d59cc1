"""verify: one protocol for every training set; deterministic per seed; every figure reported."""

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
    from tests.conftest import fast_config

    run = tmp_path_factory.mktemp("verify") / "run"
    cfg = load_config(fast_config(run, embed={"epochs": 2},
                                  select=[{"method": "craig", "budget": 0.3, "features": "embeddings"}],
                                  verify={**PROTOCOL, "online": [{"method": "uniform", "budget": 0.3}]}))
    runner = Runner(cfg, Catalog.load(digits_catalog))
    runner.write_run_json()
    runner.run_all()
    return runner, json.loads((run / "verify" / "report.json").read_text())


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
    md = (runner.run_dir / "verify" / "report.md").read_text()
    assert "| craig-0.3 | craig | 0.3 |" in md and "end-to-end speed-up" in md


def test_verify_is_deterministic_per_seed(verified):
    runner, report = verified
    runner.run("verify", force=True)
    again = json.loads((runner.run_dir / "verify" / "report.json").read_text())
    assert [r["accs"] for r in again["rows"]] == [r["accs"] for r in report["rows"]]


def test_plots_render(verified, tmp_path):
    from matplotlib import image

    runner, report = verified
    for name in ("accuracy_vs_budget.png", "accuracy_vs_time.png"):
        img = image.imread(runner.run_dir / "verify" / name)
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
    ctx = Runner(cfg, Catalog.load(digits_catalog)).context("verify", tmp_path / "out")
    assert sorted(curation_cost(ctx, "select/difficulty-0.1")) == ["embed", "score", "select/difficulty-0.1"]
    assert sorted(curation_cost(ctx, "select/craig-0.1")) == ["embed", "select/craig-0.1", "select/dedup-eps0.01"]
    assert sorted(curation_cost(ctx, "select/random-0.1")) == ["select/random-0.1"]


def test_convnet3_on_tiny_images_is_a_one_line_error():
    from stages.verify import check_input_size

    with pytest.raises(CurateError, match="convnet3 needs images of at least 8 x 8 px, got 6 x 6"):
        check_input_size("convnet3", (1, 6, 6))
    check_input_size("mlp", (1, 6, 6))


def test_a_killed_verify_resumes_with_the_same_accuracies(verified, monkeypatch):
    """Trainings finished before a crash are not redone, and the report matches an unbroken run."""
    import stages.verify as verify

    runner, report = verified
    real, calls = verify.train_once, []

    def crash_on_fifth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(verify, "train_once", crash_on_fifth)
    with pytest.raises(RuntimeError, match="killed"):
        runner.run("verify", force=True)
    assert not any(runner.run_dir.glob(".tmp-verify*"))  # nothing half-written in place
    calls.clear()
    monkeypatch.setattr(verify, "train_once", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    runner.run("verify", force=True)
    assert len(calls) == 2 * 4 - 4  # 4 sets x 2 seeds, 4 already done
    again = json.loads((runner.run_dir / "verify" / "report.json").read_text())
    assert [r["accs"] for r in again["rows"]] == [r["accs"] for r in report["rows"]]
    assert json.loads((runner.run_dir / "verify" / "_stage.json").read_text())["metrics"]["resumed_trainings"] == 4
    assert not list((runner.run_dir / ".verify-progress").glob("*.jsonl"))  # done: the journal is gone
