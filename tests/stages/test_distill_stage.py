"""The `experts` and `distill/<name>` stages on digits (8 x 8, so DSA kinds flip_crop), and verify's
distilled and random-same-IPC rows.

Small settings: 2 experts x 3 epochs (width 16), mtt ipc 1 (10 iterations, 3 student steps),
dm ipc 2 (10 iterations). One thread: on 8 x 8 images threads only add overhead on a shared CPU.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pipeline.catalog import Catalog
from pipeline.config import load_config
from pipeline.data import ManifestDataset
from pipeline.errors import CurateError
from pipeline.manifest import parquet_metadata, read_parquet
from pipeline.runner import Runner
from pipeline.data import read_distilled
from stages.distill import CACHE

from tests.helpers import fast_config, files_under, rerecord

EXPERTS = {"count": 2, "epochs": 3, "lr": 0.05, "batch_size": 128, "width": 16, "dsa": "flip_crop"}
MTT = {"method": "mtt", "ipc": 1, "iterations": 10, "syn_steps": 3, "expert_epochs": 2, "max_start_epoch": 1,
       "lr_img": 10.0, "lr_lr": 1e-5, "lr_init": 0.01, "dsa": "flip_crop"}
DM = {"method": "dm", "ipc": 2, "iterations": 10, "width": 16, "batch_real": 64, "dsa": "flip_crop"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def runner_for(run_dir, catalog, specs=(MTT, DM), experts=EXPERTS, **sections) -> Runner:
    sections.setdefault("verify", {"epochs": 2, "seeds": 1, "batch_size": 32, "lr": 0.05, "width": 16,
                                   "ipc_epochs": 3})
    cfg = load_config(fast_config(run_dir, select=[], distill={"specs": list(specs), "experts": experts}, **sections))
    r = Runner(cfg, Catalog.load(catalog))
    r.write_run_json()
    return r


@pytest.fixture(scope="module")
def run(digits_catalog, tmp_path_factory) -> Runner:
    r = runner_for(tmp_path_factory.mktemp("distill") / "run", digits_catalog)
    for unit in r.units():
        if unit != "embed":  # no selection here: nothing reads the embeddings
            r.run(unit)
    return r


def test_units_and_order(run):
    units = run.units()
    assert units.index("experts") < units.index("distill/mtt-ipc1") < units.index("verify/mtt-ipc1")
    assert "distill/dm-ipc2" in units
    assert run.units("experts") == ["experts"]
    assert "experts" in run.inputs("distill/mtt-ipc1") and "experts" not in run.inputs("distill/dm-ipc2")
    assert "distill/mtt-ipc1" in run.inputs("verify/mtt-ipc1") and "distill/dm-ipc2" in run.inputs("verify/dm-ipc2")
    assert run.upstream("verify/random-ipc2") == ["index"]
    # ipc_epochs concern the distilled sets and their baselines alone
    assert "ipc_epochs" in run.unit_config("verify/random-ipc1") and "ipc_epochs" not in run.unit_config("verify/full")
    # no mtt spec: no experts unit
    cfg = load_config(fast_config(run.run_dir, distill=[DM]))
    assert Runner(cfg, run.catalog).units("experts") == []


def test_outputs_read_back(run):
    d = run.run_dir
    assert sorted(p.name for p in (d / "experts").glob("expert_*.safetensors")) == \
        ["expert_0.safetensors", "expert_1.safetensors"]
    assert not (d / CACHE).exists()  # the resume cache is gone once the experts are in place
    for name, ipc, method in (("mtt-ipc1", 1, "mtt"), ("dm-ipc2", 2, "dm")):
        u = d / "distill" / name
        x, y = read_distilled(u)
        assert x.dtype == np.float32 and x.shape == (10 * ipc, 1, 8, 8) and np.isfinite(x).all()
        assert np.array_equal(y, np.repeat(np.arange(10), ipc))
        m = read_parquet(u / "manifest.parquet")
        assert m.column_names == ["row", "uid", "key", "shard", "offset", "label", "caption", "weight", "method", "ipc"]
        assert m.column("row").null_count == m.num_rows
        assert set(m.column("method").to_pylist()) == {method}
        assert set(m.column("weight").to_pylist()) == {1.0}
        assert m.column("shard").to_pylist()[0] == "shards/distill-000000.tar"
        assert parquet_metadata(u / "manifest.parquet")["stage"] == "distill"
        assert json.loads((u / "shards" / "sizes.json").read_text()) == {"distill-000000.tar": 10 * ipc}
        # the package's Dataset reads the same set (float images, row -1: synthetic samples)
        ds = ManifestDataset(u / "manifest.parquet")
        items = [ds[i] for i in range(len(ds))]
        assert np.array_equal(np.stack([it["image"].numpy() for it in items]), x)
        assert [it["label"] for it in items] == y.tolist() and {it["row"] for it in items} == {-1}
        lr = json.loads((u / "lr.json").read_text())["lr"]
        if method == "mtt":
            assert lr > 0
        else:
            assert lr is None
    # the images moved away from their real start (dm) and stay in a sane range
    x, _ = read_distilled(d / "distill" / "dm-ipc2")
    assert np.abs(x).max() < 10


def test_rerun_is_byte_identical(run):
    units = ["experts", "distill/mtt-ipc1", "distill/dm-ipc2"]
    before = {u: files_under(run.run_dir / u) for u in units}
    for u in units:
        assert run.run(u)["status"] == "cached"
        assert run.run(u, force=True)["status"] == "computed"
        assert files_under(run.run_dir / u) == before[u], u


def test_verify_rows(run):
    report = json.loads((run.run_dir / "report" / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["mtt-ipc1"]["kind"] == "distilled" and rows["mtt-ipc1"]["samples"] == 10
    assert rows["mtt-ipc1"]["budget"] == 1 and rows["mtt-ipc1"]["augment"] == "dsa:flip_crop"
    assert rows["mtt-ipc1"]["learned_lr"] == json.loads((run.run_dir / "distill/mtt-ipc1/lr.json").read_text())["lr"]
    assert set(rows["mtt-ipc1"]["curation"]) == {"distill/mtt-ipc1", "experts"}
    assert rows["dm-ipc2"]["kind"] == "distilled" and rows["dm-ipc2"]["samples"] == 20
    assert rows["dm-ipc2"]["learned_lr"] is None and set(rows["dm-ipc2"]["curation"]) == {"distill/dm-ipc2"}
    for k in (1, 2):
        r = rows[f"random-ipc{k}"]
        assert r["kind"] == "random" and r["samples"] == 10 * k and r["budget"] == k
    # tiny sets train verify.ipc_epochs (3 here), real sets verify.epochs (2)
    assert {r["name"]: r["epochs"] for r in report["rows"]} == {
        "full": 2, "mtt-ipc1": 3, "dm-ipc2": 3, "random-ipc1": 3, "random-ipc2": 3}
    assert "distilled and random-ipc sets 3 epochs" in (run.run_dir / "report" / "report.md").read_text()


def test_per_class_subset_is_per_class():
    from stages.verify import per_class_subset

    labels = np.repeat(np.arange(5), 20)
    a, b = per_class_subset(labels, 3, 0), per_class_subset(labels, 3, 1)
    assert np.array_equal(np.bincount(labels[a]), [3] * 5) and not np.array_equal(a, b)


def test_experts_resume_after_a_kill(run, digits_catalog, tmp_path, monkeypatch):
    """A kill after expert 0 keeps it in the cache; the rerun trains expert 1 only, and the
    result is the bytes of an unbroken run."""
    from stages.learn.distill import experts as ex

    real, calls = ex.train_expert, []

    def killed(*a, **k):
        calls.append(k["seed"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    r = runner_for(tmp_path / "run", digits_catalog)
    r.run("index")
    monkeypatch.setattr(ex, "train_expert", killed)
    with pytest.raises(KeyboardInterrupt):
        r.run("experts")
    assert not (r.run_dir / "experts").exists()
    assert len(list((r.run_dir / CACHE).glob("*/expert_0.safetensors"))) == 1
    calls.clear()
    monkeypatch.setattr(ex, "train_expert", lambda *a, **k: (calls.append(k["seed"]), real(*a, **k))[1])
    r.run("experts")
    assert calls == [1]
    assert files_under(r.run_dir / "experts") == files_under(run.run_dir / "experts")


def test_ipc_larger_than_a_class(digits_catalog, tmp_path):
    r = runner_for(tmp_path / "run", digits_catalog, specs=[{**DM, "ipc": 10000}])
    r.run("index")
    with pytest.raises(CurateError) as exc:
        r.run("distill/dm-ipc10000")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("distill dm-ipc10000: ") and "class" in msg and "10000" in msg
    assert not (r.run_dir / "distill" / "dm-ipc10000").exists()


@pytest.mark.parametrize("distill, words", [
    ({"specs": [{**MTT, "max_start_epoch": 2, "expert_epochs": 2}], "experts": EXPERTS},
     ["max_start_epoch 2", "expert_epochs 2", "experts.epochs 3"]),
    ([{**DM, "ipc": 0}], ["ipc"]),
    ([{**DM, "iterations": 0}], ["iterations"]),
    ([{**DM, "dsa": "flip_warp"}], ["warp"]),
    ([DM, {**MTT, "name": "dm-ipc2"}], ["dm-ipc2", "repeat"]),
    ([{**DM, "name": "random-0.1"}], ["random-0.1", "selection"]),
    ([{**MTT, "zca": True}, {**MTT, "ipc": 2}], ["zca"]),
    ([{**DM, "lr_lr": 1.0}], ["lr_lr"]),
])
def test_config_errors(tmp_path, distill, words):
    with pytest.raises(CurateError) as exc:
        load_config(fast_config(tmp_path / "run", select=[{"method": "random", "budget": 0.1}], distill=distill))
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("config: ")
    for w in words:
        assert w in msg, msg


def test_ipc_list_expands(tmp_path):
    cfg = load_config(fast_config(tmp_path, distill=[{**DM, "ipc": [1, 10]}, {**MTT, "name": "m"}]))
    assert [s.sel_name for s in cfg.distill.specs] == ["dm-ipc1", "dm-ipc10", "m"]
    assert load_config(fast_config(tmp_path)).distill.specs == []


def test_foreign_expert_buffer_is_one_line(run, digits_catalog, tmp_path):
    """Experts of another width in the unit (a stale or foreign buffer): one line naming the mismatch."""
    other = runner_for(tmp_path / "other", digits_catalog, specs=[MTT], experts={**EXPERTS, "width": 8})
    other.run("index")
    other.run("experts")
    copy = tmp_path / "copy"
    shutil.copytree(run.run_dir, copy)
    for p in (other.run_dir / "experts").glob("expert_*.safetensors"):
        shutil.copyfile(p, copy / "experts" / p.name)
    rerecord(copy / "experts")  # as if the unit held that buffer
    r = Runner(run.cfg, run.catalog, copy)
    with pytest.raises(CurateError) as exc:
        r.run("distill/mtt-ipc1", force=True)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("distill mtt-ipc1: ") and "width 8, not 16" in msg


def test_zca_run_distils_in_the_whitened_space_and_maps_back(run, digits_catalog, tmp_path):
    """zca: true trains the experts on whitened images (tagged so, and refused as plain ones)
    and writes the synthetic images back in the normalised pixel space verify trains in."""
    from stages.learn.distill.experts import load_buffer

    r = runner_for(tmp_path / "run", digits_catalog, specs=[{**MTT, "zca": True}])
    for u in ("index", "experts", "distill/mtt-ipc1"):
        r.run(u)
    x, y = read_distilled(r.run_dir / "distill" / "mtt-ipc1")
    assert x.shape == (10, 1, 8, 8) and np.isfinite(x).all()
    # both start from the same real images (the inverse map itself: test_distill_augment)
    plain, _ = read_distilled(run.run_dir / "distill" / "mtt-ipc1")
    assert not np.allclose(x, plain)
    meta = json.loads((r.run_dir / "experts" / "_stage.json").read_text())["config"]
    assert meta["zca"] is True
    with pytest.raises(ValueError, match="zca|dataset"):  # whitened experts do not pass for plain ones
        load_buffer(r.run_dir / "experts", arch="convnet3", in_shape=(1, 8, 8), num_classes=10, width=16,
                    dataset=json.loads((run.run_dir / "experts" / "_stage.json").read_text())["inputs"]["index"])
