"""Score-based pruning kernels: keep the hardest or easiest samples, or a coverage-centric
mix of difficulties. Plain functions of numpy arrays; higher `difficulty` means harder
(callers negate value-like scores). Each returns rows in selection order (rank 0 first),
ties broken by row index.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import CurateError
from pipeline.sampling import proportional_allocation

KEEPS = ("hard", "easy", "auto")


def _check_scores(name: str, difficulty: np.ndarray, k: int) -> np.ndarray:
    d = np.asarray(difficulty, dtype=np.float64)
    if d.ndim != 1:
        raise CurateError(f"{name}: difficulty must be one score per sample, got shape {d.shape}")
    bad = ~np.isfinite(d)
    if bad.any():
        raise CurateError(f"{name}: score is NaN or infinite at row {int(np.flatnonzero(bad)[0])}")
    if isinstance(k, bool) or not 1 <= k <= len(d):
        raise CurateError(f"{name}: budget {k} must be between 1 and the dataset size ({len(d)})")
    return d


def _hardest_first(d: np.ndarray) -> np.ndarray:
    """Rows by decreasing difficulty, ties by row index (a stable sort of the negation)."""
    return np.argsort(-d, kind="stable")


def keep_hard(fraction: float, threshold: float = 0.3) -> bool:
    """Sorscher et al. 2022 ("Beyond neural scaling laws"): keep hard samples when data is
    abundant, easy ones when it is scarce. The best strategy flips from easy to hard as the
    kept fraction grows; on Fashion-MNIST a ConvNet trained on the 30% highest-EL2N samples
    beats random (92.7 vs 91.1%) while the hardest 10% collapse to 34%, so the switch lies
    below 30%: keep hard iff the kept fraction is at least `threshold` (default 0.3).
    """
    return fraction >= threshold


def difficulty_subset(difficulty: np.ndarray, labels: np.ndarray | None, k: int, *, keep: str = "hard",
                      class_balanced: bool = False, auto_threshold: float = 0.3) -> tuple[np.ndarray, str]:
    """Keep the k hardest (largest difficulty) or easiest (smallest). keep in {"hard","easy","auto"}.

    "auto" resolves with `keep_hard(k / N, auto_threshold)`. With class_balanced, k is split
    over classes in proportion to their sizes (so pruning cannot wipe out an easy class) and
    the top of each class is kept; the order is still by difficulty across the union.
    Returns (rows int64 in selection order, resolved keep: "hard"|"easy").
    """
    if keep not in KEEPS:
        raise CurateError(f"difficulty: keep must be one of {', '.join(KEEPS)}, got {keep!r}")
    d = _check_scores("difficulty", difficulty, k)
    n = len(d)
    resolved = keep if keep != "auto" else ("hard" if keep_hard(k / n, auto_threshold) else "easy")
    order = _hardest_first(d) if resolved == "hard" else np.argsort(d, kind="stable")
    if not class_balanced:
        return order[:k].astype(np.int64), resolved
    if labels is None:
        raise CurateError("difficulty: class_balanced needs labels")
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise CurateError(f"difficulty: {len(labels)} labels for {n} scores")
    if (labels < 0).any():
        raise CurateError(f"difficulty: class_balanced needs a label on every sample; "
                          f"row {int(np.flatnonzero(labels < 0)[0])} has none")
    classes, cls, counts = np.unique(labels, return_inverse=True, return_counts=True)
    alloc = proportional_allocation(counts, k)
    # rank of each ordered row within its class: group by class (stable keeps the order), count up
    cls_in_order = cls.reshape(-1)[order]
    by_class = np.argsort(cls_in_order, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(n, np.int64)
    rank[by_class] = np.arange(n) - starts[cls_in_order[by_class]]
    return order[rank < alloc[cls_in_order]].astype(np.int64), resolved


def ccs_subset(difficulty: np.ndarray, k: int, *, beta: float = 0.1, bins: int = 50, seed: int = 0) -> np.ndarray:
    """Coverage-centric coreset selection (Zheng et al. 2023, ICLR): drop the hardest beta fraction,
    split the rest's difficulty range into `bins` equal-width strata, then fill the budget stratum
    by stratum: repeatedly take the non-empty stratum with the fewest samples, give it min(its size,
    floor(remaining budget / strata left)) samples drawn at random within it.

    Why: at high pruning rates keeping only hard samples leaves the easy and medium regions
    uncovered; sampling every difficulty level keeps coverage, and dropping the very hardest
    removes likely-mislabelled samples. Small strata go first so a stratum that cannot use its
    share passes the rest on. The selection order is a random permutation of the chosen rows, so
    any prefix is a uniform sample of the coreset. Exactly k distinct rows, int64.
    """
    d = _check_scores("ccs", difficulty, k)
    if not 0.0 <= beta < 1.0:
        raise CurateError(f"ccs: beta must be in [0, 1), got {beta}")
    if isinstance(bins, bool) or int(bins) != bins or bins < 1:
        raise CurateError(f"ccs: bins must be an integer >= 1, got {bins}")
    bins = int(bins)
    n = len(d)
    n_drop = int(np.floor(beta * n + 1e-9))
    rest = np.sort(_hardest_first(d)[n_drop:])  # row order, so strata members are in row order
    if len(rest) < k:
        raise CurateError(f"ccs: beta={beta} is too large for budget k={k}: "
                          f"only {len(rest)} samples remain after dropping the hardest {n_drop}")
    dr = d[rest]
    lo, hi = dr.min(), dr.max()
    if hi > lo:
        stratum = np.minimum(((dr - lo) / (hi - lo) * bins).astype(np.int64), bins - 1)
    else:
        stratum = np.zeros(len(rest), np.int64)
    sizes = np.bincount(stratum, minlength=bins)
    nonempty = np.flatnonzero(sizes)
    visit = nonempty[np.argsort(sizes[nonempty], kind="stable")]  # fewest first, ties by stratum
    take = np.zeros(bins, np.int64)
    remaining = k
    for i, s in enumerate(visit):
        take[s] = min(sizes[s], remaining // (len(visit) - i))
        remaining -= take[s]
    for s in visit[::-1]:  # floor remainders (none when sizes ascend, kept as a guard): last strata
        extra = min(sizes[s] - take[s], remaining)
        take[s] += extra
        remaining -= extra
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(rest[stratum == s])[:take[s]] for s in visit if take[s]]
    rows = np.concatenate(chosen)
    return rows[rng.permutation(len(rows))].astype(np.int64)
