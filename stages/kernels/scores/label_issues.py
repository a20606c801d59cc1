"""Label issues by confident learning (Northcutt et al. 2021) on out-of-fold probabilities.

Why out-of-fold: a model that trained on a sample has partly learnt its given label, wrong or
not, so its own probabilities hide the error. Each sample's probabilities must come from a
model that never saw it: `stratified_folds` splits the pool, the caller trains one model per
fold on the rest (stages.score), and the functions here only read the resulting [N, C] matrix.

The rule, per class j: the threshold t_j is the mean probability of class j over the samples
labelled j (the model's typical self-confidence there). A class is *confident* for a sample
when its probability reaches that class's threshold; the sample's likely true class is its most
probable confident class. A sample is an issue when that class exists and is not its given
label, and the model's top prediction is not the given label either (a sample the model still
ranks first under its own label is never flagged).
"""

from __future__ import annotations

import numpy as np


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold id in [0, k) per sample: each class's samples shuffled (seeded) and dealt round-robin,
    continuing across classes, so every fold holds about 1/k of every class and of the pool."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
                           or [np.zeros(0, np.int64)])
    folds = np.empty(len(labels), np.int64)
    folds[order] = np.arange(len(order)) % k
    return folds


def class_thresholds(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """t_j = mean of probs[i, j] over the samples labelled j; +inf for a class nobody carries
    (it is never confident: there is no self-confidence to compare with)."""
    n, c = probs.shape
    counts = np.bincount(labels, minlength=c).astype(np.float64)
    sums = np.bincount(labels, weights=probs[np.arange(n), labels].astype(np.float64), minlength=c)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.inf)


def find_label_issues(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(issue mask [N] bool, likely true class [N] int64, -1 where no class is confident)."""
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels, np.int64)
    t = class_thresholds(probs, labels)
    confident = probs >= t[None, :]
    likely = np.where(confident.any(1), np.where(confident, probs, -1.0).argmax(1), -1)
    issue = (likely >= 0) & (likely != labels) & (probs.argmax(1) != labels)
    return issue, likely


def label_issue_score(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """float32 [N], higher = more likely mislabelled: 1 - p(given label), the out-of-fold
    self-confidence turned around. It ranks every sample (top-k, AUROC, `clean` with a
    fraction); which samples are flagged is `find_label_issues`' answer, not a cut on it."""
    self_conf = np.asarray(probs, np.float64)[np.arange(len(labels)), np.asarray(labels, np.int64)]
    return (1.0 - self_conf).astype(np.float32)
