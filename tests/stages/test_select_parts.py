"""Selections split into select_part units (`parts: P`) on real Fashion-MNIST image-caption pairs
(30% of the captions name a wrong class): the joined result is the single unit's, byte for byte,
and each part chose only among its own groups.

Image embeddings are the proxy network's of the real images; each caption's embedding sits near
the mean image embedding of the class the caption names (so the planted wrong captions are
misaligned pairs), and clipcov's groups, gate and quality pool all have work to do.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.catalog import Catalog
from pipeline.config import load_config
from pipeline.errors import CurateError
from pipeline.ingest import FMNIST_CLASSES, pair_captions
from pipeline.runner import Runner
from stages.kernels.coresets import clipcov as clipcov_kernel

from tests.helpers import PAIRS_NOISE, PAIRS_SEED, fast_config


def named_class(labels: np.ndarray) -> np.ndarray:
    """The class each index row's caption names (pipeline.ingest's planted captions)."""
    return pair_captions(labels, FMNIST_CLASSES, PAIRS_NOISE, PAIRS_SEED)[1]


def config(run_dir: Path, **sections) -> dict:
    return fast_config(run_dir, dataset="fmnist-pairs", **sections)


@pytest.fixture(scope="module")
def embeddings(pairs_catalog, tmp_path_factory) -> Path:
    """key, image and caption embeddings as Parquet (clip-retrieval's layout), from a proxy run."""
    r = Runner(load_config(config(tmp_path_factory.mktemp("proxy") / "run", select=[{"method": "random", "budget": 0.1}])),
               Catalog.load(pairs_catalog))
    r.write_run_json()
    r.run("index")
    r.run("embed")
    index = pq.read_table(r.run_dir / "index" / "index.parquet", columns=["key", "label"])
    img = np.load(r.run_dir / "embed" / "embeddings.npy").astype(np.float32)
    labels = index.column("label").to_numpy()
    named = named_class(labels)
    rng = np.random.default_rng(1)
    centres = np.stack([img[labels == c].mean(0) for c in range(10)])
    txt = centres[named] + 0.3 * img.std() * rng.standard_normal(img.shape).astype(np.float32)
    out = tmp_path_factory.mktemp("emb")
    for name, x in (("image", img), ("text", txt.astype(np.float32))):
        col = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
        pq.write_table(pa.table({"key": index.column("key"), "embedding": col}), out / f"{name}.parquet")
    return out


SPECS = [{"method": "craig", "features": "embeddings", "budget": 0.1},
         {"method": "craig", "features": "embeddings", "budget": 0.2, "graph": "sparse", "knn": 8, "name": "craig-sparse"},
         {"method": "clipcov", "budget": 0.2},
         {"method": "clipcov", "budget": 0.3, "groups": "labels", "name": "clipcov-labels"},
         {"method": "sas", "budget": 0.1, "clusters": 7},
         {"method": "gradmatch", "features": "embeddings", "budget": 0.1}]


def run_select(catalog, emb: Path, run_dir: Path, parts: int) -> Runner:
    specs = [{**s, "parts": parts} for s in SPECS]
    cfg = load_config(config(run_dir, embed={"method": "precomputed", "path": str(emb / "image.parquet"),
                                             "text_path": str(emb / "text.parquet")}, select=specs))
    r = Runner(cfg, Catalog.load(catalog))
    r.write_run_json()
    for u in r.units():
        if u.split("/")[0] in ("index", "embed", "select_part", "select"):
            r.run(u)
    return r


def table_bytes(path: Path) -> bytes:
    """The selection's columns as Arrow IPC bytes, without the file's metadata (its fingerprint
    names the unit's inputs, which differ by the part units)."""
    t = pq.read_table(path).replace_schema_metadata(None)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    return sink.getvalue().to_pybytes()


@pytest.fixture(scope="module", autouse=True)
def small_buckets(embeddings):
    """clipcov batches groups into buckets of about three here (the default holds 32M floats, so all of
    these groups would share one bucket): parts then receive runs of buckets, as at scale."""
    dim = pq.read_table(embeddings / "image.parquet").column("embedding").type.list_size
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(clipcov_kernel, "BLOCK_ELEMS", 3 * 110 * dim)
        yield


@pytest.fixture(scope="module")
def single(pairs_catalog, embeddings, tmp_path_factory) -> Runner:
    return run_select(pairs_catalog, embeddings, tmp_path_factory.mktemp("single") / "run", 1)


@pytest.mark.parametrize("parts", [3, 10])
def test_parts_join_to_the_single_units_selection_byte_for_byte(pairs_catalog, embeddings, single, tmp_path, parts):
    split = run_select(pairs_catalog, embeddings, tmp_path / "run", parts)
    names = [s.sel_name for s in split.cfg.select]
    for name in names:
        units = [u for u in split.units("select_part") if u.startswith(f"select_part/{name}@")]
        assert len(units) == parts
        assert split.upstream(f"select/{name}")[-parts:] == units
        a = single.run_dir / "select" / name / "selection.parquet"
        b = split.run_dir / "select" / name / "selection.parquet"
        assert table_bytes(a) == table_bytes(b), name
        # the same figures, too (objective per group, misaligned counts, cross-covariance error)
        ma = json.loads((single.run_dir / "select" / name / "_stage.json").read_text())["metrics"]
        mb = json.loads((split.run_dir / "select" / name / "_stage.json").read_text())["metrics"]
        assert ma == mb, name
        # each part picked only from its own groups, and the parts' groups tile those with a budget
        label = pq.read_table(b, columns=["label"]).column("label").to_numpy()
        owned = []
        for u in units:
            rec = json.loads((split.run_dir / u / "_stage.json").read_text())["metrics"]
            picks = pq.read_table(split.run_dir / u / "picks.parquet").to_pydict()
            assert rec["selected"] == len(picks["row"]) and set(picks["group"]) <= set(rec["groups"])
            assert (len(picks["row"]) > 0) == (len(rec["groups"]) > 0)  # more parts than work: some stay empty
            if "labels" in name or name.startswith(("craig", "gradmatch")):  # groups are the classes
                assert set(label[picks["row"]].tolist()) <= set(rec["groups"])
            owned.append(rec["groups"])
        flat = [c for groups in owned for c in groups]
        assert sorted(flat) == list(range(7 if name.startswith("sas") else 10))  # sas: 7 clusters
        if name.startswith("clipcov"):  # whole buckets per part, several groups to some bucket
            assert any(len(groups) > 1 for groups in owned)


def test_clipcov_leaves_the_planted_wrong_captions_out(single):
    # what the split runs reproduce is a real selection: few of the 30% wrong captions are kept
    labels = pq.read_table(single.run_dir / "index" / "index.parquet", columns=["label"]).column("label").to_numpy()
    wrong = named_class(labels) != labels
    assert 0.25 < wrong.mean() < 0.35
    kept = {}
    for name in ("clipcov-0.2", "clipcov-labels"):
        sel = pq.read_table(single.run_dir / "select" / name / "selection.parquet", columns=["selected"])
        kept[name] = wrong[sel.column("selected").to_numpy(zero_copy_only=False)].mean()
    # a 1-epoch proxy's features mix the classes, so captions are told apart less well than by CLIP
    assert all(v < 0.6 * wrong.mean() for v in kept.values()), kept


def test_more_parts_than_groups_leaves_the_extra_parts_empty(pairs_catalog, embeddings, single, tmp_path):
    cfg = load_config(config(tmp_path / "run", embed={"method": "precomputed", "path": str(embeddings / "image.parquet")},
                             select=[{"method": "craig", "features": "embeddings", "budget": 0.1, "parts": 12}]))
    r = Runner(cfg, Catalog.load(pairs_catalog))
    r.write_run_json()
    for u in r.units():
        if u.split("/")[0] in ("index", "embed", "select_part", "select"):
            r.run(u)
    groups = [json.loads((tmp_path / "run" / u / "_stage.json").read_text())["metrics"]["groups"]
              for u in r.units("select_part")]
    assert groups == [[c] for c in range(10)] + [[], []]
    assert table_bytes(tmp_path / "run" / "select" / "craig-0.1" / "selection.parquet") == \
        table_bytes(single.run_dir / "select" / "craig-0.1" / "selection.parquet")


def test_gradmatch_splits_per_class_only(tmp_path):
    with pytest.raises(CurateError, match="per: class"):
        load_config(config(tmp_path, select=[{"method": "gradmatch", "budget": 0.1, "per": "batch", "parts": 2}]))
