"""score stage on digits with planted label noise: the scores must find the flipped samples."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.errors import CurateError
from stages.kernels.scores.dynamics import auroc
from tests.helpers import plant_label_noise, rerecord

METHODS = ["el2n", "grand", "forgetting", "loss", "margin", "knn_shapley", "prototype", "influence"]


@pytest.fixture(scope="module")
def noisy(tmp_path_factory, digits_catalog):
    """Digits with 10% of training labels flipped (seeded); returns catalog and flipped keys."""
    return plant_label_noise(digits_catalog, tmp_path_factory.mktemp("noisy") / "cat")


@pytest.fixture(scope="module")
def scored(noisy, tmp_path_factory):
    from pipeline.catalog import Catalog
    from pipeline.config import load_config
    from pipeline.runner import Runner
    from tests.helpers import fast_config

    cat, flipped = noisy
    cfg = load_config(fast_config(tmp_path_factory.mktemp("run") / "r", embed={"epochs": 6, "seeds": 2},
                                  score={"methods": METHODS, "el2n_epoch": 2}))
    runner = Runner(cfg, Catalog.load(cat))
    runner.write_run_json()
    for unit in ("index", "embed", "score"):
        runner.run(unit)
    return runner, flipped


def test_validation_holdout_is_stratified_and_out_of_the_pool(scored):
    runner, _ = scored
    pool = pq.read_table(runner.run_dir / "index" / "index.parquet")
    val = pq.read_table(runner.run_dir / "index" / "val.parquet")
    assert pool.num_rows + val.num_rows == 1438 and val.num_rows == 144
    assert not set(pool.column("key").to_pylist()) & set(val.column("key").to_pylist())
    assert pool.column("row").to_pylist() == list(range(pool.num_rows))
    counts = np.bincount(np.asarray(val.column("label")), minlength=10)
    assert counts.min() >= 12 and counts.max() <= 17
    assert np.load(runner.run_dir / "embed" / "val_embeddings.npy").shape == (144, 128)


def test_scores_detect_flipped_labels(scored):
    runner, flipped = scored
    t = pq.read_table(runner.run_dir / "score" / "scores.parquet")
    assert t.column_names == ["row", "uid"] + [f"score_{m}" for m in METHODS]
    keys = [u.split("/", 1)[1] for u in t.column("uid").to_pylist()]
    is_flipped = np.array([k in flipped for k in keys])
    assert 100 < is_flipped.sum() < 190
    aurocs = {m: auroc(np.asarray(t.column(f"score_{m}")), is_flipped) for m in METHODS}
    for m in ("knn_shapley", "influence"):  # values: low = suspicious
        aurocs[m] = auroc(-np.asarray(t.column(f"score_{m}")), is_flipped)
    (runner.run_dir / "aurocs.json").write_text(json.dumps(aurocs))
    for m in ("el2n", "loss", "margin", "forgetting", "grand", "knn_shapley"):
        assert aurocs[m] > 0.85, aurocs  # a score unrelated to the noise sits near 0.5 (+- 0.03 here)
    # influence on the (itself noisy) validation loss is a weaker detector, but clearly informative
    assert aurocs["influence"] > 0.6, aurocs
    lowest = np.argsort(np.asarray(t.column("score_knn_shapley")))[: int(0.1 * len(keys))]
    assert is_flipped[lowest].mean() > 0.6


def test_scores_are_deterministic(scored, noisy, tmp_path):
    from pipeline.catalog import Catalog
    from pipeline.runner import Runner

    runner, _ = scored
    again = Runner(runner.cfg, Catalog.load(noisy[0]), tmp_path / "again")
    for unit in ("index", "embed", "score"):
        again.run(unit)
    assert (tmp_path / "again" / "score" / "scores.parquet").read_bytes() == \
        (runner.run_dir / "score" / "scores.parquet").read_bytes()


def test_nan_embeddings_are_a_clear_error(scored):
    runner, _ = scored
    emb_path = runner.run_dir / "embed" / "embeddings.npy"
    emb = np.load(emb_path)
    bad = emb.copy()
    bad[7, 3] = np.nan
    np.save(emb_path, bad)
    rerecord(runner.run_dir / "embed")  # as if embed had produced the NaN
    try:
        with pytest.raises(CurateError, match="embeddings row 7 is NaN or infinite"):
            runner.run("score", force=True)
    finally:
        np.save(emb_path, emb)
        rerecord(runner.run_dir / "embed")


def test_holdout_refuses_a_class_with_one_sample():
    import pyarrow as pa

    from pipeline.manifest import COMMON_SCHEMA
    from stages.index import holdout

    labels = [0] * 10 + [1] * 10 + [2]
    n = len(labels)
    t = pa.table({"row": list(range(n)), "uid": [f"d/{i}" for i in range(n)], "key": [str(i) for i in range(n)],
                  "shard": ["s.tar"] * n, "offset": list(range(n)), "label": labels, "caption": [None] * n},
                 schema=COMMON_SCHEMA)
    with pytest.raises(CurateError, match="class 2 has one training sample"):
        holdout(t, 0.1, 0)
    train, val = holdout(t.slice(0, 20), 0.1, 0)
    assert val.num_rows == 2 and sorted(val.column("label").to_pylist()) == [0, 1]
    assert train.column("row").to_pylist() == list(range(18))


def test_resnet18_proxy_features():
    import torch

    from stages.learn.models import build_model, proxy_arch

    assert proxy_arch("auto", 28) == "small_cnn" and proxy_arch("auto", 32) == "resnet18"
    m = build_model("resnet18", (3, 32, 32), 10)
    x = torch.randn(2, 3, 32, 32)
    assert m.features(x).shape == (2, 512) and m(x).shape == (2, 10)
