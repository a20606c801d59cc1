"""Acceptance on real data (slow, ~4 min on 2 cores): coresets of Fashion-MNIST proxy gradients."""

import numpy as np
import pytest

from pipeline.catalog import Catalog
from pipeline.config import load_config
from pipeline.ingest import ingest
from pipeline.manifest import read_parquet
from pipeline.runner import Runner
from stages.kernels.coresets.features import last_layer
from stages.kernels.coresets.gradmatch import matching_error
from tests.helpers import FMNIST


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.exists(), reason="shared Fashion-MNIST not present")
def test_gradmatch_matches_fashion_mnist_gradients_best(tmp_path):
    cat = tmp_path / "data_catalog.yaml"
    ingest("idx", tmp_path / "fmnist", "fmnist", src=str(FMNIST), catalog=str(cat))
    cfg = load_config({"run": str(tmp_path / "run"), "dataset": "fmnist", "seed": 0, "embed": {"epochs": 2},
                       "select": [{"method": m, "budget": 0.1} for m in ("craig", "gradmatch")]})
    runner = Runner(cfg, Catalog.load(cat))
    runner.write_run_json()
    for unit in ("index", "embed", "select/craig-0.1", "select/gradmatch-0.1"):
        runner.run(unit)
    grads = last_layer(np.load(runner.run_dir / "embed" / "grads.npy"),
                       np.load(runner.run_dir / "embed" / "embeddings.npy")).dense().numpy()

    def err(sel):
        t = read_parquet(runner.run_dir / "select" / sel / "selection.parquet", ["selected", "weight"])
        rows = np.flatnonzero(t.column("selected").to_numpy(zero_copy_only=False))
        return matching_error(grads, rows, t.column("weight").to_numpy()[rows])

    rng = np.random.default_rng(0)
    random_err = np.mean([matching_error(grads, rng.choice(60000, 6000, replace=False), np.ones(6000)) for _ in range(5)])
    assert err("gradmatch-0.1") < err("craig-0.1")
    assert err("gradmatch-0.1") < 0.5 * random_err
    craig = read_parquet(runner.run_dir / "select" / "craig-0.1" / "selection.parquet", ["label", "selected", "weight"])
    sel = craig.column("selected").to_numpy(zero_copy_only=False)
    labels = craig.column("label").to_numpy()
    np.testing.assert_allclose(np.bincount(labels[sel], weights=craig.column("weight").to_numpy()[sel]),
                               np.bincount(labels), rtol=1e-4)  # CRAIG weights count every sample once
