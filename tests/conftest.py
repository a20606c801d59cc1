"""Shared fixtures: a digits catalog ingested once, runners over fast configs (helpers: tests/helpers.py)."""

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

from tests.helpers import FMNIST, PAIRS_N, PAIRS_NOISE, PAIRS_SEED, fast_config  # noqa: E402


@pytest.fixture(scope="session")
def digits_catalog(tmp_path_factory) -> Path:
    """A catalog with 'digits' ingested into 3 train shards (so cross-shard cases exist)."""
    root = tmp_path_factory.mktemp("digits")
    cat = root / "data_catalog.yaml"
    ingest("digits", root / "shards", "digits", catalog=str(cat), shard_size=500)
    return cat


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


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny convolutions: one thread is faster than several here, and the sums are repeatable."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def pairs_catalog(tmp_path_factory):
    """Real Fashion-MNIST image-caption pairs with planted wrong captions (pipeline.ingest.pair_captions)."""
    if not FMNIST.exists():
        pytest.skip("needs ../shared/datasets/fashion-mnist")
    root = tmp_path_factory.mktemp("pairs")
    cat = root / "data_catalog.yaml"
    ingest("fmnist-pairs", root / "shards", "fmnist-pairs", src=str(FMNIST), catalog=str(cat), noise=PAIRS_NOISE,
           seed=PAIRS_SEED, train_size=PAIRS_N)
    return cat
