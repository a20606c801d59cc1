"""The image-caption path end to end on real Fashion-MNIST pairs (1,000 train pairs, 30% of the
captions naming a wrong class): proxy CLIP embed, score_clip, clipcov / clipscore / sas
selections, verify with recipe clip (zero-shot + linear probe).

The planted noise is what the assertions read: pairs whose caption names the wrong class
must score lower, and the caption-aware selections must keep a cleaner subset than random.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.catalog import Catalog
from pipeline.config import load_config
from pipeline.errors import CurateError
from pipeline.ingest import FMNIST_CLASSES, pair_captions
from pipeline.manifest import read_parquet
from pipeline.runner import Runner

from tests.helpers import FMNIST, PAIRS_N, PAIRS_NOISE, PAIRS_SEED, files_under

pytestmark = pytest.mark.skipif(not FMNIST.exists(), reason="needs ../shared/datasets/fashion-mnist")

TINY = {"embed_dim": 32, "vision_layers": 2, "vision_width": 64, "patch": 7, "text_layers": 1, "text_width": 64,
        "context": 12, "epochs": 8, "batch_size": 128, "lr": 2e-3}
NOISE, SEED, N = PAIRS_NOISE, PAIRS_SEED, PAIRS_N  # the pairs_catalog fixture's (tests/conftest.py)


def pairs_config(run_dir, **over) -> dict:
    cfg = {"run": str(run_dir), "dataset": "fmnist-pairs", "seed": 0,
           "embed": {"method": "proxy_clip", "clip": TINY, "views": 2},
           "score": {"methods": ["clip"]},
           "select": [{"method": "clipcov", "budget": 0.3}, {"method": "clipscore", "budget": 0.3},
                      {"method": "sas", "budget": 0.3},
                      {"method": "difficulty", "score": "clip", "keep": "easy", "budget": 0.3, "name": "clip-easy"}],
           "verify": {"recipe": "clip", "seeds": 1, "clip": TINY}}
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def run(pairs_catalog, tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    r = Runner(load_config(pairs_config(tmp_path_factory.mktemp("pairs-run") / "run")), Catalog.load(pairs_catalog))
    r.write_run_json()
    for unit in r.units():
        r.run(unit)
    yield r
    torch.set_num_threads(threads)


def clean_mask(run) -> np.ndarray:
    """Which index rows have a caption naming their true class (recomputed from the labels)."""
    index = read_parquet(run.run_dir / "index" / "index.parquet", ["label", "caption"])
    labels = index.column("label").to_numpy()
    caps, cls = pair_captions(labels, FMNIST_CLASSES, NOISE, SEED)
    assert caps == index.column("caption").to_pylist()  # the index holds the generator's captions, in order
    return cls == labels


def selected_rows(run, name) -> np.ndarray:
    t = read_parquet(run.run_dir / "select" / name / "selection.parquet", ["row", "selected"])
    return t.column("row").to_numpy()[t.column("selected").to_numpy(zero_copy_only=False)]


def test_embed_writes_both_towers_and_a_reloadable_clip(run):
    import torch

    from stages.learn.clip import embed_texts, load_clip_checkpoint, tokenize

    d = run.run_dir / "embed"
    img, txt, views = (np.load(d / f) for f in ("embeddings.npy", "text_embeddings.npy", "image_views.npy"))
    for a in (img, txt, views):
        assert a.shape == (N, 32) and a.dtype == np.float16
        assert np.allclose(np.linalg.norm(a.astype(np.float32), axis=1), 1, atol=2e-3)
    assert not np.array_equal(img, views)  # the augmented-view means are not the plain embeddings
    model, arch = load_clip_checkpoint(d / "clip.safetensors")
    assert arch.embed_dim == 32 and arch.context == 12
    captions = read_parquet(run.run_dir / "index" / "index.parquet", ["caption"]).column(0).to_pylist()
    again = embed_texts(model, tokenize(captions, 12)[0], device=torch.device("cpu"))
    assert np.allclose(again, txt.astype(np.float32), atol=2e-3)  # the saved model is the one that embedded
    rec = json.loads((d / "_stage.json").read_text())
    assert rec["metrics"]["captions_truncated"] == 0


def test_score_clip_finds_the_planted_mismatches(run):
    clean = clean_mask(run)
    s = read_parquet(run.run_dir / "score" / "scores.parquet", ["score_clip"]).column(0).to_numpy()
    assert s.dtype == np.float32 and s.shape == (N,)
    # a mismatched caption sits far from its image: AUC of clean vs noisy well above chance
    ranks = np.argsort(np.argsort(s))
    auc = (ranks[clean].mean() - (clean.sum() - 1) / 2) / (~clean).sum()
    assert auc > 0.85, auc


def test_caption_aware_selections_keep_clean_pairs(run):
    clean = clean_mask(run)
    assert abs(clean.mean() - (1 - NOISE)) < 1e-9
    kept = {name: clean[selected_rows(run, name)].mean() for name in ("clipcov-0.3", "clipscore-0.3", "sas-0.3")}
    for name in kept:
        assert len(selected_rows(run, name)) == 300, name
    assert kept["clipscore-0.3"] > 0.9, kept  # the filter keeps the best-aligned pairs
    assert kept["clipcov-0.3"] > 0.9, kept  # quality pool + alignment with the class cross-covariance
    # score_clip is a value score (higher = better aligned): "easy" by it is the clip-score filter
    assert set(selected_rows(run, "clip-easy")) == set(selected_rows(run, "clipscore-0.3"))


def test_verify_reports_zero_shot_and_probe(run):
    report = json.loads((run.run_dir / "report" / "report.json").read_text())
    assert report["metric"] == "zero-shot accuracy" and report["recipe"] == "clip"
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == {"full", "clipcov-0.3", "clipscore-0.3", "sas-0.3", "clip-easy", "random-n300"}
    assert rows["full"]["acc_mean"] > 0.3  # zero-shot from 1,000 noisy pairs: far above chance (0.1)
    for r in rows.values():
        assert 0 <= r["acc_mean"] <= 1 and 0.3 < r["probe_mean"] <= 1
        assert r["samples"] == (N if r["kind"] == "full" else 300)
    md = (run.run_dir / "report" / "report.md").read_text()
    assert "zero-shot acc (%)" in md and "linear probe (%)" in md and "'a photo of a {}'" in md


def test_selections_rerun_byte_identical(run):
    for name in ("clipcov-0.3", "clipscore-0.3", "sas-0.3"):
        unit = f"select/{name}"
        before = files_under(run.run_dir / unit)
        assert run.run(unit, force=True)["status"] == "computed"
        assert files_under(run.run_dir / unit) == before, unit


def test_caption_methods_on_a_dataset_without_captions(make_runner):
    r = make_runner(select=[{"method": "clipcov", "budget": 0.1}])
    with pytest.raises(CurateError, match=r"image-text run .* dataset 'digits' declares no caption field"):
        r.run("index")  # refused before anything is trained


@pytest.mark.parametrize("over, words", [
    ({"verify": {"recipe": "clip", "online": [{"method": "crest", "budget": 0.1}]}}, "online selection trains classifiers"),
    ({"select": [{"method": "clipscore"}]}, "clipscore takes a budget or a threshold"),
    ({"verify": {"recipe": "clip", "prompts": ["a photo"]}}, "needs exactly one {}"),
    ({"verify": {"recipe": "clip", "prompts": ["a {x} {}"]}}, "needs exactly one {}"),
    ({"verify": {"recipe": "clip", "prompts": ["a {{}} photo"]}}, "needs exactly one {}"),
    ({"select": [{"method": "craig", "budget": 0.1}]}, "has coreset weights, which verify.recipe clip does not apply"),
])
def test_config_errors(tmp_path, over, words):
    with pytest.raises(CurateError, match=words.replace("{", r"\{").replace("}", r"\}")):
        load_config(pairs_config(tmp_path / "run", **over))
