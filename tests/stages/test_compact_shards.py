"""materialize writes shards readers can share out (>= 8 for >= 64 samples), says where they are
(brace URL in the manifest's metadata and shards/url.txt) and registers the subset in the catalog."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.catalog import Catalog
from pipeline.manifest import parquet_metadata
from pipeline.shards import MIN_SHARD_SAMPLES, ShardWriter, expand_braces, plan_shards, tar_bytes
from tests.helpers import REPO, files_under


def test_plan_shards_balanced_bounded_and_at_least_eight():
    for n in range(0, 1500):
        for shard_size, min_shards in ((10000, 8), (50, 8), (7, 1), (100, 16)):
            counts = plan_shards(n, shard_size, min_shards)
            assert sum(counts) == n and all(c <= shard_size for c in counts)
            assert not counts or max(counts) - min(counts) <= 1
            if n >= MIN_SHARD_SAMPLES * min_shards:
                assert len(counts) >= min_shards
            if len(counts) > -(-n // shard_size):  # shards added for the minimum keep 8 samples each
                assert min(counts) >= MIN_SHARD_SAMPLES
    assert plan_shards(64, 10000, 8) == [8] * 8 and plan_shards(63, 10000, 8) == [9] * 7
    assert plan_shards(10, 10000, 8) == [10] and plan_shards(0, 10, 8) == []


def test_writer_keeps_planned_boundaries_and_byte_target(tmp_path):
    member = os.urandom(1000)  # one 1,000-byte member: 1,536 bytes in the tar; 3 fit in 5,000
    assert tar_bytes("k00", {"bin": member}) == 1536
    with ShardWriter(tmp_path, "s", shard_bytes=5000, counts=[10, 10]) as w:
        placed = [w.write(f"k{i:02d}", {"bin": member}) for i in range(20)]
    assert list(w.sizes.values()) == [3, 3, 3, 1, 3, 3, 3, 1]  # the planned split at 10 holds
    assert placed[10] == ("s-000004.tar", 0)
    for name in w.sizes:
        with tarfile.open(tmp_path / name) as tf:
            assert sum(512 + -(-m.size // 512) * 512 for m in tf.getmembers()) <= 5000
    assert json.loads((tmp_path / "sizes.json").read_text()) == w.sizes
    with ShardWriter(tmp_path / "big", "s", shard_bytes=100) as w:  # one sample over the target: a shard of its own
        w.write("a", {"bin": member})
        w.write("b", {"bin": member})
    assert w.sizes == {"s-000000.tar": 1, "s-000001.tar": 1}


@pytest.fixture
def materialized(catalog_copy, make_runner, tmp_path):
    """stratified-0.2 (288 samples) and a 70-sample random subset of digits, on a private catalog."""
    r = make_runner(tmp_path / "run", catalog=catalog_copy,
                    select=[{"method": "stratified", "budget": 0.2}, {"method": "random", "budget": 70}])
    for u in ("index", "select/stratified-0.2", "materialize/stratified-0.2", "select/random-70", "materialize/random-70"):
        r.run(u)
    return r


def test_shards_urls_and_sizes(materialized):
    for sel, n, shards in (("stratified-0.2", 288, 8), ("random-70", 70, 8)):
        d = materialized.run_dir / "materialize" / sel
        m = pq.read_table(d / "manifest.parquet")
        url = parquet_metadata(d / "manifest.parquet")["shards_url"]
        assert url == f"shards/subset-{{000000..{shards - 1:06d}}}.tar"
        assert (d / "shards" / "url.txt").read_text() == url.removeprefix("shards/") + "\n"
        assert [str(d / p) for p in expand_braces(url)] == sorted(str(p) for p in (d / "shards").glob("*.tar"))
        sizes = json.loads((d / "shards" / "sizes.json").read_text())  # still a pure basename -> count map
        assert sorted(sizes) == [f"subset-{i:06d}.tar" for i in range(shards)] and sum(sizes.values()) == n
        assert max(sizes.values()) - min(sizes.values()) <= 1
        assert sorted(Counter(m.column("shard").to_pylist()).items()) == sorted((f"shards/{k}", v) for k, v in sizes.items())


def test_rerun_is_byte_identical(materialized):
    d = materialized.run_dir / "materialize" / "stratified-0.2"
    before = files_under(d)
    materialized.run("materialize/stratified-0.2", force=True)
    assert files_under(d) == before


def read_with_webdataset(url: str, workers: int, epochs: int) -> list[list[str]]:
    """The keys a DataLoader over wds.WebDataset(url) yields, per epoch."""
    import webdataset as wds
    from torch.utils.data import DataLoader

    ds = wds.WebDataset(url, shardshuffle=False).decode("pil").to_tuple("__key__", "png", "cls", "json")
    loader = DataLoader(ds, batch_size=None, num_workers=workers)
    out = []
    for _ in range(epochs):
        keys = []
        for key, image, label, meta in loader:
            assert image.size == (8, 8) and isinstance(label, int) and meta["weight"] == 1.0
            keys.append(key)
        out.append(keys)
    return out


def test_webdataset_with_four_workers_reads_every_sample_once_per_epoch(materialized):
    for sel in ("stratified-0.2", "random-70"):
        d = materialized.run_dir / "materialize" / sel
        keys = pq.read_table(d / "manifest.parquet").column("key").to_pylist()
        url = str(d / parquet_metadata(d / "manifest.parquet")["shards_url"])
        # in a fresh interpreter: DataLoader workers forked from a test process that ran a Dask flow die
        code = (f"import json; from tests.stages.test_compact_shards import read_with_webdataset as read; "
                f"print(json.dumps(read({url!r}, workers=4, epochs=2)))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert done.returncode == 0, done.stderr[-3000:]
        epochs = json.loads(done.stdout.splitlines()[-1])
        assert len(epochs) == 2
        for epoch in epochs:
            assert Counter(epoch) == Counter(keys)


def test_registered_subset_is_a_dataset_curate_can_curate_again(materialized, make_runner, tmp_path):
    cat = Catalog.load(materialized.catalog.path)
    name = "digits/run/stratified-0.2"
    entry, digits = cat.entry(name), cat.entry("digits")
    d = materialized.run_dir / "materialize" / "stratified-0.2"
    assert [os.path.realpath(p) for p in cat.shards(name, "train")] == sorted(str(p) for p in (d / "shards").glob("*.tar"))
    assert entry.splits["test"] == digits.splits["test"]
    assert (entry.fields, entry.num_classes, entry.class_names) == (digits.fields, digits.num_classes, digits.class_names)
    assert (cat.path.parent / entry.curated_from).resolve() == d / "manifest.parquet"
    assert cat.entry("digits/run/random-70").splits["train"].endswith("shards/subset-{000000..000007}.tar")
    # a run on the subset: its index is the manifest's samples, and it materializes a subset of its own
    again = make_runner(tmp_path / "again", catalog=cat.path, dataset=name, select={"method": "stratified", "budget": 0.5})
    for u in ("index", "select/stratified-0.5", "materialize/stratified-0.5"):
        again.run(u)
    index = pq.read_table(tmp_path / "again" / "index" / "index.parquet")
    m = pq.read_table(d / "manifest.parquet")
    assert index.column("key").to_pylist() == m.column("key").to_pylist()
    assert index.column("label").to_pylist() == m.column("label").to_pylist()
    assert index.column("uid").to_pylist()[0] == f"{name}/{m.column('key')[0].as_py()}"
    sub = Catalog.load(cat.path).entry(f"{name}/again/stratified-0.5")
    assert sum(json.loads((tmp_path / "again" / "materialize" / "stratified-0.5" / "shards" / "sizes.json")
                          .read_text()).values()) == 144
    assert sub.curated_from.endswith("again/materialize/stratified-0.5/manifest.parquet")


def test_an_entry_curate_did_not_write_is_never_replaced(catalog_copy, make_runner, tmp_path, capsys):
    raw = yaml.safe_load(catalog_copy.read_text())
    raw["datasets"]["digits/run/random-0.1"] = raw["datasets"]["digits"]  # the user's own entry, same name
    catalog_copy.write_text(yaml.safe_dump(raw))
    before = catalog_copy.read_bytes()
    r = make_runner(tmp_path / "run", catalog=catalog_copy, select={"method": "random", "budget": 0.1})
    for u in ("index", "select/random-0.1", "materialize/random-0.1"):
        r.run(u)
    assert catalog_copy.read_bytes() == before
    assert "catalog entry 'digits/run/random-0.1' exists and was not written by curate" in capsys.readouterr().out
    rec = json.loads((tmp_path / "run" / "materialize" / "random-0.1" / "_stage.json").read_text())
    assert rec["metrics"]["catalog_entry"] is None and r.state("materialize/random-0.1") == "done"


def test_register_entry_false_leaves_the_catalog_alone(catalog_copy, make_runner, tmp_path):
    before = catalog_copy.read_bytes()
    r = make_runner(tmp_path / "run", catalog=catalog_copy, select={"method": "random", "budget": 0.1},
                    materialize={"register_entry": False})
    for u in ("index", "select/random-0.1", "materialize/random-0.1"):
        r.run(u)
    assert catalog_copy.read_bytes() == before


def test_read_only_catalog_does_not_fail_materialize(catalog_copy, make_runner, tmp_path):
    """A shared catalog the user cannot write: the subset is materialized, not registered. Where the
    tests run as root (who may write anything), materialize runs in a user namespace without
    capabilities (`unshare --user`), where file permissions hold for it too."""
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("unshare") is None or subprocess.run(["unshare", "--user", "true"]).returncode != 0:
            pytest.skip("running as root without user namespaces: a read-only catalog cannot be made")
        prefix = ["unshare", "--user"]
    r = make_runner(tmp_path / "run", catalog=catalog_copy, select={"method": "random", "budget": 0.1})
    for u in ("index", "select/random-0.1"):
        r.run(u)
    before = catalog_copy.read_bytes()
    folder = catalog_copy.parent
    catalog_copy.chmod(0o444)
    folder.chmod(0o555)
    try:
        command = [*prefix, sys.executable, "-m", "pipeline.cli", "stage", "materialize", "--run", str(r.run_dir)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "CURATE_CATALOG": str(catalog_copy)})
    finally:
        folder.chmod(0o755)
        catalog_copy.chmod(0o644)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"catalog {catalog_copy} cannot be updated" in done.stdout and "the subset is not registered" in done.stdout
    assert catalog_copy.read_bytes() == before and not list(folder.glob(".lock-*"))
    rec = json.loads((r.run_dir / "materialize" / "random-0.1" / "_stage.json").read_text())
    assert rec["metrics"]["catalog_entry"] is None and rec["metrics"]["samples"] == 144
