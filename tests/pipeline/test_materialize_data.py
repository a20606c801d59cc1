"""materialize output read back: compact shards, manifest, Dataset and weighted sampler."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.arrays import load_images
from pipeline.data import ManifestDataset, weighted_sampler


@pytest.fixture
def materialized(make_runner, tmp_path):
    r = make_runner(tmp_path / "run", materialize={"shard_size": 50})
    for u in ("index", "select/stratified-0.2", "materialize/stratified-0.2"):
        r.run(u)
    return r, r.run_dir / "materialize" / "stratified-0.2"


def test_manifest_matches_selection_and_original_pixels(materialized):
    r, d = materialized
    m = pq.read_table(d / "manifest.parquet")
    sel = pq.read_table(r.run_dir / "select" / "stratified-0.2" / "selection.parquet")
    chosen = sel.filter(sel.column("selected"))
    assert m.num_rows == 288
    assert m.column("row").to_pylist() == sorted(chosen.column("row").to_pylist())
    assert m.column_names[:7] == ["row", "uid", "key", "shard", "offset", "label", "caption"]
    assert {"weight", "rank", "source_shard", "source_offset"} <= set(m.column_names)
    sizes = json.loads((d / "shards" / "sizes.json").read_text())
    assert len(sizes) == 8 and set(sizes.values()) == {36}  # at least 8 balanced shards, each <= 50
    entry = r.catalog.entry("digits")
    new = load_images([str(d / s) for s in m.column("shard").to_pylist()], m.column("offset").to_pylist(), entry.fields.image)
    old = load_images(m.column("source_shard").to_pylist(), m.column("source_offset").to_pylist(), entry.fields.image)
    np.testing.assert_array_equal(new, old)


def test_dataset_random_access_weights_and_keys(materialized):
    r, d = materialized
    ds = ManifestDataset(d / "manifest.parquet")
    m = pq.read_table(d / "manifest.parquet")
    assert len(ds) == 288
    item = ds[137]
    assert item["key"] == m.column("key")[137].as_py() and item["row"] == m.column("row")[137].as_py()
    assert item["image"].shape == (1, 8, 8) and item["weight"] == 1.0
    src = load_images([m.column("source_shard")[137].as_py()], [m.column("source_offset")[137].as_py()], ["png"])
    np.testing.assert_array_equal(item["image"].numpy(), src[0])
    import torch.utils.data as tud

    batch = next(iter(tud.DataLoader(ds, batch_size=16, num_workers=0)))
    assert batch["image"].shape == (16, 1, 8, 8)


def test_weight_json_member_and_webdataset_compat(materialized):
    wds = pytest.importorskip("webdataset")
    _, d = materialized
    got = list(wds.WebDataset(str(d / "shards" / "subset-000000.tar"), shardshuffle=False))
    assert len(got) == 36
    assert json.loads(got[0]["json"]) == {"weight": 1.0}
    keys = pq.read_table(d / "manifest.parquet").column("key").to_pylist()[:36]
    assert [g["__key__"] for g in got] == keys


def test_weighted_sampler_follows_weights(tmp_path):
    import pyarrow as pa

    t = pa.table({"row": [0, 1, 2], "uid": ["a", "b", "c"], "key": ["a", "b", "c"], "shard": ["x.tar"] * 3,
                  "offset": pa.array([0, 1, 2], pa.int32()), "label": pa.array([0, 1, 0], pa.int32()),
                  "caption": pa.array([None] * 3, pa.string()), "weight": pa.array([1.0, 0.0, 3.0], pa.float32())})
    pq.write_table(t, tmp_path / "m.parquet")
    draws = list(weighted_sampler(tmp_path / "m.parquet", num_samples=4000, seed=0))
    counts = np.bincount(draws, minlength=3)
    assert counts[1] == 0 and abs(counts[2] / 4000 - 0.75) < 0.03
    assert list(weighted_sampler(tmp_path / "m.parquet", num_samples=50, seed=1)) == \
        list(weighted_sampler(tmp_path / "m.parquet", num_samples=50, seed=1))
    t = t.set_column(7, "weight", pa.array([0.0, 0.0, 0.0], pa.float32()))
    pq.write_table(t, tmp_path / "z.parquet")
    with pytest.raises(ValueError, match="not all zero"):
        weighted_sampler(tmp_path / "z.parquet")
