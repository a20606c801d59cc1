"""Image-caption pairs: the fmnist-pairs generator, pair_captions, and the index stage's caption checks."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.catalog import Catalog, DatasetEntry, Fields
from pipeline.errors import CurateError
from pipeline.ingest import (FMNIST_CLASSES, PAIR_ADJECTIVES, PAIR_TEMPLATES, ingest, pair_captions,
                             read_idx_arrays)
from pipeline.shards import ShardWriter, decode_image, decode_label, encode_png, iter_shard
from stages.index import check_sample
from tests.helpers import FMNIST

needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="shared Fashion-MNIST not present")


def caption_to_class(class_names) -> dict[str, int]:
    """Every caption the templates can produce -> the class it names (must be unambiguous)."""
    out = {}
    for c, name in enumerate(class_names):
        for t in PAIR_TEMPLATES:
            for adj in PAIR_ADJECTIVES:
                cap = t.format(name=name, adj=adj)
                assert out.setdefault(cap, c) == c
    return out


@pytest.mark.parametrize("n,noise,seed", [(1000, 0.3, 0), (7, 0.5, 3), (50, 0.0, 1), (333, 0.9, 12)])
def test_pair_captions_flips_exactly_and_names_classes(n, noise, seed):
    labels = np.random.default_rng(100 + n).integers(0, 10, n).astype(np.uint8)
    captions, classes = pair_captions(labels, FMNIST_CLASSES, noise, seed)
    again = pair_captions(labels.copy(), list(FMNIST_CLASSES), noise, seed)
    assert captions == again[0] and np.array_equal(classes, again[1])  # pure: same inputs, same output
    assert len(captions) == n and classes.shape == (n,)

    parse = caption_to_class(FMNIST_CLASSES)
    named = np.array([parse[c] for c in captions])  # KeyError: a caption outside the templates
    np.testing.assert_array_equal(named, classes)
    flipped = classes != labels
    assert flipped.sum() == round(noise * n)
    assert (named[flipped] != labels[flipped]).all() and (named[~flipped] == labels[~flipped]).all()


def test_pair_captions_randomness_is_seeded():
    labels = np.repeat(np.arange(10), 100)
    caps0, cls0 = pair_captions(labels, FMNIST_CLASSES, 0.3, 0)
    caps1, cls1 = pair_captions(labels, FMNIST_CLASSES, 0.3, 1)
    assert caps0 != caps1 and not np.array_equal(cls0 != labels, cls1 != labels)
    # both templates and every adjective are used; the wrong classes cover the other nine
    assert {c.startswith("a photo of a ") for c in caps0} == {True, False}
    assert {a for a in PAIR_ADJECTIVES if any(c.startswith(f"a {a} ") for c in caps0)} == set(PAIR_ADJECTIVES)
    wrong = cls0 != labels
    assert set(((cls0[wrong] - labels[wrong]) % 10).tolist()) == set(range(1, 10))
    with pytest.raises(CurateError, match=r"noise 1.0 is outside \[0, 1\)"):
        pair_captions(labels, FMNIST_CLASSES, 1.0, 0)


@pytest.fixture(scope="module")
def pairs_catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    cat = root / "data_catalog.yaml"
    ingest("fmnist-pairs", root / "fp", "fmnist-pairs", str(FMNIST), catalog=str(cat), train_size=500, seed=4)
    return cat


def read_pairs(cat: Catalog, split: str):
    rows = []
    for shard in cat.shards("fmnist-pairs", split):
        for s in iter_shard(shard):
            image = decode_image(s.members["png"], "png") if split == "train" else None
            rows.append((s.key, image, decode_label(s.members["cls"]),
                         s.members["txt"].decode(), json.loads(s.members["json"])))
    return rows


@needs_fmnist
def test_fmnist_pairs_shards_match_pair_captions(pairs_catalog):
    cat = Catalog.load(pairs_catalog)
    entry = cat.entry("fmnist-pairs")
    assert entry.fields.caption == "txt" and entry.fields.image == ["png"] and entry.fields.label == "cls"
    assert entry.class_names == FMNIST_CLASSES == ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal",
                                                   "shirt", "sneaker", "bag", "ankle boot"]
    assert entry.num_classes == 10

    train = read_pairs(cat, "train")
    labels = np.array([r[2] for r in train])
    captions, classes = pair_captions(labels, FMNIST_CLASSES, 0.3, 4)  # recomputed from the labels alone
    assert [r[3] for r in train] == captions
    assert [r[4] for r in train] == [{"caption_class": int(c)} for c in classes]
    assert (classes != labels).sum() == 150
    # a class-stratified subset: 50 of each class, distinct real train images with their true labels
    assert np.bincount(labels, minlength=10).tolist() == [50] * 10
    ref_x, ref_y = read_idx_arrays(str(FMNIST), "train")
    where = {x.tobytes(): i for i, x in enumerate(ref_x)}
    pos = [where[r[1].tobytes()] for r in train]
    assert len(set(pos)) == 500 and pos == sorted(pos)
    np.testing.assert_array_equal(ref_y[pos], labels)

    test = read_pairs(cat, "test")
    test_y = np.array([r[2] for r in test])
    np.testing.assert_array_equal(test_y, read_idx_arrays(str(FMNIST), "t10k")[1])
    assert [r[3] for r in test] == [f"a photo of a {FMNIST_CLASSES[y]}" for y in test_y]
    assert all(r[4] == {"caption_class": r[2]} for r in test)


@needs_fmnist
def test_fmnist_pairs_index_keeps_every_caption(pairs_catalog, make_runner, tmp_path):
    runner = make_runner(tmp_path / "run", catalog=pairs_catalog, dataset="fmnist-pairs")
    runner.run("index")
    rec = json.loads((tmp_path / "run" / "index" / "_stage.json").read_text())
    assert rec["metrics"]["samples"] == 500 and rec["metrics"]["skipped"] == 0
    table = pq.read_table(tmp_path / "run" / "index" / "index.parquet")
    labels = np.array(table.column("label").to_pylist())
    assert table.column("caption").to_pylist() == pair_captions(labels, FMNIST_CLASSES, 0.3, 4)[0]


@pytest.mark.parametrize("kwargs,message", [
    ({"noise": 1.0}, r"--noise 1.0 is outside \[0, 1\)"),
    ({"noise": -0.1}, r"--noise -0.1 is outside \[0, 1\)"),
    ({"train_size": 9}, r"--train-size 9 is below the number of classes \(10\)"),
    ({"train_size": 60001}, r"--train-size 60001 is more than the 60000 train images"),
    ({"seed": -1}, r"--seed -1 must be >= 0"),
])
@needs_fmnist
def test_fmnist_pairs_range_errors(kwargs, message, tmp_path):
    with pytest.raises(CurateError, match=message) as err:
        ingest("fmnist-pairs", tmp_path / "o", "p", str(FMNIST), catalog=str(tmp_path / "c.yaml"), **kwargs)
    assert "\n" not in str(err.value) and not (tmp_path / "o").exists()


def test_pair_options_refused_for_other_sources(tmp_path):
    with pytest.raises(CurateError, match="ingest digits: --train-size applies to fmnist-pairs only"):
        ingest("digits", tmp_path / "o", "d", catalog=str(tmp_path / "c.yaml"), noise=0.1, train_size=100)
    with pytest.raises(CurateError, match="ingest digits: --noise 1.0 is outside"):
        ingest("digits", tmp_path / "o", "d", catalog=str(tmp_path / "c.yaml"), noise=1.0)
    with pytest.raises(CurateError, match="ingest idx: --noise, --seed apply to digits, fmnist-pairs only"):
        ingest("idx", tmp_path / "o", "d", str(tmp_path), catalog=str(tmp_path / "c.yaml"), noise=0.1, seed=1)
    with pytest.raises(CurateError, match="ingest idx: --seed, --train-size apply to digits, fmnist-pairs only"):
        ingest("idx", tmp_path / "o", "d", str(tmp_path), catalog=str(tmp_path / "c.yaml"), seed=1, train_size=100)
    assert not (tmp_path / "c.yaml").exists()


# ---------------------------------------------------------------- index caption checks
CAPTIONS = {"k0": "a cat", "k1": "a dog", "k2": None, "k3": "a bird", "k4": "  \n\t", "k5": "a cat again"}


@pytest.fixture
def caption_catalog(tmp_path):
    """A hand-made image-caption dataset: k2 has no .txt member, k4 a whitespace-only one."""
    rng = np.random.default_rng(0)
    with ShardWriter(tmp_path / "shards", "train", shard_size=4) as w:
        for i, (key, cap) in enumerate(CAPTIONS.items()):
            members = {"png": encode_png(rng.integers(0, 256, (8, 8), dtype=np.uint8)), "cls": str(i % 3).encode()}
            if cap is not None:
                members["txt"] = cap.encode()
            w.write(key, members)
    cat = Catalog.load(tmp_path / "data_catalog.yaml", missing_ok=True)
    cat.set_entry("pets", DatasetEntry(splits={"train": "shards/train-{000000..000001}.tar"}, num_classes=3,
                                       fields=Fields(image=["png"], caption="txt"), class_names=["cat", "dog", "bird"]))
    return cat.path


IMAGE_TEXT = {"score": {"methods": ["clip"]}}  # a run that reads captions: the index requires them


def test_index_refuses_missing_and_empty_captions(caption_catalog, make_runner, tmp_path):
    runner = make_runner(tmp_path / "raise", catalog=caption_catalog, dataset="pets", **IMAGE_TEXT)
    with pytest.raises(CurateError, match=r"train-000000.tar: sample 'k2' has no caption \(member .txt missing\)") as err:
        runner.run("index")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "raise" / "index").exists()

    fields = Catalog.load(caption_catalog).entry("pets").fields
    k4 = next(s for s in iter_shard(caption_catalog.parent / "shards" / "train-000001.tar") if s.key == "k4")
    with pytest.raises(CurateError, match=r"train-000001.tar: sample 'k4' has an empty caption") as err:
        check_sample(k4, "shards/train-000001.tar", fields, 3, {})
    assert err.value.reason == "empty_caption"


def test_index_skips_and_counts_missing_and_empty_captions(caption_catalog, make_runner, tmp_path, capsys):
    runner = make_runner(tmp_path / "skip", catalog=caption_catalog, dataset="pets", index={"on_error": "skip"},
                         **IMAGE_TEXT)
    runner.run("index")
    rec = json.loads((tmp_path / "skip" / "index" / "_stage.json").read_text())
    m = rec["metrics"]
    assert m["samples"] == 4 and m["skipped"] == 2
    assert m["skipped_by_reason"] == {"empty_caption": 1, "no_caption": 1}
    assert [(s["key"], s["reason"]) for s in m["skipped_samples"]] == [("k2", "no_caption"), ("k4", "empty_caption")]
    table = pq.read_table(tmp_path / "skip" / "index" / "index.parquet")
    assert table.column("key").to_pylist() == ["k0", "k1", "k3", "k5"]
    assert table.column("caption").to_pylist() == ["a cat", "a dog", "a bird", "a cat again"]
    assert table.column("row").to_pylist() == [0, 1, 2, 3]
    assert "index: skipped 2 bad sample(s) of 'pets' (empty_caption: 1, no_caption: 1)" in capsys.readouterr().out


def test_a_run_without_captions_in_use_keeps_caption_less_samples(caption_catalog, make_runner, tmp_path):
    """DESIGN: caption is nullable; only an image-text run requires one per sample."""
    runner = make_runner(tmp_path / "plain", catalog=caption_catalog, dataset="pets")
    assert not runner.cfg.uses_captions
    runner.run("index")
    table = pq.read_table(tmp_path / "plain" / "index" / "index.parquet")
    assert table.column("key").to_pylist() == ["k0", "k1", "k2", "k3", "k4", "k5"]
    assert table.column("caption").to_pylist()[2] is None


def test_an_image_text_run_needs_a_caption_field(digits_catalog, make_runner, tmp_path):
    runner = make_runner(tmp_path / "run", catalog=digits_catalog, **IMAGE_TEXT)
    with pytest.raises(CurateError, match="image-text run .* dataset 'digits' declares no caption field"):
        runner.run("index")
