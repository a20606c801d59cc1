"""Training-dynamics scores from a proxy run recorded per epoch.

Inputs are per-epoch arrays over the training set: `probs` [E, N, C] softmax outputs,
`labels` [N], and where needed the penultimate features `feats` [N, D]. Higher score =
harder / more informative, for every function here.
"""

from __future__ import annotations

import numpy as np

from stages.kernels.gradients import bias_gradients


def el2n(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Paul et al. 2021: ||softmax - onehot||_2 at one epoch; probs [N, C] (or [S, N, C], averaged over S seeds)."""
    p = probs if probs.ndim == 3 else probs[None]
    return np.linalg.norm(bias_gradients(p, labels), axis=-1).mean(0)


def loss(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Cross-entropy of the true class."""
    return -np.log(np.clip(probs[np.arange(len(labels)), labels], eps, None))


def margin(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Largest other-class probability minus true-class probability (high = misclassified)."""
    true = probs[np.arange(len(labels)), labels]
    other = probs.copy()
    other[np.arange(len(labels)), labels] = -np.inf
    return other.max(1) - true


def forgetting(correct: np.ndarray) -> np.ndarray:
    """Toneva et al. 2019: learned-then-forgotten events over epochs; correct is bool [E, N].

    Samples never classified correctly rank as most forgettable: they get E (more
    than any sample can be forgotten, which is at most floor(E / 2)).
    """
    c = np.asarray(correct, bool)
    events = (c[:-1] & ~c[1:]).sum(0).astype(np.float32)
    events[~c.any(0)] = c.shape[0]
    return events


def grand_last_layer(probs: np.ndarray, labels: np.ndarray, feats: np.ndarray) -> np.ndarray:
    """GraNd (Paul et al.) restricted to the last linear layer, in closed form.

    The loss gradient w.r.t. (W, b) of the head is ((p - y) h^T, p - y), whose norm is
    ||p - y|| * sqrt(||h||^2 + 1). probs [N, C] or [S, N, C] with feats [N, D] or [S, N, D].
    """
    p = probs if probs.ndim == 3 else probs[None]
    h = feats if feats.ndim == 3 else feats[None]
    g = np.linalg.norm(bias_gradients(p, labels), axis=-1)
    return (g * np.sqrt((h.astype(np.float64) ** 2).sum(-1) + 1.0)).mean(0)


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for detecting `positives` (ties count half)."""
    from scipy.stats import rankdata

    pos = np.asarray(positives, bool)
    n_pos, n_neg = pos.sum(), (~pos).sum()
    if n_pos == 0 or n_neg == 0:
        raise ValueError("auroc needs both positives and negatives")
    r = rankdata(scores)
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
