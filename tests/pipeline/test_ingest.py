import json
import pickle

import numpy as np
import pytest

from pipeline.catalog import Catalog
from pipeline.errors import CurateError
from pipeline.ingest import ingest, read_idx_arrays
from pipeline.shards import decode_image, decode_label, iter_shard
from tests.helpers import FMNIST


def read_split(cat: Catalog, name: str, split: str):
    images, labels, captions, keys = [], [], [], []
    for shard in cat.shards(name, split):
        for s in iter_shard(shard):
            ext = next(e for e in s.members if e in ("png", "jpg"))
            images.append(decode_image(s.members[ext], ext))
            labels.append(decode_label(s.members["cls"]))
            captions.append(s.members["txt"].decode() if "txt" in s.members else None)
            keys.append(s.key)
    return images, np.array(labels), captions, keys


@pytest.mark.skipif(not FMNIST.exists(), reason="shared Fashion-MNIST not present")
def test_fashion_mnist_ingest_equals_idx_files(tmp_path):
    cat_path = tmp_path / "data_catalog.yaml"
    ingest("idx", tmp_path / "fm", "fashion-mnist", str(FMNIST), catalog=str(cat_path))
    cat = Catalog.load(cat_path)
    assert cat.entry("fashion-mnist").splits == {"train": "fm/train-{000000..000005}.tar", "test": "fm/test-000000.tar"}
    sizes = json.loads((tmp_path / "fm" / "sizes.json").read_text())
    assert sum(v for k, v in sizes.items() if k.startswith("train")) == 60000
    assert sizes["test-000000.tar"] == 10000
    for split, idx_name in (("train", "train"), ("test", "t10k")):
        images, labels, _, keys = read_split(cat, "fashion-mnist", split)
        ref_x, ref_y = read_idx_arrays(str(FMNIST), idx_name)
        assert len(images) == len(ref_x) and len(set(keys)) == len(keys)
        np.testing.assert_array_equal(np.stack(images), ref_x)
        np.testing.assert_array_equal(labels, ref_y)


def write_cifar_batch(path, n, seed, fine=False):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 100 if fine else 10, n).tolist()
    with open(path, "wb") as fh:
        pickle.dump({b"data": data, b"fine_labels" if fine else b"labels": labels, b"batch_label": b"x"}, fh)
    return data, labels


def test_cifar10_batches(tmp_path):
    src = tmp_path / "cifar"
    src.mkdir()
    d1, l1 = write_cifar_batch(src / "data_batch_1", 7, 0)
    d2, l2 = write_cifar_batch(src / "data_batch_2", 5, 1)
    dt, lt = write_cifar_batch(src / "test_batch", 4, 2)
    entry = ingest("cifar", tmp_path / "out", "c10", str(src), catalog=str(tmp_path / "cat.yaml"))
    assert entry.num_classes == 10
    images, labels, _, _ = read_split(Catalog.load(tmp_path / "cat.yaml"), "c10", "train")
    ref = np.concatenate([d1, d2]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(np.stack(images), ref)
    assert labels.tolist() == l1 + l2


def test_cifar100_and_malicious_pickle_refused(tmp_path):
    src = tmp_path / "c100"
    src.mkdir()
    write_cifar_batch(src / "train", 3, 0, fine=True)
    write_cifar_batch(src / "test", 2, 1, fine=True)
    assert ingest("cifar", tmp_path / "o", "c100", str(src), catalog=str(tmp_path / "c.yaml")).num_classes == 100

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    write_cifar_batch(bad / "test_batch", 2, 1)
    with pytest.raises(CurateError, match="data_batch_1: refused or unreadable \(global io.open is not allowed\)"):
        ingest("cifar", tmp_path / "o2", "bad", str(bad), catalog=str(tmp_path / "c.yaml"))
    assert not marker.exists()


def test_imagefolder_with_captions_and_test_split(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    expected = {}
    for split, n in (("train", 3), ("test", 1)):
        for cls in ("cat", "dog"):
            d = tmp_path / "src" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 256, (5 + i, 6, 3), dtype=np.uint8)
                Image.fromarray(img).save(d / f"im{i}.png")
                if i == 0:
                    (d / f"im{i}.txt").write_text(f"a {cls}\n")
                expected[(split, cls, i)] = img
    entry = ingest("imagefolder", tmp_path / "out", "pets", str(tmp_path / "src"), catalog=str(tmp_path / "c.yaml"))
    assert entry.class_names == ["cat", "dog"] and entry.num_classes == 2 and entry.fields.caption == "txt"
    # the images without a caption are written, and counted in one line
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if "no caption" in line] == [
        "ingest imagefolder: 4 of 8 images have no caption (missing or empty .txt; train 4, test 0); "
        "an image-text run refuses the training ones at the index stage (index.on_error: raise) or skips them (skip)"]
    images, labels, captions, _ = read_split(Catalog.load(tmp_path / "c.yaml"), "pets", "train")
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert captions == ["a cat", None, None, "a dog", None, None]
    np.testing.assert_array_equal(images[4], expected[("train", "dog", 1)])
    assert len(read_split(Catalog.load(tmp_path / "c.yaml"), "pets", "test")[0]) == 2


def test_imagefolder_corrupt_image_named(tmp_path):
    d = tmp_path / "src" / "train" / "a"
    d.mkdir(parents=True)
    (d / "broken.png").write_bytes(b"\x89PNG nope")
    with pytest.raises(CurateError, match="broken.png: image member .png does not decode"):
        ingest("imagefolder", tmp_path / "out", "x", str(tmp_path / "src"), catalog=str(tmp_path / "c.yaml"))


def test_catalog_errors_name_entry_and_field(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("datasets:\n  good:\n    splits: {train: a.tar}\n  bad:\n    splits: {train: a.tar}\n    num_classes: zero\n")
    with pytest.raises(CurateError, match="dataset 'bad' field 'num_classes': Input should be a valid integer"):
        Catalog.load(p)
    p.write_text("datasets:\n  bad:\n    splits: {test: a.tar}\n")
    with pytest.raises(CurateError, match="dataset 'bad' field 'splits': .*needs a 'train' split"):
        Catalog.load(p)
    p.write_text("datasets:\n  x:\n    splits: {train: a.tar}\n    colour: red\n")
    with pytest.raises(CurateError, match="dataset 'x' field 'colour': Extra inputs"):
        Catalog.load(p)
