import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.errors import CurateError
from pipeline.sampling import budget_count, proportional_allocation, stratified_subset
from tests.helpers import fast_config


def test_budget_counts_and_out_of_range():
    assert budget_count(0.1, 1438) == 144
    assert budget_count(1.0, 1438) == 1438
    assert budget_count(7, 1438) == 7
    with pytest.raises(CurateError, match="larger than the dataset"):
        budget_count(1439, 1438)
    for bad in (0, 1.5, 0.0, -3):
        with pytest.raises(CurateError):
            budget_count(bad, 1438)


@pytest.mark.parametrize("budget,msg", [(0, "selects nothing"), (1.5, "out of range"), (0.0, "out of range")])
def test_config_rejects_budget_in_one_line(tmp_path, budget, msg):
    with pytest.raises(CurateError, match=f"config: select.0.budget: budget {budget} .*{msg}"):
        load_config(fast_config(tmp_path, select=[{"method": "random", "budget": budget}]))


def test_budget_larger_than_dataset_is_a_stage_error(make_runner, tmp_path):
    r = make_runner(select=[{"method": "random", "budget": 5000}])
    r.run("index")
    with pytest.raises(CurateError, match=r"select random-5000: budget 5000 is larger than the dataset \(1438 samples\)"):
        r.run("select/random-5000")
    assert not (r.run_dir / "select" / "random-5000").exists()


def test_proportional_allocation_keeps_rare_classes():
    counts = np.array([900, 90, 9, 1, 0])
    alloc = proportional_allocation(counts, 100)
    assert alloc.sum() == 100
    assert alloc[4] == 0 and alloc[3] == 1 and alloc[2] >= 1
    assert abs(alloc[0] - 90) <= 2 and abs(alloc[1] - 9) <= 1


def test_stratified_subset_proportions_and_determinism():
    labels = np.repeat(np.arange(4), [400, 300, 200, 100])
    rows = stratified_subset(labels, 100, seed=3)
    assert len(set(rows.tolist())) == 100
    np.testing.assert_array_equal(np.bincount(labels[rows]), [40, 30, 20, 10])
    np.testing.assert_array_equal(rows, stratified_subset(labels, 100, seed=3))
    assert not np.array_equal(rows, stratified_subset(labels, 100, seed=4))


def test_budget_list_expands_into_named_selections(tmp_path):
    cfg = load_config(fast_config(tmp_path, select=[{"method": "random", "budget": [0.01, 0.1, 50]}]))
    assert [s.sel_name for s in cfg.select] == ["random-0.01", "random-0.1", "random-50"]
    with pytest.raises(CurateError, match="selection names repeat"):
        load_config(fast_config(tmp_path, select=[{"method": "random", "budget": 0.1}] * 2))
    with pytest.raises(CurateError, match="select.0.bogus: Extra inputs"):
        load_config(fast_config(tmp_path, select=[{"method": "random", "budget": 0.1, "bogus": 1}]))


def test_selection_parquet_columns_and_same_seed_same_bytes(make_runner, tmp_path):
    a = make_runner(tmp_path / "a")
    b = make_runner(tmp_path / "b")
    for r in (a, b):
        r.run("index")
        r.run("select/stratified-0.2")
    pa_, pb = (r.run_dir / "select" / "stratified-0.2" / "selection.parquet" for r in (a, b))
    assert pa_.read_bytes() == pb.read_bytes()
    t = pq.read_table(pa_)
    assert t.column_names == ["row", "uid", "key", "shard", "offset", "label", "caption", "source",
                              "selected", "weight", "rank", "method", "budget"]
    assert t.num_rows == 1438
    sel = t.filter(t.column("selected"))
    assert sel.num_rows == 288
    assert sorted(sel.column("rank").to_pylist()) == list(range(288))
    assert t.column("rank").null_count == 1438 - 288
    labels = np.asarray(t.column("label"))
    counts = np.bincount(np.asarray(sel.column("label")), minlength=10)
    np.testing.assert_allclose(counts, np.bincount(labels) * 0.2, atol=1)
    meta = pq.read_schema(pa_).metadata
    assert meta[b"stage"] == b"select" and len(meta[b"fingerprint"]) == 64
    c = make_runner(tmp_path / "c", seed=1)
    c.run("index")
    c.run("select/stratified-0.2")
    assert (c.run_dir / "select" / "stratified-0.2" / "selection.parquet").read_bytes() != pa_.read_bytes()
