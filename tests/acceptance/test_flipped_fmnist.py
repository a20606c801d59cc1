"""Acceptance on real data (slow, ~5 min on 2 cores): 10% of Fashion-MNIST labels flipped."""

import importlib.util

import pytest

from tests.helpers import FMNIST, REPO


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.exists(), reason="shared Fashion-MNIST not present")
def test_scores_find_flipped_fashion_mnist_labels(tmp_path):
    spec = importlib.util.spec_from_file_location("flipped_labels", REPO / "bench" / "flipped_labels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.run_flipped(str(FMNIST), tmp_path, epochs=4)
    assert r["knn_recall_lowest10"] >= 0.80, r
    for m in ("el2n", "forgetting", "loss", "margin", "grand", "knn_shapley"):
        assert r["auroc"][m] >= 0.9, r  # an uninformative score sits near 0.5
