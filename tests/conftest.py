"""Shared fixtures: a digits catalog ingested once, and small fast run configs."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("CURATE_CACHE_DIR", tempfile.mkdtemp(prefix="curate-cache-"))  # not the user's ~/.cache

from pipeline.catalog import Catalog  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.ingest import ingest  # noqa: E402
from pipeline.runner import Runner  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path(os.environ.get("CURATE_FMNIST", REPO.parent / "shared" / "datasets" / "fashion-mnist"))


@pytest.fixture(scope="session")
def digits_catalog(tmp_path_factory) -> Path:
    """A catalog with 'digits' ingested into 3 train shards (so cross-shard cases exist)."""
    root = tmp_path_factory.mktemp("digits")
    cat = root / "data_catalog.yaml"
    ingest("digits", root / "shards", "digits", catalog=str(cat), shard_size=500)
    return cat


def fast_config(run_dir: Path, **sections) -> dict:
    cfg = {
        "run": str(run_dir), "dataset": "digits", "seed": 0,
        "embed": {"epochs": 1},
        "select": [{"method": "random", "budget": 0.1}, {"method": "stratified", "budget": 0.2}],
        "verify": {"epochs": 1, "seeds": 1, "batch_size": 32, "lr": 0.05, "width": 32, "ipc_epochs": 3},
    }
    cfg.update(sections)
    return cfg


@pytest.fixture
def make_runner(digits_catalog, tmp_path):
    """Build a Runner over a fresh run dir (or a given one) with a fast config."""

    def make(run_dir: Path | None = None, catalog: Path | None = None, overrides=(), **sections) -> Runner:
        cfg = load_config(fast_config(run_dir or tmp_path / "run", **sections), list(overrides))
        r = Runner(cfg, Catalog.load(catalog or digits_catalog))
        r.write_run_json()
        return r

    return make


@pytest.fixture
def catalog_copy(digits_catalog, tmp_path) -> Path:
    """A private copy of the digits shards + catalog that a test may damage."""
    dst = tmp_path / "cat"
    shutil.copytree(digits_catalog.parent, dst)
    return dst / "data_catalog.yaml"


def files_under(d: Path) -> dict[str, bytes]:
    """relative path -> bytes for every file except _stage.json (which holds times)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != "_stage.json"}


def digits_split(upscale: int = 1):
    """sklearn's digits as uint8 [N, 1, 8u, 8u] (nearest-neighbour upscaled u times) and labels,
    split 1400 train / 397 held out by one fixed permutation."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images * 16).clip(0, 255).astype(np.uint8)[:, None]
    x = x.repeat(upscale, axis=2).repeat(upscale, axis=3)
    perm = np.random.default_rng(0).permutation(len(d.target))
    return x[perm[:1400]], d.target[perm[:1400]], x[perm[1400:]], d.target[perm[1400:]]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny convolutions: one thread is faster than several here, and the sums are repeatable."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rerecord(unit_dir: Path) -> None:
    """Make `_stage.json` claim the files now in `unit_dir`, as if the stage itself had written
    them: how a test plants bad output (NaN rows, a foreign buffer) that the run store would
    otherwise see as tampered, hence stale."""
    import json

    from pipeline.runner import STAGE_FILE, describe_outputs, hash_outputs

    rec = json.loads((unit_dir / STAGE_FILE).read_text())
    rec["outputs"] = describe_outputs(unit_dir)
    rec["output_hash"] = hash_outputs(rec["outputs"])
    (unit_dir / STAGE_FILE).write_text(json.dumps(rec))
