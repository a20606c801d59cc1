"""index on damaged shards: one-line errors naming the sample, or counted skips; never half-written."""

import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.errors import CurateError
from tests.helpers import rewrite_shard
from pipeline.shards import iter_shard


def shard(cat: Path, i: int) -> Path:
    return cat.parent / "shards" / f"train-{i:06d}.tar"


def first_key(cat, i):
    return next(iter_shard(shard(cat, i))).key


def damage_first_of_shard1(cat, edit):
    """Apply `edit(members) -> members` to the first sample of shard 1; return its key."""
    key = first_key(cat, 1)
    rewrite_shard(shard(cat, 1), lambda k, m: (k, edit(m) if k == key else m))
    return key


def damage_image(cat):
    return damage_first_of_shard1(cat, lambda m: {**m, "png": b"garbage"}), "does not decode"


def damage_label(cat):
    return damage_first_of_shard1(cat, lambda m: {e: v for e, v in m.items() if e != "cls"}), "missing label member .cls"


def damage_duplicate(cat):
    dup = first_key(cat, 0)
    key = first_key(cat, 1)
    rewrite_shard(shard(cat, 1), lambda k, m: (dup if k == key else k, m))
    return dup, "key repeated"


def damage_pickle(cat):
    return damage_first_of_shard1(cat, lambda m: {**m, "pyd": b"\x80\x04K\x01."}), "never unpickles"


def damage_label_range(cat):
    return damage_first_of_shard1(cat, lambda m: {**m, "cls": b"12"}), r"label 12 outside \[0, 10\)"


@pytest.mark.parametrize("damage", [damage_image, damage_label, damage_duplicate, damage_pickle, damage_label_range])
def test_bad_sample_raises_one_line_or_is_counted(damage, catalog_copy, make_runner, tmp_path):
    key, message = damage(catalog_copy)
    runner = make_runner(tmp_path / "raise", catalog=catalog_copy)
    with pytest.raises(CurateError, match=message) as err:
        runner.run("index")
    assert key in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "raise" / "index").exists()
    assert not list((tmp_path / "raise").glob(".tmp-*"))

    skipper = make_runner(tmp_path / "skip", catalog=catalog_copy, index={"on_error": "skip"})
    skipper.run("index")
    rec = json.loads((tmp_path / "skip" / "index" / "_stage.json").read_text())
    table = pq.read_table(tmp_path / "skip" / "index" / "index.parquet")
    assert rec["metrics"]["skipped"] == 1
    assert rec["metrics"]["skipped_samples"][0]["key"] == key
    assert table.num_rows == 1437  # 1,438 digits training samples less the bad one
    assert table.column("row").to_pylist() == list(range(1437))


def test_truncated_shard(catalog_copy, make_runner, tmp_path):
    p = shard(catalog_copy, 1)
    with tarfile.open(p) as tf:
        m = tf.getmembers()[41]
    p.write_bytes(p.read_bytes()[: m.offset_data + 10])
    with pytest.raises(CurateError, match="train-000001.tar: truncated or corrupt tar"):
        make_runner(tmp_path / "raise", catalog=catalog_copy).run("index")
    assert not (tmp_path / "raise" / "index").exists()
    skipper = make_runner(tmp_path / "skip", catalog=catalog_copy, index={"on_error": "skip"})
    skipper.run("index")
    rec = json.loads((tmp_path / "skip" / "index" / "_stage.json").read_text())
    assert rec["metrics"]["skipped"] == 1 and rec["metrics"]["skipped_samples"][0]["key"] is None
    # shard 1's samples before the cut are kept: 20 complete samples (2 members each) precede member 41
    assert rec["metrics"]["samples"] == 1438 - 500 + 20


def test_truncation_at_member_boundary_caught_by_sizes_json(catalog_copy, make_runner, tmp_path):
    p = shard(catalog_copy, 0)
    with tarfile.open(p) as tf:
        m = tf.getmembers()[100]
    p.write_bytes(p.read_bytes()[: m.offset])  # a valid-looking shorter tar
    with pytest.raises(CurateError, match="50 samples, sizes.json says 500"):
        make_runner(tmp_path / "r", catalog=catalog_copy).run("index")


def test_catalog_entry_pointing_nowhere(catalog_copy, make_runner, tmp_path):
    shard(catalog_copy, 2).unlink()
    with pytest.raises(CurateError, match="dataset 'digits' split 'train' points nowhere: 1 of 3 shard"):
        make_runner(tmp_path / "r", catalog=catalog_copy).run("index")


def test_worker_processes_give_the_same_index_byte_for_byte(catalog_copy, make_runner, tmp_path):
    # damage spread over the shards: in shard 1 a key of shard 0 (only the main process can see
    # that) before an undecodable image (a worker sees that); in shard 2 a label out of range,
    # then the shard cut short
    k0 = first_key(catalog_copy, 0)
    keys1 = [s.key for s in iter_shard(shard(catalog_copy, 1))]
    rewrite_shard(shard(catalog_copy, 1), lambda k, m: (k0 if k == keys1[3] else k,
                                                        {**m, "png": b"garbage"} if k == keys1[7] else m))
    keys2 = [s.key for s in iter_shard(shard(catalog_copy, 2))]
    rewrite_shard(shard(catalog_copy, 2), lambda k, m: (k, {**m, "cls": b"12"} if k == keys2[1] else m))
    p = shard(catalog_copy, 2)
    with tarfile.open(p) as tf:
        m = tf.getmembers()[61]
    p.write_bytes(p.read_bytes()[: m.offset_data + 10])

    errors = {}
    for workers in (1, 2):
        with pytest.raises(CurateError) as err:
            make_runner(tmp_path / f"raise{workers}", catalog=catalog_copy, index={"workers": workers}).run("index")
        errors[workers] = str(err.value)
    assert errors[1] == errors[2] and "key repeated" in errors[1] and k0 in errors[1]  # the first bad sample

    out = {}
    for workers in (1, 2):
        run = tmp_path / f"skip{workers}"
        make_runner(run, catalog=catalog_copy, index={"on_error": "skip", "workers": workers}).run("index")
        metrics = json.loads((run / "index" / "_stage.json").read_text())["metrics"]
        out[workers] = ((run / "index" / "index.parquet").read_bytes(),
                        {k: metrics[k] for k in ("samples", "skipped", "skipped_by_reason", "skipped_samples")})
    assert out[1] == out[2]
    m = out[1][1]
    assert m["skipped_by_reason"] == {"image_undecodable": 1, "label_out_of_range": 1, "repeated_key": 1,
                                      "truncated_shard": 1}
    assert [(s["key"], s["reason"]) for s in m["skipped_samples"]] == [
        (k0, "repeated_key"), (keys1[7], "image_undecodable"), (keys2[1], "label_out_of_range"), (None, "truncated_shard")]


def test_workers_over_many_shards_keep_every_sample_in_order(tmp_path, make_runner):
    # shards of 100 samples: more than the 2 x workers shards in flight at once
    from pipeline.ingest import ingest

    cat = tmp_path / "many" / "data_catalog.yaml"
    ingest("digits", tmp_path / "many" / "shards", "digits", catalog=str(cat), shard_size=100)
    shards = len(list((tmp_path / "many" / "shards").glob("train-*.tar")))
    assert shards > 2 * 3
    out = {}
    for workers in (1, 2, 3):
        run = tmp_path / f"w{workers}"
        make_runner(run, catalog=cat, index={"workers": workers}).run("index")
        out[workers] = (run / "index" / "index.parquet").read_bytes()
        table = pq.read_table(run / "index" / "index.parquet", columns=["row", "shard", "offset"])
        assert table.column("row").to_pylist() == list(range(table.num_rows))
        assert len(set(table.column("shard").to_pylist())) == shards
    assert out[1] == out[2] == out[3]
