"""Hostile shard input: every bad input ends in one line naming the shard and sample (or the
setting), or a counted skip under `index.on_error: skip`; memory stays bounded."""

import io
import json
import os
import re
import struct
import tarfile
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.arrays import load_images
from pipeline.catalog import Catalog, DatasetEntry
from pipeline.config import IndexConfig
from pipeline.data import ManifestDataset
from pipeline.errors import CurateError, ShardError
from pipeline.shards import (MAX_MEMBER_BYTES, ShardWriter, check_safe, decode_image, decode_json, decode_label,
                             encode_png, expand_braces, is_pickle_ext, iter_shard, update_sizes, write_text_atomic)
from stages.index import IndexStage

PNG = encode_png(np.zeros((4, 4), np.uint8))


class Zeros(io.RawIOBase):
    """`size` zero bytes, produced as read: a huge member without allocating it."""

    def __init__(self, size):
        self.left = size

    def readable(self):
        return True

    def readinto(self, buf):
        n = min(len(buf), self.left)
        buf[:n] = bytes(n)
        self.left -= n
        return n


def write_tar(path: Path, members, mode="w") -> Path:
    """A tar of (name, bytes) or (name, size, fileobj) members, in the order given."""
    with tarfile.open(path, mode) as tf:
        for name, *rest in members:
            size, fh = (len(rest[0]), io.BytesIO(rest[0])) if len(rest) == 1 else rest
            info = tarfile.TarInfo(name)
            info.size = size
            tf.addfile(info, fh)
    return path


def shard(cat: Path, i: int) -> Path:
    return cat.parent / "shards" / f"train-{i:06d}.tar"


def edit_shards(cat: Path, edit, shards=(0, 1, 2)) -> None:
    """Rewrite shards with `edit(key, members) -> members` applied to every sample."""
    for i in shards:
        samples = list(iter_shard(shard(cat, i)))
        write_tar(shard(cat, i), [(f"{s.key}.{ext}", data) for s in samples
                                  for ext, data in sorted(edit(s.key, dict(s.members)).items())])


def first_key(cat: Path, i: int = 1) -> str:
    return next(iter_shard(shard(cat, i))).key


def damage_one(cat: Path, edit) -> str:
    """Apply `edit(members) -> members` to the first sample of shard 1; return its key."""
    key = first_key(cat)
    edit_shards(cat, lambda k, m: edit(m) if k == key else m, shards=(1,))
    return key


def set_entry(cat: Path, **changes) -> None:
    c = Catalog.load(cat)
    c.set_entry("digits", DatasetEntry.model_validate({**c.entry("digits").model_dump(), **changes}))


def index_raises(make_runner, cat, run_dir, match, **index):
    with pytest.raises(CurateError, match=match) as err:
        make_runner(run_dir, catalog=cat, index=index).run("index")
    assert "\n" not in str(err.value)
    return str(err.value)


def index_skips(make_runner, cat, run_dir, **index) -> dict:
    make_runner(run_dir, catalog=cat, index={"on_error": "skip", **index}).run("index")
    return json.loads((run_dir / "index" / "_stage.json").read_text())["metrics"]


# 1. pickle members, whatever the compression or case

@pytest.mark.parametrize("ext", ["pickle.gz", "pth.gz", "PKL", "pkl.gz", "gz.pkl", "joblib.xz", "pt"])
def test_pickle_like_extension_refused_under_compression(tmp_path, ext):
    write_tar(tmp_path / "s.tar", [("a.png", PNG), (f"a.{ext}", b"\x80\x04K\x01.")])
    (sample,) = iter_shard(tmp_path / "s.tar")
    with pytest.raises(ShardError, match=rf"s.tar: sample 'a' has pickle member\(s\) \.{ext.lower()};") as err:
        check_safe(sample, "s.tar")
    assert err.value.reason == "pickle_member"
    assert not is_pickle_ext("txt.gz") and not is_pickle_ext("depth.png")


def test_index_refuses_compressed_pickle(catalog_copy, make_runner, tmp_path):
    key = damage_one(catalog_copy, lambda m: {**m, "pkl.gz": b"\x1f\x8b"})
    msg = index_raises(make_runner, catalog_copy, tmp_path / "r", "never unpickles")
    assert key in msg and ".pkl.gz" in msg
    m = index_skips(make_runner, catalog_copy, tmp_path / "s")
    assert m["skipped_by_reason"] == {"pickle_member": 1} and m["samples"] == 1437


def test_manifest_dataset_refuses_compressed_pickle(tmp_path):
    write_tar(tmp_path / "s.tar", [("a.png", PNG), ("a.cls", b"1"), ("a.pth.gz", b"x")])
    manifest(tmp_path, "s.tar")
    with pytest.raises(ShardError, match=r"sample 'a' has pickle member \.pth\.gz"):
        ManifestDataset(tmp_path / "manifest.parquet")[0]


# 2. compact shards carry only the members curate understands

def test_materialize_drops_and_counts_unknown_members(catalog_copy, make_runner, tmp_path):
    edit_shards(catalog_copy, lambda k, m: {**m, "bin": bytes(8), "exe": b"MZ", "json": json.dumps({"src": k}).encode()})

    def materialize(run_dir):
        r = make_runner(run_dir, catalog=catalog_copy)
        for unit in ("index", "select/stratified-0.2", "materialize/stratified-0.2"):
            r.run(unit)
        d = run_dir / "materialize" / "stratified-0.2"
        samples = [s for p in sorted((d / "shards").glob("*.tar")) for s in iter_shard(p)]
        return samples, json.loads((d / "_stage.json").read_text())["metrics"]

    samples, metrics = materialize(tmp_path / "plain")
    assert len(samples) == 288
    assert all(set(s.members) == {"png", "cls", "json"} for s in samples)
    assert all(json.loads(s.members["json"]) == {"src": s.key, "weight": 1.0} for s in samples)
    assert metrics["dropped_members"] == 2 * 288 and metrics["dropped_by_ext"] == {"bin": 288, "exe": 288}

    set_entry(catalog_copy, fields={"image": ["png"], "label": "cls", "extra": ["BIN"]})
    samples, metrics = materialize(tmp_path / "extra")
    assert all(set(s.members) == {"png", "cls", "json", "bin"} for s in samples)
    assert metrics["dropped_members"] == 288 and metrics["dropped_by_ext"] == {"exe": 288}


@pytest.mark.parametrize("extra, message", [(["pkl.gz"], "pickle-like"), ([".."], "empty"), ([""], "empty")])
def test_fields_extra_validated(tmp_path, extra, message):
    p = tmp_path / "c.yaml"
    p.write_text(json.dumps({"datasets": {"d": {"splits": {"train": "a.tar"}, "fields": {"extra": extra}}}}))
    with pytest.raises(CurateError, match=rf"dataset 'd' field 'fields.extra'.*{message}"):
        Catalog.load(p)


# 3. a member over the size cap is never read

def test_huge_member_skipped_unread_in_bounded_memory(tmp_path):
    size = 100 * 2**20  # 100 MB of zeros: about 100 KB gzip'd
    p = write_tar(tmp_path / "s.tar.gz", [("a.png", PNG), ("a.bin", size, Zeros(size)), ("b.png", PNG)], mode="w:gz")
    assert p.stat().st_size < 2**20
    tracemalloc.start()
    try:
        a, b = iter_shard(p, max_member_bytes=2**20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 48 * 2**20  # tarfile's own gzip buffer (~10 MB per 10 KiB of zeros), not the member
    assert a.members == {"png": PNG} and a.oversized == {"bin": size} and b.key == "b"
    with pytest.raises(ShardError, match=r"s.tar.gz: sample 'a': member \.bin is 104,857,600 bytes, over "
                                         r"index.max_member_bytes") as err:
        check_safe(a, str(p))
    assert err.value.reason == "member_too_large"
    check_safe(b, str(p))
    with pytest.raises(ShardError, match="sample 'a': member .bin is 104,857,600 bytes"):
        load_images([str(p)], [0], ["png"], max_member_bytes=2**20)  # other readers refuse it too


def test_index_member_cap_is_a_setting_in_the_fingerprint(catalog_copy, make_runner, tmp_path):
    assert IndexConfig().max_member_bytes == MAX_MEMBER_BYTES == 64 * 2**20
    key = damage_one(catalog_copy, lambda m: {**m, "bin": bytes(5000)})
    msg = index_raises(make_runner, catalog_copy, tmp_path / "r", "member .bin is 5,000 bytes", max_member_bytes=4096)
    assert key in msg
    m = index_skips(make_runner, catalog_copy, tmp_path / "s", max_member_bytes=4096)
    assert m["skipped_by_reason"] == {"member_too_large": 1} and m["skipped_samples"][0]["key"] == key
    cfgs = [IndexStage().config(make_runner(tmp_path / n, index=i).cfg, None)
            for n, i in (("a", {}), ("b", {"max_member_bytes": 4096}), ("c", {"max_pixels": 64}))]
    assert cfgs[0]["max_member_bytes"] == MAX_MEMBER_BYTES and cfgs[0]["max_pixels"] == 2**25
    assert cfgs[1]["max_member_bytes"] == 4096 and cfgs[2]["max_pixels"] == 64


# 4. an image over the pixel cap is never decoded

def big_png(width: int, height: int) -> bytes:
    """A valid palette PNG of width x height zeros, compressed row by row (never held whole)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, row = zlib.compressobj(9), bytes(width + 1)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0))
            + chunk(b"PLTE", bytes(3)) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def npy_header(shape) -> bytes:
    fh = io.BytesIO()
    np.lib.format.write_array_header_1_0(fh, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return fh.getvalue()  # the header alone: the data is never read


def test_pixel_cap_checked_from_the_header_before_decoding():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning must not leak
        with pytest.raises(ShardError, match=r"sample 'z': image is 6000x6000 = 36,000,000 pixels, over "
                                             r"index.max_pixels \(33,554,432\)") as err:
            decode_image(big_png(6000, 6000), "png", where="sample 'z'", max_pixels=2**25)
        assert err.value.reason == "image_too_large"
        png = big_png(12000, 12000)
        assert len(png) < 300_000
        with pytest.raises(ShardError, match=r"image is 12000x12000 = 144,000,000 pixels, over index.max_pixels"):
            decode_image(png, "png", where="sample 'z'", max_pixels=2**25)
        with pytest.raises(ShardError, match=r"12000x12000 = 144,000,000 pixels, over PIL's decompression-bomb"):
            decode_image(png, "png", where="sample 'z'")  # no cap of ours: PIL's limit, as an error
        with pytest.raises(ShardError, match=r"sample 'n': image is 6000x6000 = 36,000,000 pixels, over index"):
            decode_image(npy_header((6000, 6000)), "npy", where="sample 'n'", max_pixels=2**25)
    assert decode_image(big_png(64, 32), "png", max_pixels=64 * 32).shape == (32, 64, 3)


def test_index_refuses_image_over_max_pixels(catalog_copy, make_runner, tmp_path):
    key = damage_one(catalog_copy, lambda m: {**m, "png": encode_png(np.zeros((16, 16), np.uint8))})
    msg = index_raises(make_runner, catalog_copy, tmp_path / "r", r"image is 16x16 = 256 pixels, over "
                                                                  r"index.max_pixels \(100\)", max_pixels=100)
    assert key in msg
    m = index_skips(make_runner, catalog_copy, tmp_path / "s", max_pixels=100)
    assert m["skipped_by_reason"] == {"image_too_large": 1} and m["samples"] == 1437


# 5. labels: strict ASCII digits; bounded and dense without num_classes

@pytest.mark.parametrize("data", [b"1_0", b"+3", b"-1", "３".encode(), b"0x3", b"3 3", b"", b"1" * 40])
def test_label_syntax_is_strict(data):
    with pytest.raises(ShardError, match=r"^shard s: sample 'k': label member is not a non-negative decimal integer"):
        decode_label(data, where="shard s: sample 'k'")


def test_label_whitespace_accepted():
    assert decode_label(b"3\n") == decode_label(b" 3 ") == decode_label(b"\t03\r\n") == 3


def test_index_refuses_underscored_label(catalog_copy, make_runner, tmp_path):
    key = damage_one(catalog_copy, lambda m: {**m, "cls": b"1_0"})
    assert key in index_raises(make_runner, catalog_copy, tmp_path / "r", "label member is not a non-negative")


def test_label_bound_without_num_classes(catalog_copy, make_runner, tmp_path):
    set_entry(catalog_copy, num_classes=None)
    key = damage_one(catalog_copy, lambda m: {**m, "cls": b"1000000000"})
    msg = index_raises(make_runner, catalog_copy, tmp_path / "r", r"label 1000000000 outside \[0, 100000\)")
    assert key in msg and "num_classes" in msg
    m = index_skips(make_runner, catalog_copy, tmp_path / "s")
    assert m["skipped_by_reason"] == {"label_out_of_range": 1} and m["classes"] == list(range(10))


def test_labels_must_be_dense_without_num_classes(catalog_copy, make_runner, tmp_path):
    set_entry(catalog_copy, num_classes=None)
    edit_shards(catalog_copy, lambda k, m: {**m, "cls": b"9"} if m["cls"] in (b"3", b"5") else m)
    index_raises(make_runner, catalog_copy, tmp_path / "r", r"dataset 'digits' has no training sample of class\(es\) "
                                                            r"3, 5 .*set num_classes in the catalog entry")


# 6. the members of a key must be consecutive

def test_non_consecutive_members_raise(tmp_path):
    p = write_tar(tmp_path / "s.tar", [("a.png", PNG), ("b.png", PNG), ("b.cls", b"1"), ("a.cls", b"2")])
    with pytest.raises(ShardError, match=r"s.tar: members of sample 'a' are not consecutive"):
        list(iter_shard(p))


# 7. a .json member that does not parse is refused at index

def test_bad_json_caught_by_decoder():
    for data in (b'{"a": "\xff"}', b"[" * 100_000 + b"]" * 100_000, b"{"):
        with pytest.raises(ShardError, match=r"^sample 'k': json member does not parse") as err:
            decode_json(data, where="sample 'k'")
        assert err.value.reason == "bad_json"


def test_index_refuses_bad_json(catalog_copy, make_runner, tmp_path):
    key = damage_one(catalog_copy, lambda m: {**m, "json": b"[" * 100_000})
    assert key in index_raises(make_runner, catalog_copy, tmp_path / "r", "json member does not parse")
    m = index_skips(make_runner, catalog_copy, tmp_path / "s")
    assert m["skipped_by_reason"] == {"bad_json": 1} and m["skipped_samples"][0]["key"] == key


# 8. sizes.json must be an object of name -> non-negative int

@pytest.mark.parametrize("text", ['[500, 500, 438]', '{"train-000000.tar": "500"}', '{"a": -1}', "{"])
def test_bad_sizes_json_is_one_line(catalog_copy, make_runner, tmp_path, text):
    sizes = catalog_copy.parent / "shards" / "sizes.json"
    sizes.write_text(text)
    index_raises(make_runner, catalog_copy, tmp_path / "r", re.escape(f"{sizes}: expected a JSON object of shard name"))
    with pytest.raises(CurateError, match=re.escape(f"{sizes}: expected a JSON object")):
        update_sizes(sizes.parent, {"x-000000.tar": 1}, prefix="x")


# 9. brace patterns: counted before expansion, each shard once

def test_brace_pattern_counted_before_expansion():
    with pytest.raises(CurateError, match=r"'train-\{0..999999\}\{0..999999\}.tar' names more than 1,000,000 shards"):
        expand_braces("train-{0..999999}{0..999999}.tar")
    with pytest.raises(CurateError, match="names more than 1,000,000 shards"):
        expand_braces("x-{a,{0..999999}}.tar")  # nested


@pytest.mark.parametrize("pattern, repeated", [("{a,{a,b}}.tar", "a.tar"), ("s-{0..2,1}.tar", "s-1.tar"),
                                               ("{x,x}/s.tar", "x/s.tar")])
def test_brace_pattern_naming_a_shard_twice(pattern, repeated):
    with pytest.raises(CurateError, match=rf"brace pattern '{pattern}' names shard '{repeated}' twice"):
        expand_braces(pattern)


def test_list_items_may_be_ranges():
    assert expand_braces("s-{00..02,5}.tar") == ["s-00.tar", "s-01.tar", "s-02.tar", "s-5.tar"]


# 10. the catalog file has no top-level key but datasets

def test_unknown_top_level_catalog_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("datasets:\n  d:\n    splits: {train: a.tar}\ndataset:\n  e: {}\n")
    with pytest.raises(CurateError, match=r"c.yaml: unknown top-level key 'dataset'"):
        Catalog.load(p)


# 11. ManifestDataset: a caption that is not UTF-8

def manifest(d: Path, shard_name: str, key: str = "a") -> None:
    pq.write_table(pa.table({"row": [0], "key": [key], "shard": [shard_name], "label": [1]}), d / "manifest.parquet")


def test_manifest_dataset_caption_not_utf8(tmp_path):
    write_tar(tmp_path / "s.tar", [("a.png", PNG), ("a.cls", b"1"), ("a.txt", b"caf\xe9")])
    manifest(tmp_path, "s.tar")
    with pytest.raises(ShardError, match=r"s.tar: sample 'a': caption is not UTF-8"):
        ManifestDataset(tmp_path / "manifest.parquet")[0]


# 12. temporaries are unique per process and removed on failure

def test_temporary_names_do_not_collide(tmp_path):
    (tmp_path / ".sizes.json.tmp").mkdir()  # what a writer using the fixed name would trip over
    (tmp_path / ".x-000000.tar.tmp").mkdir()
    write_text_atomic(tmp_path / "sizes.json", "{}\n")
    with ShardWriter(tmp_path, "x") as w:
        w.write("a", {"cls": b"1"})
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"x-000000.tar": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".sizes.json.tmp", ".x-000000.tar.tmp", "sizes.json",
                                                          "x-000000.tar"]


def test_failed_write_leaves_no_temporary(tmp_path, monkeypatch):
    names = []

    def fail(src, dst):
        names.append(Path(src).name)
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(tmp_path / "sizes.json", "{}\n")
    w = ShardWriter(tmp_path, "x")
    w.write("a", {"cls": b"1"})
    with pytest.raises(OSError, match="disk full"):
        w.close()
    assert list(tmp_path.iterdir()) == []
    assert all(f".{os.getpid()}-" in n for n in names) and len(set(names)) == 2
