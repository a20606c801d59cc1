"""Streaming stages keep memory flat: index and materialize on 50,000 samples allocate no more than
on 5,000 plus a stated bound (pytest-memray, high-water mark of the test call).

The bound is what the outputs themselves must hold: index keeps its Arrow columns (about 0.25 KB
a row here) to write index.parquet in one piece; materialize holds one source shard's selected
samples and the selection's Arrow columns. Per-sample Python objects for the whole dataset (a
decoded 8x8 image each, ~0.3 KB, or a dict of members) exceed the bound and fail the 50k case.

The limits are checked only under `--memray`. The fast suite (plain pytest) skips them; the slow
suite runs them in a subprocess with `--memray` (test_stage_memory_under_memray), so memray tracks
only these tests and no other test pays for it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.catalog import Catalog, DatasetEntry, Fields
from pipeline.config import load_config
from pipeline.ingest import RawSample, write_split
from pipeline.runner import Runner
from pipeline.shards import encode_png, shard_pattern

SIZES = (5_000, 50_000)
WARM = 500  # a first run outside the measured calls: imports and caches are not the stage's
SHARD = 2_000
# Limits in MiB (pytest-memray reads "MB" as 2^20 bytes), with ARROW_DEFAULT_MEMORY_POOL=system so
# that Arrow's buffers are counted. Measured high-water marks (2-core machine, pyarrow 26): index
# 6.1 MiB at 5k, 16.7 at 50k (index.parquet's Arrow columns and Parquet's write buffers, ~0.24 KiB
# a row); materialize of 10% 1.4 MiB at 5k, 13.8 at 50k (the selection's columns, decoded one at a
# time from its one row group, and the 5,000 selected rows). Holding the decoded images of all
# samples (a list, the way a stage that loads the dataset would) measured 34.1 MiB for index and
# 21.3 MiB for materialize at 50k: both fail.
INDEX_5K, INDEX_GROWTH = 10, 12  # index: 45,000 more samples may add at most 12 MiB (0.28 KiB a sample)
MAT_5K, MAT_GROWTH = 6, 12  # materialize 10%: 45,000 more pool rows (4,500 more selected) add at most 12 MiB


def _samples(n: int):
    """n samples of 10 classes; each class one random 8x8 RGB image (encoded once), caption and json."""
    rng = np.random.default_rng(0)
    pngs = [encode_png(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(10)]
    for i in range(n):
        c = i % 10
        yield RawSample(label=c, data=pngs[c], ext="png", caption=f"a photo of class {c}", meta={"i": i})


@pytest.fixture(scope="module")
def memory_catalog(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("memory")
    cat = Catalog.load(root / "data_catalog.yaml", missing_ok=True)
    for n in (WARM, *SIZES):
        sizes = write_split(_samples(n), root / f"mem{n}", "train", SHARD)
        cat.set_entry(f"mem{n}", DatasetEntry(splits={"train": f"mem{n}/{shard_pattern('train', len(sizes))}"},
                                              num_classes=10, fields=Fields(image=["png"], label="cls", caption="txt")))
    return cat.path


def _runner(catalog: Path, run: Path, n: int) -> Runner:
    cfg = load_config({"run": str(run), "dataset": f"mem{n}", "seed": 0,
                       "index": {"workers": 1},  # decode in this process, where memray measures it
                       "select": [{"method": "random", "budget": 0.1}],
                       "materialize": {"register_entry": False}})
    r = Runner(cfg, Catalog.load(catalog))
    r.write_run_json()
    return r


@pytest.fixture(scope="module")
def warmed(memory_catalog, tmp_path_factory) -> None:
    """index -> select -> materialize once on WARM samples, before any measured call."""
    r = _runner(memory_catalog, tmp_path_factory.mktemp("warm") / "run", WARM)
    for unit in ("index", *r.units("select"), *r.units("materialize")):
        r.run(unit)


@pytest.fixture
def needs_memray(request):
    if not request.config.getoption("memray", default=False):
        pytest.skip("a memory limit: run with --memray (the slow suite does, in test_stage_memory_under_memray)")


@pytest.fixture(scope="module")
def selected_runs(memory_catalog, tmp_path_factory) -> dict[int, Runner]:
    """Per size, a run with index and a 10% random selection done (outside the measured calls)."""
    runs = {}
    for n in SIZES:
        r = _runner(memory_catalog, tmp_path_factory.mktemp(f"sel{n}") / "run", n)
        r.run("index")
        (unit,) = r.units("select")
        r.run(unit)
        runs[n] = r
    return runs


@pytest.mark.parametrize("n", [pytest.param(n, marks=pytest.mark.limit_memory(
    f"{INDEX_5K + (INDEX_GROWTH if n > SIZES[0] else 0)} MB")) for n in SIZES])
def test_index_memory_does_not_grow_with_the_dataset(needs_memray, n, memory_catalog, warmed, tmp_path):
    r = _runner(memory_catalog, tmp_path / "run", n)
    r.run("index")
    table = pq.read_table(tmp_path / "run" / "index" / "index.parquet", columns=["row", "label"])
    assert table.num_rows == n
    assert table.column("row").to_pylist() == list(range(n))
    assert np.bincount(table.column("label").to_numpy()).tolist() == [n // 10] * 10


@pytest.mark.parametrize("n", [pytest.param(n, marks=pytest.mark.limit_memory(
    f"{MAT_5K + (MAT_GROWTH if n > SIZES[0] else 0)} MB")) for n in SIZES])
def test_materialize_memory_does_not_grow_with_the_dataset(needs_memray, n, warmed, selected_runs):
    r = selected_runs[n]
    (unit,) = r.units("materialize")
    r.run(unit, force=True)
    manifest = pq.read_table(r.run_dir / unit / "manifest.parquet")
    chosen = pq.read_table(r.run_dir / unit.replace("materialize", "select") / "selection.parquet")
    keys = sorted(k for k, s in zip(chosen.column("key").to_pylist(), chosen.column("selected").to_pylist()) if s)
    assert len(keys) == n // 10
    assert sorted(manifest.column("key").to_pylist()) == keys
    assert sum(1 for _ in (r.run_dir / unit / "shards").glob("*.tar")) >= 8


POOL, POOL_CLASSES, POOL_DIM = 20_000, 50, 512  # the pool's embeddings: 39 MiB in float32
# One select_part unit of 50 (one class of 400 rows). memray counts a memory map at its full size:
# the part reads its rows through a transient map of embeddings.npy (39.1 MiB of address space, not
# of resident memory), and allocates 5.2 MiB besides (measured, 2-core machine). A part that held
# the pool's [N, D] would add another 39 MiB and fail.
PART_LIMIT = 39 + 16


@pytest.fixture(scope="module")
def split_run(tmp_path_factory) -> Runner:
    """A 20,000-sample pool of 50 classes with precomputed 512-d embeddings, indexed and embedded
    (outside the measured call); craig on the embeddings in 50 parts, one class each."""
    root = tmp_path_factory.mktemp("parts")
    rng = np.random.default_rng(0)
    png = encode_png(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    labels = np.arange(POOL) % POOL_CLASSES
    sizes = write_split((RawSample(label=int(c), data=png, ext="png") for c in labels), root / "pool", "train", 5_000)
    cat = Catalog.load(root / "data_catalog.yaml", missing_ok=True)
    cat.set_entry("pool", DatasetEntry(splits={"train": f"pool/{shard_pattern('train', len(sizes))}"},
                                       num_classes=POOL_CLASSES, fields=Fields(image=["png"], label="cls")))

    def runner(embed: dict) -> Runner:
        cfg = load_config({"run": str(root / "run"), "dataset": "pool", "seed": 0, "index": {"workers": 1},
                           "embed": embed, "select": [{"method": "craig", "budget": 0.1, "features": "embeddings",
                                                       "parts": POOL_CLASSES}]})
        return Runner(cfg, Catalog.load(cat.path))

    first = runner({"method": "proxy"})
    first.write_run_json()
    first.run("index")
    keys = pq.read_table(root / "run" / "index" / "index.parquet", columns=["key"])
    pq.write_table(keys, root / "keys.parquet")
    np.save(root / "emb.npy", (rng.standard_normal((POOL, POOL_DIM)) + labels[:, None]).astype(np.float32))
    r = runner({"method": "precomputed", "path": str(root / "emb.npy"), "keys": str(root / "keys.parquet")})
    r.write_run_json()
    r.run("index")
    r.run("embed")
    r.run(r.units("select_part")[0])  # once, so imports and caches are not the measured call's
    return r


@pytest.mark.limit_memory(f"{PART_LIMIT} MB")
def test_select_part_memory_does_not_grow_with_the_pool(needs_memray, split_run):
    """A part holds its groups' rows, never the pool's [N, D] embeddings (39 MiB, over the limit)."""
    r = split_run
    unit = r.units("select_part")[7]
    r.run(unit, force=True)
    picks = pq.read_table(r.run_dir / unit / "picks.parquet").to_pydict()
    assert len(picks["row"]) == POOL // POOL_CLASSES // 10 and set(picks["group"]) == {7}
    assert {row % POOL_CLASSES for row in picks["row"]} == {7}


@pytest.mark.slow
def test_stage_memory_under_memray():
    """The limits above, checked: this module again in a subprocess with --memray."""
    repo = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "--memray",
                          str(Path(__file__).relative_to(repo)), "-k", "memory_does_not_grow"],
                         cwd=repo, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "system"})  # Arrow's buffers via malloc: counted
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "5 passed" in res.stdout, res.stdout[-2000:]
