"""embed: {method: precomputed}: embeddings brought as Parquet (clip-retrieval's layout) or a .npy
plus keys, aligned to the index by key.

The acceptance check: a run on embeddings exported from the proxy's embed, shuffled and split over
files, writes byte-identical embeddings.npy / val_embeddings.npy and selects and scores exactly
what the proxy run does. Every bad input is a one-line CurateError naming its first offender.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.catalog import Catalog
from pipeline.config import load_config
from pipeline.errors import CurateError
from pipeline.runner import Runner

from tests.helpers import fast_config

# selections that read only embeddings (no gradients, no captions), and embedding-based scores
SELECT = [{"method": "craig", "features": "embeddings", "budget": 0.1},
          {"method": "gradmatch", "features": "embeddings", "budget": 0.1},
          {"method": "dedup", "features": "embeddings", "eps": 0.1, "max_removed": 1.0},
          {"method": "sas", "budget": 0.1, "groups": "labels"},
          {"method": "difficulty", "score": "prototype", "budget": 0.2},
          {"method": "difficulty", "score": "knn_shapley", "budget": 0.2, "name": "shapley"}]
SCORE = {"methods": ["prototype", "knn_shapley"]}
DIM = 16


def runner(run_dir: Path, catalog: Path, **sections) -> Runner:
    r = Runner(load_config(fast_config(run_dir, **sections)), Catalog.load(catalog))
    r.write_run_json()
    return r


def run_through(r: Runner, last: str = "select") -> None:
    order = ["index", "embed", "score", "select"]
    for u in r.units():
        if u.split("/")[0] in order[:order.index(last) + 1]:
            r.run(u)


def fixed_list(values: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def selection(run_dir: Path, sel: str) -> pa.Table:
    return pq.read_table(run_dir / "select" / sel / "selection.parquet").replace_schema_metadata(None)


# ----------------------------------------------------------------- the same embeddings, the same selections
@pytest.fixture(scope="module")
def proxy_run(digits_catalog, tmp_path_factory):
    r = runner(tmp_path_factory.mktemp("proxy") / "run", digits_catalog, score=SCORE, select=SELECT)
    run_through(r)
    return r


def exported(run_dir: Path, out: Path, layout: str) -> dict:
    """The proxy's embeddings (index and val rows), shuffled, as `layout`: a folder of two
    Parquet files keyed by `key` with small row groups, or a .npy with a keys file by `uid`."""
    tables = [pq.read_table(run_dir / "index" / f"{p}.parquet", columns=["key", "uid"]) for p in ("index", "val")]
    emb = np.concatenate([np.load(run_dir / "embed" / "embeddings.npy"), np.load(run_dir / "embed" / "val_embeddings.npy")])
    perm = np.random.default_rng(1).permutation(len(emb))
    out.mkdir(parents=True)
    if layout == "parquet":
        key = pa.concat_arrays([t.column("key").combine_chunks() for t in tables]).take(perm)
        half = len(perm) // 2
        for i, part in enumerate((slice(0, half), slice(half, None))):
            t = pa.table({"key": key[part], "caption": pa.nulls(len(key[part]), pa.string()),
                          "embedding": fixed_list(emb[perm][part])})
            pq.write_table(t, out / f"img_emb_{i}.parquet", row_group_size=250)
        return {"method": "precomputed", "path": str(out)}
    uid = pa.concat_arrays([t.column("uid").combine_chunks() for t in tables]).take(perm)
    np.save(out / "img_emb.npy", emb[perm])
    pq.write_table(pa.table({"uid": uid}), out / "keys.parquet")
    return {"method": "precomputed", "path": str(out / "img_emb.npy"), "keys": str(out / "keys.parquet")}


@pytest.mark.parametrize("layout", ["parquet", "npy"])
def test_precomputed_run_selects_exactly_what_embed_computed(proxy_run, digits_catalog, tmp_path, layout):
    a = proxy_run.run_dir
    embed = exported(a, tmp_path / "emb", layout)
    r = runner(tmp_path / "run", digits_catalog, score=SCORE, select=SELECT, embed=embed)
    run_through(r)
    b = r.run_dir
    for name in ("embeddings.npy", "val_embeddings.npy"):
        assert (b / "embed" / name).read_bytes() == (a / "embed" / name).read_bytes()
    scores_a = pq.read_table(a / "score" / "scores.parquet").replace_schema_metadata(None)
    assert pq.read_table(b / "score" / "scores.parquet").replace_schema_metadata(None).equals(scores_a)
    for unit in r.units("select"):
        sel = unit.split("/", 1)[1]
        got, want = selection(b, sel), selection(a, sel)
        assert got.equals(want), sel
        assert 0 < sum(got.column("selected").to_pylist()) < got.num_rows, sel  # a real choice was made
    rec = json.loads((b / "embed" / "_stage.json").read_text())
    assert rec["metrics"]["extra_keys"] == 0 and rec["metrics"]["dim"] == np.load(a / "embed" / "embeddings.npy").shape[1]
    assert rec["resources"]["gpus"] == 0  # reads files: no GPU asked for


# ----------------------------------------------------------------- bad input, one line each
@pytest.fixture(scope="module")
def indexed(digits_catalog, tmp_path_factory) -> Path:
    """A run with only its index done (no validation split: the score needs none)."""
    r = runner(tmp_path_factory.mktemp("indexed") / "run", digits_catalog, select=[{"method": "random", "budget": 0.1}])
    r.run("index")
    return r.run_dir


def index_keys(indexed: Path) -> list[str]:
    return pq.read_table(indexed / "index" / "index.parquet", columns=["key"]).column("key").to_pylist()


def planted(indexed: Path, seed: int = 0) -> tuple[list[str], np.ndarray]:
    keys = index_keys(indexed)
    return keys, np.random.default_rng(seed).normal(size=(len(keys), DIM)).astype(np.float32)


def write_parquet(path: Path, keys, emb, *, key_col: str = "key", fixed: bool = True) -> Path:
    col = fixed_list(emb) if fixed else pa.array([list(r) for r in emb], pa.list_(pa.from_numpy_dtype(emb.dtype)))
    pq.write_table(pa.table({key_col: pa.array(keys, pa.string()), "embedding": col}), path, row_group_size=400)
    return path


def embed_run(indexed: Path, digits_catalog: Path, tmp_path: Path, overrides=(), **embed) -> Runner:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(indexed / "index", run_dir / "index")
    shutil.copy(indexed / "run.json", run_dir / "run.json")
    cfg = load_config(fast_config(run_dir, embed={"method": "precomputed", **embed},
                                  select=[{"method": "random", "budget": 0.1}]), list(overrides))
    r = Runner(cfg, Catalog.load(digits_catalog))
    r.write_run_json()
    return r


def fails(r: Runner, *words: str) -> str:
    with pytest.raises(CurateError) as exc:
        r.run("embed")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("embed precomputed:"), msg
    for w in words:
        assert w in msg, msg
    assert not (r.run_dir / "embed").exists()  # nothing half-written
    return msg


def test_missing_key(indexed, digits_catalog, tmp_path):
    keys, emb = planted(indexed)
    drop = 700
    path = write_parquet(tmp_path / "e.parquet", keys[:drop] + keys[drop + 1:], np.delete(emb, drop, 0))
    fails(embed_run(indexed, digits_catalog, tmp_path, path=str(path)), f"index row {drop}", repr(keys[drop]),
          "missing key", "1 of")


def test_extra_key_is_an_error_and_counted_under_skip(indexed, digits_catalog, tmp_path):
    keys, emb = planted(indexed)
    extra = np.random.default_rng(5).normal(size=(2, DIM)).astype(np.float32)
    extra[1, 3] = np.nan  # an ignored row is not checked
    path = write_parquet(tmp_path / "e.parquet", keys[:10] + ["not_in_the_index", "nor_this"] + keys[10:],
                         np.concatenate([emb[:10], extra, emb[10:]]))
    fails(embed_run(indexed, digits_catalog, tmp_path, path=str(path)), "'not_in_the_index'", "row 10", "extra key")
    shutil.rmtree(tmp_path / "run")
    r = embed_run(indexed, digits_catalog, tmp_path, overrides=["index.on_error=skip"], path=str(path))
    r.run("index")
    r.run("embed")
    rec = json.loads((r.run_dir / "embed" / "_stage.json").read_text())
    assert rec["metrics"]["extra_keys"] == 2 and rec["metrics"]["first_extra_key"] == "not_in_the_index"
    assert np.array_equal(np.load(r.run_dir / "embed" / "embeddings.npy"), emb)  # the extras left out


def test_repeated_key(indexed, digits_catalog, tmp_path):
    keys, emb = planted(indexed)
    path = write_parquet(tmp_path / "e.parquet", keys + [keys[3]], np.concatenate([emb, emb[3:4]]))
    fails(embed_run(indexed, digits_catalog, tmp_path, path=str(path)), repr(keys[3]), "second embedding")


def test_wrong_dimension_within_a_file(indexed, digits_catalog, tmp_path):
    keys, emb = planted(indexed)
    rows = [list(r) for r in emb]
    rows[321] = rows[321][:-1]
    pq.write_table(pa.table({"key": keys, "embedding": pa.array(rows, pa.list_(pa.float32()))}), tmp_path / "e.parquet")
    fails(embed_run(indexed, digits_catalog, tmp_path, path=str(tmp_path / "e.parquet")), repr(keys[321]),
          f"{DIM - 1} values")


def test_wrong_dimension_across_files(indexed, digits_catalog, tmp_path):
    keys, emb = planted(indexed)
    (tmp_path / "emb").mkdir()
    write_parquet(tmp_path / "emb" / "a.parquet", keys[:500], emb[:500])
    wide = np.random.default_rng(3).normal(size=(len(keys) - 500, DIM + 4)).astype(np.float32)
    write_parquet(tmp_path / "emb" / "b.parquet", keys[500:], wide)
    fails(embed_run(indexed, digits_catalog, tmp_path, path=str(tmp_path / "emb")), "b.parquet", repr(keys[500]),
          f"dimension {DIM + 4}, expected {DIM}")


def test_text_dimension_must_match_the_images(indexed, digits_catalog, tmp_path):
    keys, emb = planted(indexed)
    img = write_parquet(tmp_path / "img.parquet", keys, emb)
    txt = write_parquet(tmp_path / "txt.parquet", keys, np.ones((len(keys), DIM * 2), np.float32))
    fails(embed_run(indexed, digits_catalog, tmp_path, path=str(img), text_path=str(txt)), "text_path",
          repr(keys[0]), f"dimension {2 * DIM}, expected {DIM}", "image embeddings")


@pytest.mark.parametrize("value, word", [(np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"),
                                          (-np.inf, "NaN or infinite")])
def test_non_finite_values(indexed, digits_catalog, tmp_path, value, word):
    keys, emb = planted(indexed)
    emb[987, 5] = value
    path = write_parquet(tmp_path / "e.parquet", keys, emb)
    fails(embed_run(indexed, digits_catalog, tmp_path, path=str(path)), repr(keys[987]), "row 987", word)


def test_non_finite_in_a_npy(indexed, digits_catalog, tmp_path):
    keys, emb = planted(indexed)
    emb[55, 0] = np.nan
    np.save(tmp_path / "e.npy", emb)
    pq.write_table(pa.table({"key": keys}), tmp_path / "keys.parquet")
    fails(embed_run(indexed, digits_catalog, tmp_path, path=str(tmp_path / "e.npy"), keys=str(tmp_path / "keys.parquet")),
          "e.npy", repr(keys[55]), "NaN or infinite")


def test_float64_beyond_float32_range(indexed, digits_catalog, tmp_path):
    keys, emb = planted(indexed)
    emb64 = emb.astype(np.float64)
    emb64[12, 1] = 1e300
    path = write_parquet(tmp_path / "e.parquet", keys, emb64)
    fails(embed_run(indexed, digits_catalog, tmp_path, path=str(path)), repr(keys[12]), "overflows float32")


@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_integer_embeddings(indexed, digits_catalog, tmp_path, fmt):
    keys, emb = planted(indexed)
    ints = (emb * 100).astype(np.int32)
    if fmt == "parquet":
        path = write_parquet(tmp_path / "e.parquet", keys, ints)
        fails(embed_run(indexed, digits_catalog, tmp_path, path=str(path)), "e.parquet", "'embedding'", "int32",
              "not floats")
    else:
        np.save(tmp_path / "e.npy", ints)
        pq.write_table(pa.table({"key": keys}), tmp_path / "keys.parquet")
        fails(embed_run(indexed, digits_catalog, tmp_path, path=str(tmp_path / "e.npy"),
                        keys=str(tmp_path / "keys.parquet")), "e.npy", "int32", "not floats")


def test_null_embedding(indexed, digits_catalog, tmp_path):
    keys, emb = planted(indexed)
    rows = [list(r) for r in emb]
    rows[40] = None
    pq.write_table(pa.table({"key": keys, "embedding": pa.array(rows, pa.list_(pa.float32()))}), tmp_path / "e.parquet")
    fails(embed_run(indexed, digits_catalog, tmp_path, path=str(tmp_path / "e.parquet")), repr(keys[40]), "null")


def test_keys_and_npy_rows_must_match(indexed, digits_catalog, tmp_path):
    keys, emb = planted(indexed)
    np.save(tmp_path / "e.npy", emb)
    pq.write_table(pa.table({"key": keys[:-1]}), tmp_path / "keys.parquet")
    fails(embed_run(indexed, digits_catalog, tmp_path, path=str(tmp_path / "e.npy"), keys=str(tmp_path / "keys.parquet")),
          "keys.parquet", f"{len(keys) - 1} rows", f"has {len(keys)}")


def test_file_layout_errors(indexed, digits_catalog, tmp_path):
    keys, emb = planted(indexed)
    fails(embed_run(indexed, digits_catalog, tmp_path, path=str(tmp_path / "nowhere.parquet")), "no such file")
    shutil.rmtree(tmp_path / "run")
    pq.write_table(pa.table({"name": keys, "embedding": fixed_list(emb)}), tmp_path / "nokey.parquet")
    fails(embed_run(indexed, digits_catalog, tmp_path, path=str(tmp_path / "nokey.parquet")), "no key or uid column")
    shutil.rmtree(tmp_path / "run")
    pq.write_table(pa.table({"key": keys, "a": fixed_list(emb), "b": fixed_list(emb)}), tmp_path / "two.parquet")
    fails(embed_run(indexed, digits_catalog, tmp_path, path=str(tmp_path / "two.parquet")), "several list columns",
          "embed.column")
    shutil.rmtree(tmp_path / "run")
    r = embed_run(indexed, digits_catalog, tmp_path, path=str(tmp_path / "tw?.parquet"), column="b")
    r.run("embed")  # named (and found by a glob): fine
    assert np.array_equal(np.load(r.run_dir / "embed" / "embeddings.npy"), emb)


# ----------------------------------------------------------------- what else it writes and reads
def test_uid_keys_float16_and_text_embeddings(indexed, digits_catalog, tmp_path):
    keys, emb = planted(indexed)
    uids = pq.read_table(indexed / "index" / "index.parquet", columns=["uid"]).column("uid").to_pylist()
    perm = np.random.default_rng(2).permutation(len(keys))
    img = write_parquet(tmp_path / "img.parquet", [uids[i] for i in perm], emb[perm].astype(np.float16), key_col="uid")
    txt = write_parquet(tmp_path / "txt.parquet", [keys[i] for i in perm], -emb[perm], fixed=False)
    r = embed_run(indexed, digits_catalog, tmp_path, path=str(img), text_path=str(txt))
    r.run("embed")
    out = r.run_dir / "embed"
    got = np.load(out / "embeddings.npy")
    assert got.dtype == np.float16 and np.array_equal(got, emb.astype(np.float16))  # float16 stays float16
    assert np.array_equal(np.load(out / "text_embeddings.npy"), -emb)
    meta = json.loads((out / "embeddings.json").read_text())
    assert meta["embeddings.npy"] == [len(keys), DIM] and meta["text_embeddings.npy"] == [len(keys), DIM]


def test_file_content_is_in_the_fingerprint(indexed, digits_catalog, tmp_path):
    keys, emb = planted(indexed)
    np.save(tmp_path / "e.npy", emb)
    pq.write_table(pa.table({"key": keys}), tmp_path / "keys.parquet")
    kw = {"path": str(tmp_path / "e.npy"), "keys": str(tmp_path / "keys.parquet")}
    r = embed_run(indexed, digits_catalog, tmp_path, **kw)
    r.run("embed")
    fp = r.fingerprint("embed")
    again = Runner(r.cfg, Catalog.load(digits_catalog))
    assert again.fingerprint("embed") == fp and again.state("embed") == "done"
    data = bytearray((tmp_path / "e.npy").read_bytes())
    data[-1] ^= 1  # one byte of the last value: same size, same name
    (tmp_path / "e.npy").write_bytes(bytes(data))
    changed = Runner(r.cfg, Catalog.load(digits_catalog))
    assert changed.fingerprint("embed") != fp and changed.state("embed") == "stale"
    assert changed.run("embed")["status"] == "computed"
    assert np.load(r.run_dir / "embed" / "embeddings.npy")[-1, -1] != emb[-1, -1]


# ----------------------------------------------------------------- config
def test_relative_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    cfg = tmp_path / "conf" / "run.yaml"
    cfg.write_text("run: runs/x\ndataset: digits\nembed: {method: precomputed, path: emb/img.npy, keys: emb/keys.parquet,"
                   " text_path: /abs/txt.parquet}\n")
    monkeypatch.chdir(tmp_path)
    c = load_config(cfg)
    assert c.embed.path == str(tmp_path / "conf" / "emb" / "img.npy")
    assert c.embed.keys == str(tmp_path / "conf" / "emb" / "keys.parquet")
    assert c.embed.text_path == "/abs/txt.parquet"
    assert load_config(cfg, ["embed.path=other/x.parquet", "embed.keys=null"]).embed.path == \
        str(tmp_path / "conf" / "other" / "x.parquet")


@pytest.mark.parametrize("embed, words", [
    ({"method": "precomputed"}, "needs path"),
    ({"method": "precomputed", "path": "e.npy"}, "set keys"),
    ({"method": "precomputed", "path": "e.parquet", "keys": "k.parquet"}, "carry their own keys"),
    ({"method": "proxy", "path": "e.parquet"}, "only by method precomputed"),
    ({"method": "precomputed", "path": "s3://bucket/e.parquet"}, "local files"),
    ({"method": "precomputed", "path": "e.parquet", "text_column": "t"}, "text_column needs text_path"),
    ({"method": "precomputed", "path": "e.parquet", "colum": "x"}, "colum"),
])
def test_config_errors(tmp_path, embed, words):
    with pytest.raises(CurateError) as exc:
        load_config(fast_config(tmp_path / "run", embed=embed))
    assert str(exc.value).startswith("config: embed") and words in str(exc.value), str(exc.value)


# ----------------------------------------------------------------- image-caption pairs
@pytest.mark.slow
def test_precomputed_pairs_select_exactly_what_proxy_clip_computed(tmp_path):
    """Both towers' float16 embeddings in one Parquet file (DataComp-like columns), read with
    column / text_column: byte-identical outputs, and clipcov, clipscore and score clip agree."""
    from pipeline.ingest import ingest

    from tests.helpers import FMNIST

    if not FMNIST.exists():
        pytest.skip("needs ../shared/datasets/fashion-mnist")
    cat = tmp_path / "pairs" / "data_catalog.yaml"
    ingest("fmnist-pairs", tmp_path / "pairs" / "shards", "fmnist-pairs", src=str(FMNIST), catalog=str(cat), noise=0.3,
           seed=0, train_size=400)
    tiny = {"embed_dim": 16, "vision_layers": 1, "vision_width": 32, "patch": 7, "text_layers": 1, "text_width": 32,
            "context": 12, "epochs": 2, "batch_size": 128, "lr": 2e-3}
    sections = {"dataset": "fmnist-pairs", "score": {"methods": ["clip"]},
                "select": [{"method": "clipcov", "budget": 0.3}, {"method": "clipscore", "budget": 0.3}]}
    a = runner(tmp_path / "a", cat, embed={"method": "proxy_clip", "clip": tiny, "views": 1}, **sections)
    run_through(a)
    key = pq.read_table(a.run_dir / "index" / "index.parquet", columns=["key"]).column("key")
    img, txt = (np.load(a.run_dir / "embed" / f) for f in ("embeddings.npy", "text_embeddings.npy"))
    assert img.dtype == np.float16
    perm = np.random.default_rng(0).permutation(len(img))
    pq.write_table(pa.table({"key": key.take(perm), "img": fixed_list(img[perm]), "txt": fixed_list(txt[perm])}),
                   tmp_path / "pairs.parquet", row_group_size=100)
    b = runner(tmp_path / "b", cat, embed={"method": "precomputed", "path": str(tmp_path / "pairs.parquet"), "column": "img",
                                           "text_path": str(tmp_path / "pairs.parquet"), "text_column": "txt"}, **sections)
    run_through(b)
    for name in ("embeddings.npy", "text_embeddings.npy"):
        assert (b.run_dir / "embed" / name).read_bytes() == (a.run_dir / "embed" / name).read_bytes()
    assert pq.read_table(b.run_dir / "score" / "scores.parquet").replace_schema_metadata(None).equals(
        pq.read_table(a.run_dir / "score" / "scores.parquet").replace_schema_metadata(None))
    for unit in b.units("select"):
        sel = unit.split("/", 1)[1]
        assert selection(b.run_dir, sel).equals(selection(a.run_dir, sel)), sel
