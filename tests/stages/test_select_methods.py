"""select stage with the coreset methods, through the runner on digits with planted structure."""

import io
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.catalog import Catalog
from pipeline.config import load_config
from pipeline.errors import CurateError
from pipeline.runner import Runner
from stages.kernels.coresets.gradmatch import matching_error
from stages.kernels.coresets.features import last_layer
from tests.helpers import fast_config, rerecord
from tests.helpers import rewrite_shard

SELECT = [
    {"method": "dedup", "eps": 0.0005},
    {"method": "craig", "budget": 0.1},
    {"method": "craig", "budget": 0.1, "pool": "dedup-eps0.0005", "name": "craig-after-dedup", "optimizer": "lazy"},
    {"method": "gradmatch", "budget": 0.1},
    {"method": "gradmatch", "budget": 0.1, "per": "batch", "batch_size": 8, "name": "gradmatch-pb"},
    {"method": "difficulty", "budget": 0.3, "score": "el2n", "keep": "hard", "class_balanced": True},
    {"method": "difficulty", "budget": 0.1, "score": "knn_shapley", "keep": "auto", "name": "knn-auto"},
    {"method": "ccs", "budget": 0.2, "score": "forgetting"},
    {"method": "random", "budget": 0.1},
]


@pytest.fixture(scope="module")
def planted(tmp_path_factory, digits_catalog):
    """Digits where 40 training images are replaced by near-copies (+-1 grey level) of others."""
    root = tmp_path_factory.mktemp("dups")
    shutil.copytree(digits_catalog.parent, root / "cat")
    rng = np.random.default_rng(0)
    shards = sorted((root / "cat" / "shards").glob("train-*.tar"))
    from pipeline.shards import iter_shard

    first = {s.key: s.members["png"] for s in iter_shard(shards[0])}
    keys = sorted(first)
    originals = keys[:40]
    copies = {}
    for i, k in enumerate(keys[200:240]):
        img = np.asarray(Image.open(io.BytesIO(first[originals[i]]))).astype(np.int16)
        img = np.clip(img + rng.integers(-1, 2, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="png")
        copies[k] = (buf.getvalue(), originals[i])

    def edit(key, members):
        if key in copies:
            members["png"] = copies[key][0]
            members["cls"] = next(s.members["cls"] for s in iter_shard(shards[0]) if s.key == copies[key][1])
        return key, members

    rewrite_shard(shards[0], edit)
    return root / "cat" / "data_catalog.yaml", {k: v[1] for k, v in copies.items()}


@pytest.fixture(scope="module")
def selected(planted, tmp_path_factory):
    cat, _ = planted
    cfg = load_config(fast_config(tmp_path_factory.mktemp("run") / "r", embed={"epochs": 4},
                                  score={"methods": ["el2n", "forgetting", "knn_shapley"]}, select=SELECT))
    runner = Runner(cfg, Catalog.load(cat))
    runner.write_run_json()
    for unit in runner.units("index") + runner.units("embed") + runner.units("score") + runner.units("select"):
        runner.run(unit)
    return runner


def table(runner, sel, name="selection.parquet", stage="select") -> dict:
    """Columns of a parquet output as numpy arrays (rank: -1 where null)."""
    t = pq.read_table(runner.run_dir / stage / sel / name if sel else runner.run_dir / stage / name)
    out = {c: np.asarray(t.column(c).to_pylist()) for c in t.column_names if c != "rank"}
    if "rank" in t.column_names:
        out["rank"] = t.column("rank").fill_null(-1).to_numpy()
    return out


def test_dedup_finds_planted_copies_and_composes(selected, planted):
    _, copies = planted
    t = table(selected, "dedup-eps0.0005")
    by_key = dict(zip(t["key"], t["selected"]))
    pairs = [(c, o) for c, o in copies.items() if c in by_key and o in by_key]  # some went to validation
    assert len(pairs) > 25
    pairs_hit = sum(not (by_key[c] and by_key[o]) for c, o in pairs)
    assert pairs_hit >= 0.95 * len(pairs)
    others = [k for k in by_key if k not in copies and k not in set(copies.values())]
    assert sum(not by_key[k] for k in others) < 0.01 * len(others)
    rec = selected.record("select/dedup-eps0.0005")["metrics"]
    assert rec["removed"] == (~t["selected"]).sum() and sum(rec["removed_per_class"].values()) == rec["removed"]
    after = table(selected, "craig-after-dedup")
    assert after["selected"].sum() == round(0.1 * len(t["selected"]))  # budget counts against the whole pool
    assert not (after["selected"] & ~t["selected"]).any()  # only rows dedup kept
    kept = t["selected"]  # craig's weights stand for the class as the pool has it
    np.testing.assert_allclose(np.bincount(after["label"][after["selected"]], weights=after["weight"][after["selected"]]),
                               np.bincount(t["label"][kept]), rtol=1e-4)


def test_craig_weights_cover_each_class(selected):
    t = table(selected, "craig-0.1")
    sel = t["selected"]
    assert sel.sum() == round(0.1 * len(sel))
    per_class = np.bincount(t["label"][sel], weights=t["weight"][sel])
    np.testing.assert_allclose(per_class, np.bincount(t["label"]), rtol=1e-4)
    assert sorted(t["rank"][sel]) == list(range(sel.sum()))
    assert selected.record("select/craig-0.1")["metrics"]["graph"] == {str(c): "dense" for c in range(10)}


def test_gradmatch_matches_the_gradient_better_than_random_and_craig(selected):
    emb = selected.run_dir / "embed"
    grads = last_layer(np.load(emb / "grads.npy"), np.load(emb / "embeddings.npy")).dense().numpy()

    def err(sel):
        t = table(selected, sel)
        rows = np.flatnonzero(t["selected"])
        return matching_error(grads, rows, t["weight"][rows])

    rng = np.random.default_rng(0)
    k = round(0.1 * len(grads))
    random_err = np.mean([matching_error(grads, rng.choice(len(grads), k, replace=False), np.ones(k)) for _ in range(20)])
    assert err("gradmatch-0.1") < 0.5 * random_err
    assert err("gradmatch-0.1") < err("craig-0.1")
    assert err("gradmatch-pb") < random_err
    m = selected.record("select/gradmatch-0.1")["metrics"]
    assert m["matching_error"] == pytest.approx(err("gradmatch-0.1"), rel=1e-4)


def test_difficulty_and_ccs_follow_their_scores(selected):
    scores = table(selected, None, "scores.parquet", "score")
    t = table(selected, "difficulty-0.3")
    sel = t["selected"]
    el2n = scores["score_el2n"]
    for c in range(10):  # class-balanced: the top 30% of each class by EL2N
        cls = t["label"] == c
        assert el2n[cls & sel].min() >= el2n[cls & ~sel].max()
    knn = table(selected, "knn-auto")  # 10% < auto_threshold: keep easy = the most valuable by knn_shapley
    v = scores["score_knn_shapley"]
    assert v[knn["selected"]].min() >= v[~knn["selected"]].max()
    assert selected.record("select/knn-auto")["metrics"]["kept"] == "easy"
    ccs = table(selected, "ccs-0.2")
    f = scores["score_forgetting"]
    hardest = np.argsort(-f, kind="stable")[: int(0.1 * len(f))]
    assert ccs["selected"].sum() == round(0.2 * len(f)) and not ccs["selected"][hardest].any()


def test_same_seed_same_bytes(selected, planted, tmp_path):
    cat, _ = planted
    cfg = load_config(fast_config(tmp_path / "again", embed={"epochs": 4},
                                  score={"methods": ["el2n", "forgetting", "knn_shapley"]}, select=SELECT))
    again = Runner(cfg, Catalog.load(cat))
    again.write_run_json()
    for unit in ("index", "embed", "score", "select/dedup-eps0.0005", "select/craig-after-dedup",
                 "select/craig-0.1", "select/gradmatch-0.1"):
        assert again.run(unit)["status"] == "computed"
    for sel in ("dedup-eps0.0005", "craig-after-dedup", "craig-0.1", "gradmatch-0.1"):
        a, b = (r.run_dir / "select" / sel / "selection.parquet" for r in (selected, again))
        assert a.read_bytes() == b.read_bytes(), sel


def test_bad_settings_are_one_line_errors(make_runner, tmp_path):
    with pytest.raises(CurateError, match=r"select.0.score: 'el2n' is not computed; add it to score.methods"):
        load_config(fast_config(tmp_path, select=[{"method": "difficulty", "budget": 0.1, "score": "el2n"}]))
    with pytest.raises(CurateError, match=r"select.0.pool: 'nope' is not an earlier selection"):
        load_config(fast_config(tmp_path, select=[{"method": "craig", "budget": 0.1, "pool": "nope"}]))
    with pytest.raises(CurateError, match=r"select.0.budget: dedup takes no budget"):
        load_config(fast_config(tmp_path, select=[{"method": "dedup", "budget": 0.1}]))
    with pytest.raises(CurateError, match=r"select.0.eps: Input should be less than 1"):
        load_config(fast_config(tmp_path, select=[{"method": "craig", "budget": 0.1, "eps": 3}]))
    with pytest.raises(CurateError, match=r"select.0: Input tag 'kmeans' .* does not match"):
        load_config(fast_config(tmp_path, select=[{"method": "kmeans", "budget": 0.1}]))
    r = make_runner(select=[{"method": "dedup", "eps": 1.9, "max_removed": 1}, {"method": "craig", "budget": 0.5, "pool": "dedup-eps1.9"}])
    for unit in ("index", "embed", "select/dedup-eps1.9"):
        r.run(unit)
    with pytest.raises(CurateError, match=r"select craig-0.5: budget 719 is larger than its pool 'dedup-eps1.9' \(\d+ samples\)"):
        r.run("select/craig-0.5")
    assert not (r.run_dir / "select" / "craig-0.5").exists()


def test_nan_embeddings_are_named(make_runner):
    r = make_runner(select=[{"method": "craig", "budget": 0.1, "features": "embeddings"}])
    r.run("index")
    r.run("embed")
    emb = np.load(r.run_dir / "embed" / "embeddings.npy")
    emb[17, 3] = np.nan
    np.save(r.run_dir / "embed" / "embeddings.npy", emb)
    rerecord(r.run_dir / "embed")  # as if embed had produced the NaN
    with pytest.raises(CurateError, match=r"select craig-0.1: embed/embeddings.npy row 17 is NaN or infinite"):
        r.run("select/craig-0.1")
