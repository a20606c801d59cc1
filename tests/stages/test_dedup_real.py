"""dedup through the select stage on real images with planted near-copies: digits and
Fashion-MNIST written as IDX files, ingested into shards, indexed and deduplicated by the Runner."""

from __future__ import annotations

import struct

import numpy as np
import pyarrow.parquet as pq
import pytest

import pipeline.stage as stage_mod
import stages.kernels.coresets.dedup as dedup_kernel
from pipeline.catalog import Catalog
from pipeline.config import load_config
from pipeline.errors import CurateError
from pipeline.ingest import ingest
from pipeline.runner import Runner
from stages.kernels.coresets.dedup import semdedup_walk
from tests.helpers import fast_config
from tests.stages.kernels.test_content_dedup import (EPS, KINDS, digits_images, fmnist_images, plant_copies,
                                                     planted_rates)

DEFAULT = f"dedup-eps{EPS}"  # the name of `{method: dedup}`


def write_idx(folder, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """MNIST's IDX format (big-endian header, then raw uint8), as `curate ingest idx` reads it."""
    folder.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    (folder / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, h, w) + images.tobytes())
    (folder / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + labels.astype(np.uint8).tobytes())


def planted_catalog(root, name: str, images: np.ndarray, labels: np.ndarray):
    """A catalog entry `name` whose train split is `images` + 200 planted copies (in shards of 1,000)."""
    pool, pool_labels, pairs, kinds = plant_copies(images, labels)
    write_idx(root / "src", "train", pool, pool_labels)
    write_idx(root / "src", "t10k", images[:50], labels[:50])
    cat = root / "data_catalog.yaml"
    ingest("idx", root / "shards", name, src=str(root / "src"), catalog=str(cat), shard_size=1000)
    return cat, pairs, kinds


@pytest.fixture(scope="module")
def digits_planted(tmp_path_factory):
    x = digits_images()
    from sklearn.datasets import load_digits

    return planted_catalog(tmp_path_factory.mktemp("digits-planted"), "digits-planted", x, load_digits().target)


@pytest.fixture(scope="module")
def fmnist_planted(tmp_path_factory):
    x, y = fmnist_images(3000)
    return planted_catalog(tmp_path_factory.mktemp("fmnist-planted"), "fmnist-planted", x, y)


def runner_for(cat, name: str, run_dir, select, **sections) -> Runner:
    cfg = load_config(fast_config(run_dir, dataset=name, select=select, **sections))
    r = Runner(cfg, Catalog.load(cat))
    r.write_run_json()
    return r


def selection(runner: Runner, sel: str) -> dict:
    t = pq.read_table(runner.run_dir / "select" / sel / "selection.parquet")
    rows = t.column("row").to_numpy()
    assert (rows == np.arange(len(rows))).all()
    # ingest names the i-th sample train_<i>: index row -> position in the planted pool
    pos = np.array([int(k.split("_")[1]) for k in t.column("key").to_pylist()])
    assert (pos == rows).all()
    return {"selected": t.column("selected").to_numpy(zero_copy_only=False),
            "dup_of": t.column("dup_of").fill_null(-1).to_numpy(),
            "dup_similarity": t.column("dup_similarity").to_numpy(zero_copy_only=False),
            "types": {f.name: str(f.type) for f in t.schema}}


def run_default(planted, name: str, run_dir) -> Runner:
    r = runner_for(planted[0], name, run_dir, [{"method": "dedup"}])
    r.run("index")
    r.run(f"select/{DEFAULT}")
    return r


@pytest.fixture(scope="module")
def digits_run(digits_planted, tmp_path_factory):
    return run_default(digits_planted, "digits-planted", tmp_path_factory.mktemp("digits-run") / "run")


@pytest.fixture(scope="module")
def fmnist_run(fmnist_planted, tmp_path_factory):
    return run_default(fmnist_planted, "fmnist-planted", tmp_path_factory.mktemp("fmnist-run") / "run")


@pytest.mark.parametrize("data", ["digits", "fmnist"])
def test_default_dedup_removes_the_planted_copies_and_keeps_the_rest(data, request):
    _, pairs, kinds = request.getfixturevalue(f"{data}_planted")
    r = request.getfixturevalue(f"{data}_run")
    assert r.upstream(f"select/{DEFAULT}") == ["index"]  # content features: no embed unit needed
    assert not (r.run_dir / "embed").exists()  # no proxy was trained
    t = selection(r, DEFAULT)
    removed = ~t["selected"]
    found, others, caught = planted_rates(removed, t["dup_of"], pairs)
    assert found >= 0.95, found
    assert others < 0.02, others
    for kind in KINDS:
        assert caught[kinds == kind].mean() >= 0.95, kind
    assert t["types"]["dup_of"] == "int64" and t["types"]["dup_similarity"] == "float"
    gone = np.flatnonzero(removed)
    assert t["selected"][t["dup_of"][gone]].all()  # each removed image names a kept twin
    assert (t["dup_similarity"][gone] > 1 - EPS).all()
    assert (t["dup_of"][~removed] == -1).all() and np.isnan(t["dup_similarity"][~removed]).all()  # null where kept
    m = r.record(f"select/{DEFAULT}")["metrics"]
    assert m["removed"] == len(gone) and m["features"] == "content" and m["threshold"] == 1 - EPS
    assert set(m["nn_similarity"]) == {"q50", "q90", "q99", "q99.9"}


def test_reading_is_block_by_block_and_blocks_do_not_change_the_selection(digits_planted, digits_run, tmp_path,
                                                                         monkeypatch):
    """The stage never holds more than one block of pixels; small blocks give the same selection."""
    sizes = []
    real = stage_mod.StageContext.images

    def images(self, table, image_size):
        sizes.append(table.num_rows)
        return real(self, table, image_size)

    monkeypatch.setattr(stage_mod.StageContext, "images", images)
    monkeypatch.setattr(dedup_kernel, "BLOCK", 300)
    small = run_default(digits_planted, "digits-planted", tmp_path / "small")
    assert max(sizes) == 300 and sum(sizes) == 2 * 1997  # two passes: features, then the shifted views
    a, b = (selection(r, DEFAULT) for r in (digits_run, small))
    np.testing.assert_array_equal(a["selected"], b["selected"])
    np.testing.assert_array_equal(a["dup_of"], b["dup_of"])
    np.testing.assert_allclose(a["dup_similarity"], b["dup_similarity"], atol=1e-6)  # other matmul shapes


def test_a_dedup_that_would_remove_too_much_stops_in_one_line(digits_planted, tmp_path):
    cat, _, _ = digits_planted
    r = runner_for(cat, "digits-planted", tmp_path / "run", [{"method": "dedup", "eps": 0.1},
                                                           {"method": "dedup", "eps": 0.1, "max_removed": 1.0,
                                                            "name": "loose"}])
    r.run("index")
    with pytest.raises(CurateError) as err:
        r.run("select/dedup-eps0.1")
    msg = str(err.value)
    assert "\n" not in msg
    share = float(msg.split("remove ")[1].split("%")[0])
    assert share > 20
    assert msg.startswith(f"select dedup-eps0.1: dedup would remove {share}% of its pool (")
    assert "more than max_removed 0.2; nearest-neighbour similarity (content features): q50 0." in msg
    assert not (r.run_dir / "select" / "dedup-eps0.1").exists()
    r.run("select/loose")  # the config raised the limit: the same walk goes through
    t = selection(r, "loose")
    assert round(100 * (~t["selected"]).mean(), 1) == share


def test_embedding_features_still_work(digits_planted, tmp_path):
    """features: embeddings runs SemDeDup on the embed unit's output, with twins recorded."""
    cat, pairs, kinds = digits_planted
    spec = {"method": "dedup", "features": "embeddings", "eps": 0.001}
    r = runner_for(cat, "digits-planted", tmp_path / "run", [spec], embed={"epochs": 1})
    sel = "dedup-embeddings-eps0.001"
    assert r.upstream(f"select/{sel}") == ["index", "embed"]
    for unit in ("index", "embed", f"select/{sel}"):
        r.run(unit)
    t = selection(r, sel)
    removed = ~t["selected"]
    noise = np.isin(kinds, ["noise1", "noise3"])  # grey-level copies are near-identical to the proxy too
    found, others, caught = planted_rates(removed, t["dup_of"], pairs)
    assert caught[noise].mean() >= 0.9 and others < 0.02
    emb = np.load(r.run_dir / "embed" / "embeddings.npy")
    expect = semdedup_walk(emb, eps=0.001, seed=0, center=True)
    np.testing.assert_array_equal(t["selected"], expect.keep)
    np.testing.assert_array_equal(t["dup_of"], expect.dup_of)
    m = r.record(f"select/{sel}")["metrics"]
    assert m["features"] == "embeddings" and m["removed"] == removed.sum()


def test_dedup_settings_follow_the_features(tmp_path):
    cfg = load_config(fast_config(tmp_path, select=[{"method": "dedup"}, {"method": "dedup", "features": "embeddings"}]))
    assert [s.sel_name for s in cfg.select] == [DEFAULT, "dedup-embeddings-eps0.05"]
    assert [s.needs for s in cfg.select] == [frozenset(), frozenset({"embeddings"})]
    again = load_config(cfg.model_dump(mode="json"))  # a saved run.json repeats every default: it loads again
    assert again.select == cfg.select
    with pytest.raises(CurateError, match="select.0: clusters applies to features: embeddings, not content"):
        load_config(fast_config(tmp_path, select=[{"method": "dedup", "clusters": 4}]))
    with pytest.raises(CurateError, match=r"select.0.max_removed: Input should be less than or equal to 1"):
        load_config(fast_config(tmp_path, select=[{"method": "dedup", "max_removed": 2}]))
