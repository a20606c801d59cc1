"""Selection kernels: plain functions of label arrays and seeds, returning row indices.

Each returns the selected rows in selection order (rank 0 first).
"""

from __future__ import annotations

import numbers

import numpy as np

from pipeline.errors import CurateError


def budget_problem(budget, *, counts: bool = True, what: str = "budget") -> str | None:
    """The one range rule for budgets: a fraction in (0, 1] or, where `counts`, a count >= 1
    (an int is a count; without `counts` every number is a fraction). None when `budget`
    obeys it, else why not, in one line that callers raise as their own error."""
    kinds = "a fraction in (0, 1] or a positive count" if counts else "a fraction in (0, 1]"
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        return f"{what} {budget!r} must be {kinds}"
    if counts and isinstance(budget, numbers.Integral):
        return None if budget >= 1 else f"{what} {budget} selects nothing: a count must be >= 1"
    if not 0.0 < budget <= 1.0:
        note = " (an integer is a count)" if counts else ""
        return f"{what} {budget} is out of range: a fraction must be in (0, 1]{note}"
    return None


def budget_count(budget: int | float, n: int) -> int:
    """A fraction in (0, 1] or a count in [1, n] -> number of samples to select."""
    problem = budget_problem(budget)
    if problem:
        raise CurateError(problem)
    if n <= 0:
        raise CurateError(f"budget {budget!r}: nothing to select from ({n} samples)")
    if isinstance(budget, numbers.Integral):
        if budget > n:
            raise CurateError(f"budget {budget} is larger than the dataset ({n} samples)")
        return int(budget)
    return max(1, int(round(budget * n)))


def random_subset(n: int, k: int, seed: int) -> np.ndarray:
    """k distinct rows of n, uniformly; smaller budgets with one seed are prefixes of larger ones."""
    return np.random.default_rng(seed).permutation(n)[:k]


def proportional_allocation(counts: np.ndarray, k: int) -> np.ndarray:
    """Split k over classes in proportion to `counts` (largest remainder, ties by class id).

    Every non-empty class gets at least one sample when k allows it; no class gets more
    than it has.
    """
    counts = np.asarray(counts, dtype=np.int64)
    total = counts.sum()
    if k > total:
        raise CurateError(f"budget {k} is larger than the dataset ({total} samples)")
    quota = counts * (k / total)
    alloc = np.floor(quota).astype(np.int64)
    floor = ((counts > 0) & (k >= (counts > 0).sum())).astype(np.int64)  # one each, if k allows
    alloc = np.maximum(alloc, floor)
    while alloc.sum() > k:  # the one-each rule overshot: take from the most over-served
        excess = np.where(alloc > floor, alloc - quota, -np.inf)
        alloc[np.argmax(excess)] -= 1
    while alloc.sum() < k:  # largest remainder first; argmax picks the lowest class id on ties
        short = np.where(alloc < counts, quota - alloc, -np.inf)
        alloc[np.argmax(short)] += 1
    return alloc


def stratified_subset(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k rows with class proportions of `labels` kept; random within each class."""
    labels = np.asarray(labels)
    if (labels < 0).any():
        raise CurateError("stratified selection needs a label on every sample")
    classes, counts = np.unique(labels, return_counts=True)
    alloc = proportional_allocation(counts, k)
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:a] for c, a in zip(classes, alloc)]
    rows = np.concatenate(chosen)
    return rows[rng.permutation(len(rows))]
