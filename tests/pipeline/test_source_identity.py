"""Ingest keeps who a sample is: keys from relative paths, and `source` from shard to every manifest."""

import json
import random

import pyarrow.parquet as pq
import pytest

from pipeline.errors import CurateError
from pipeline.ingest import MAX_KEY_CHARS, ingest, path_keys
from pipeline.shards import iter_shard
from tests.helpers import files_under, rewrite_shard

CLASSES = ("circle", "square", "triangle")
# names that stress the key rule: a space and an underscore that map to one key, the same stem
# with two extensions, dots inside a name, non-ASCII letters
TRICKY = ("a b.png", "a_b.png", "x.png", "x.jpg", "scan.v2.png", "café.png")


def write_imagefolder(root, n_train=20, n_test=3):
    """Real PNG/JPEG files (sklearn digits, upscaled) in train/<class>/ and test/<class>/."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * 16).clip(0, 255).astype(np.uint8).repeat(4, 1).repeat(4, 2)  # 32x32
    names, i = [], 0
    for split, n in (("train", n_train), ("test", n_test)):
        for cls in CLASSES:
            folder = root / split / cls
            folder.mkdir(parents=True)
            files = [f"{cls}_{j:03d}.png" for j in range(n)] + (list(TRICKY) if split == "train" else [])
            for name in files:
                img = Image.fromarray(images[i])
                img.save(folder / name, format="JPEG" if name.endswith(".jpg") else "PNG")
                names.append(f"{split}/{cls}/{name}")
                i += 1
    return names


@pytest.fixture
def shapes(tmp_path):
    """An imagefolder ingested into a catalog of its own; (catalog path, relative file names)."""
    names = write_imagefolder(tmp_path / "src")
    cat = tmp_path / "cat" / "data_catalog.yaml"
    ingest("imagefolder", tmp_path / "cat" / "shapes", "shapes", str(tmp_path / "src"), catalog=str(cat))
    return cat, names


def test_path_keys_safe_unique_and_independent_of_order():
    paths = ["train/square/square_005.jpg", "train/sq uare/a.b.png", "train/a b.png", "train/a_b.png",
             "train/x.png", "train/x.jpg", "train/ünï.png", "train/" + "long" * 60 + ".png"]
    keys = path_keys(paths)
    assert keys["train/square/square_005.jpg"] == "train_square_square_005"
    assert keys["train/sq uare/a.b.png"] == "train_sq_uare_a_b"
    for clash in (("train/a b.png", "train/a_b.png"), ("train/x.png", "train/x.jpg")):
        k1, k2 = (keys[p] for p in clash)
        assert k1 != k2 and k1.split("-")[0] == k2.split("-")[0] and len(k1.split("-")[1]) == 12
    assert len(keys["train/" + "long" * 60 + ".png"]) == MAX_KEY_CHARS
    assert len(set(keys.values())) == len(paths)
    assert all("." not in k and "/" not in k and k.isascii() for k in keys.values())
    for seed in range(5):  # any listing order gives the same keys
        shuffled = paths[:]
        random.Random(seed).shuffle(shuffled)
        assert path_keys(shuffled) == keys
    # a file literally named like another's hashed key: hashed in turn, so still unique
    hashed = keys["train/a b.png"]
    more = path_keys(paths + [f"train/{hashed.removeprefix('train_')}.png"])
    assert len(set(more.values())) == len(paths) + 1 and more[f"train/{hashed.removeprefix('train_')}.png"] != hashed


def test_imagefolder_shards_keep_path_keys_and_sources(shapes, tmp_path):
    cat, names = shapes
    samples = [s for shard in sorted((cat.parent / "shapes").glob("*.tar")) for s in iter_shard(shard)]
    sources = [json.loads(s.members["json"])["source"] for s in samples]
    assert sorted(sources) == sorted(names)
    keys = path_keys(names)
    assert {s.key: src for s, src in zip(samples, sources)} == {keys[n]: n for n in names}
    assert keys["train/square/square_005.png"] == "train_square_square_005"
    # a second ingest of the same folder writes the same bytes: keys are stable across reruns
    ingest("imagefolder", tmp_path / "again", "again", str(tmp_path / "src"), catalog=str(tmp_path / "c2.yaml"))
    assert files_under(tmp_path / "again") == files_under(cat.parent / "shapes")


def test_source_travels_from_index_to_selection_and_manifest(shapes, make_runner, tmp_path):
    cat, names = shapes
    r = make_runner(tmp_path / "run", catalog=cat, dataset="shapes", select={"method": "random", "budget": 0.5})
    for unit in ("index", "select/random-0.5", "materialize/random-0.5"):
        r.run(unit)
    index = pq.read_table(r.run_dir / "index" / "index.parquet")
    train = sorted(n for n in names if n.startswith("train/"))
    assert index.schema.field("source").type == "string"
    assert sorted(index.column("source").to_pylist()) == train
    keys = path_keys(names)
    assert all(keys[s] == k for k, s in zip(index.column("key").to_pylist(), index.column("source").to_pylist()))

    sel = pq.read_table(r.run_dir / "select" / "random-0.5" / "selection.parquet")
    assert sel.column("source").to_pylist() == index.column("source").to_pylist()
    chosen = sel.filter(sel.column("selected"))
    m = pq.read_table(r.run_dir / "materialize" / "random-0.5" / "manifest.parquet")
    assert m.column_names[:8] == ["row", "uid", "key", "shard", "offset", "label", "caption", "source"]
    assert m.num_rows == chosen.num_rows == round(0.5 * len(train))
    assert sorted(zip(m.column("key").to_pylist(), m.column("source").to_pylist())) == \
        sorted(zip(chosen.column("key").to_pylist(), chosen.column("source").to_pylist()))
    # the compact shards' json keeps the source beside the weight
    d = r.run_dir / "materialize" / "random-0.5"
    meta = {s.key: json.loads(s.members["json"]) for p in sorted((d / "shards").glob("*.tar")) for s in iter_shard(p)}
    assert {k: v["source"] for k, v in meta.items()} == dict(zip(m.column("key").to_pylist(), m.column("source").to_pylist()))
    assert all(v["weight"] == 1.0 for v in meta.values())


def test_sources_without_files_are_null(make_runner, tmp_path):
    r = make_runner(tmp_path / "run", select={"method": "random", "budget": 0.1}, materialize={"register_entry": False})
    for unit in ("index", "select/random-0.1", "materialize/random-0.1"):
        r.run(unit)
    index = pq.read_table(r.run_dir / "index" / "index.parquet")
    m = pq.read_table(r.run_dir / "materialize" / "random-0.1" / "manifest.parquet")
    assert index.column("source").null_count == index.num_rows == 1438
    assert m.column("source").null_count == m.num_rows == 144


def test_index_errors_name_the_original_file(shapes, make_runner, tmp_path):
    cat, _ = shapes
    key = path_keys(["train/circle/a b.png", "train/circle/a_b.png"])["train/circle/a b.png"]
    shard = next(p for p in (cat.parent / "shapes").glob("train-*.tar") if any(s.key == key for s in iter_shard(p)))
    rewrite_shard(shard, lambda k, m: (k, {**m, "png": b"not a png"} if k == key else m))
    with pytest.raises(CurateError, match=rf"sample '{key}' \(file train/circle/a b.png\): image member .png "
                                          "does not decode") as err:
        make_runner(tmp_path / "raise", catalog=cat, dataset="shapes").run("index")
    assert "\n" not in str(err.value)
    skipper = make_runner(tmp_path / "skip", catalog=cat, dataset="shapes", index={"on_error": "skip"})
    skipper.run("index")
    rec = json.loads((tmp_path / "skip" / "index" / "_stage.json").read_text())
    (skipped,) = rec["metrics"]["skipped_samples"]
    assert (skipped["key"], skipped["source"], skipped["reason"]) == (key, "train/circle/a b.png", "image_undecodable")
    index = pq.read_table(tmp_path / "skip" / "index" / "index.parquet")
    assert "train/circle/a b.png" not in index.column("source").to_pylist()
    assert "train/circle/a_b.png" in index.column("source").to_pylist()
