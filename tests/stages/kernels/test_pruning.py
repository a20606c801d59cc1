"""Pruning kernels: difficulty top-k (hard / easy / auto, class-balanced) and CCS."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import CurateError
from stages.kernels.coresets.pruning import ccs_subset, difficulty_subset, keep_hard
from pipeline.sampling import proportional_allocation


def test_hard_and_easy_are_the_top_and_bottom_k_in_order():
    d = np.random.default_rng(0).random(1000)
    rows, keep = difficulty_subset(d, None, 100, keep="hard")
    assert keep == "hard" and rows.dtype == np.int64
    np.testing.assert_array_equal(rows, np.argsort(-d)[:100])
    rows, keep = difficulty_subset(d, None, 100, keep="easy")
    assert keep == "easy"
    np.testing.assert_array_equal(rows, np.argsort(d)[:100])


def test_ties_are_broken_by_row_index():
    d = np.array([1.0, 0.0, 1.0, 0.0, 1.0, 2.0])
    np.testing.assert_array_equal(difficulty_subset(d, None, 3, keep="hard")[0], [5, 0, 2])
    np.testing.assert_array_equal(difficulty_subset(d, None, 2, keep="easy")[0], [1, 3])
    flat = np.zeros(50)
    np.testing.assert_array_equal(difficulty_subset(flat, None, 5)[0], np.arange(5))


def test_class_balanced_takes_proportional_counts_and_the_top_of_each_class():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], [500, 300, 200])
    rng.shuffle(labels)
    d = rng.random(1000)
    for keep in ("hard", "easy"):
        rows, resolved = difficulty_subset(d, labels, 101, keep=keep, class_balanced=True)
        assert resolved == keep and len(rows) == 101 and len(set(rows)) == 101
        alloc = proportional_allocation(np.array([500, 300, 200]), 101)
        np.testing.assert_array_equal(np.bincount(labels[rows], minlength=3), alloc)
        sign = -1 if keep == "hard" else 1
        for c in range(3):
            members = np.flatnonzero(labels == c)
            top = members[np.argsort(sign * d[members])[:alloc[c]]]
            assert set(rows[labels[rows] == c]) == set(top)
        # selection order is by difficulty across the union
        assert np.all(np.diff(sign * d[rows]) >= 0)


def test_auto_picks_easy_when_scarce_and_hard_when_abundant():
    d = np.random.default_rng(2).random(1000)
    rows, keep = difficulty_subset(d, None, 100, keep="auto")
    assert keep == "easy"
    np.testing.assert_array_equal(rows, np.argsort(d)[:100])
    rows, keep = difficulty_subset(d, None, 500, keep="auto")
    assert keep == "hard"
    np.testing.assert_array_equal(rows, np.argsort(-d)[:500])
    assert not keep_hard(0.1) and keep_hard(0.3) and keep_hard(0.5)
    assert difficulty_subset(d, None, 100, keep="auto", auto_threshold=0.05)[1] == "hard"


def test_planted_hard_class():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(10), 100)
    d = rng.normal(size=1000) + 5.0 * (labels == 3)  # class 3 is the only hard one
    rows, _ = difficulty_subset(d, labels, 100, keep="hard")
    assert (labels[rows] == 3).mean() >= 0.9
    rows, _ = difficulty_subset(d, labels, 100, keep="hard", class_balanced=True)
    np.testing.assert_array_equal(np.bincount(labels[rows], minlength=10), np.full(10, 10))


def test_difficulty_errors():
    d = np.zeros(20)
    d[12] = np.nan
    with pytest.raises(CurateError, match="row 12"):
        difficulty_subset(d, None, 5)
    with pytest.raises(CurateError, match="keep"):
        difficulty_subset(np.zeros(20), None, 5, keep="medium")
    with pytest.raises(CurateError, match="labels"):
        difficulty_subset(np.zeros(20), None, 5, class_balanced=True)
    with pytest.raises(CurateError, match="row 4"):
        difficulty_subset(np.zeros(6), np.array([0, 1, 0, 1, -1, 0]), 2, class_balanced=True)
    with pytest.raises(CurateError, match="budget"):
        difficulty_subset(np.zeros(6), None, 7)


def _bimodal(seed: int = 0):
    """95% of samples near difficulty 0, 5% (rows 9500..) near 1."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(0.0, 0.05, 9500), rng.normal(1.0, 0.05, 500)])


def test_ccs_exact_distinct_and_never_the_hardest():
    d = _bimodal()
    for k in (1, 7, 333, 1000, 4000):
        rows = ccs_subset(d, k, beta=0.01, seed=0)
        assert rows.dtype == np.int64 and len(rows) == k and len(np.unique(rows)) == k
        hardest = np.argsort(-d, kind="stable")[:100]
        assert not np.isin(rows, hardest).any()
    # the whole remainder when the budget equals it; bins=1 is a plain random sample of it
    rows = ccs_subset(d, 9900, beta=0.01)
    assert set(rows) == set(np.argsort(-d, kind="stable")[100:])
    assert len(np.unique(ccs_subset(d, 500, beta=0.3, bins=1))) == 500


def test_ccs_covers_the_rare_mode():
    d = _bimodal()
    rows = ccs_subset(d, 1000, beta=0.01, seed=0)
    rare = (rows >= 9500).mean()
    assert rare >= 3 * 0.05  # random sampling of k keeps ~5% from the rare mode


def test_ccs_is_deterministic_for_a_seed():
    d = _bimodal()
    a, b = ccs_subset(d, 500, seed=4), ccs_subset(d, 500, seed=4)
    np.testing.assert_array_equal(a, b)
    assert set(ccs_subset(d, 500, seed=5)) != set(a)


def test_ccs_errors():
    d = np.random.default_rng(0).random(100)
    with pytest.raises(CurateError, match=r"beta=0.5.*k=60.*50"):
        ccs_subset(d, 60, beta=0.5)
    with pytest.raises(CurateError, match="beta"):
        ccs_subset(d, 10, beta=1.0)
    with pytest.raises(CurateError, match="bins"):
        ccs_subset(d, 10, bins=0)
    d[3] = np.nan
    with pytest.raises(CurateError, match="row 3"):
        ccs_subset(d, 10)
    d[3] = 0.5
    d[7] = np.inf  # an infinite score would break the strata; it is named instead
    with pytest.raises(CurateError, match="ccs: score is NaN or infinite at row 7"):
        ccs_subset(d, 10)
