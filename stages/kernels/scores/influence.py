"""Influence of each training sample on the validation loss, for the last layer
(Koh & Liang 2017, restricted to the proxy's final linear layer with the exact Hessian).

With h~ = [h, 1] and per-sample gradient g_i = (p_i - y_i) (x) h~_i of the cross-entropy
w.r.t. the head's weights and bias, the Hessian of the mean training loss is
H = mean_i (diag(p_i) - p_i p_i^T) (x) h~_i h~_i^T, exact for that layer. Softmax makes
it singular along one direction per feature, hence the damping.

score_i = g_val^T (H + damping * I)^{-1} g_i, where g_val is the mean validation
gradient: removing sample i raises the validation loss by about score_i / N, so high
= helpful and mislabelled samples go negative.
"""

from __future__ import annotations

import numpy as np
import torch

from stages.kernels.gradients import bias_gradients_torch


def _aug(h: np.ndarray) -> torch.Tensor:
    h = torch.as_tensor(h, dtype=torch.float64)
    return torch.cat([h, torch.ones(len(h), 1, dtype=torch.float64)], 1)


def last_layer_hessian(probs: np.ndarray, feats: np.ndarray, block: int = 4096) -> torch.Tensor:
    """Exact Hessian [C(D+1), C(D+1)] of the mean CE loss w.r.t. the head (weights + bias)."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    h = _aug(feats)
    n, c = p.shape
    d = h.shape[1]
    acc = torch.zeros(c * c, d * d, dtype=torch.float64)
    for s in range(0, n, block):
        pb, hb = p[s:s + block], h[s:s + block]
        a = torch.diag_embed(pb) - pb[:, :, None] * pb[:, None, :]  # [B, C, C]
        b = hb[:, :, None] * hb[:, None, :]  # [B, D, D]
        acc += a.reshape(len(pb), -1).T @ b.reshape(len(pb), -1)
    # acc[(c, c'), (d, e)] -> H[(c, d), (c', e)]
    return (acc.reshape(c, c, d, d).permute(0, 2, 1, 3).reshape(c * d, c * d)) / n


def influence_last_layer(probs: np.ndarray, labels: np.ndarray, feats: np.ndarray,
                         val_probs: np.ndarray, val_labels: np.ndarray, val_feats: np.ndarray,
                         damping: float = 0.01, max_bytes: int = 8 << 30) -> np.ndarray:
    """score_i = g_val^T (H + damping I)^{-1} g_i for every training sample, float64 [N]."""
    c = probs.shape[1]
    dim = c * (feats.shape[1] + 1)
    if 3 * dim * dim * 8 > max_bytes:
        from pipeline.errors import CurateError

        raise CurateError(f"score influence: the last-layer Hessian is {dim} x {dim} ({3 * dim * dim * 8 / 2**30:.1f} GiB "
                          f"to build and solve); too large for {c} classes x {feats.shape[1]}-d features")
    hv = _aug(val_feats)
    rv = bias_gradients_torch(torch.as_tensor(val_probs, dtype=torch.float64), val_labels)
    g_val = (rv.T @ hv / len(rv)).reshape(-1)  # mean validation gradient, [C * (D+1)]
    hess = last_layer_hessian(probs, feats)
    v = torch.linalg.solve(hess + damping * torch.eye(len(hess), dtype=torch.float64), g_val).reshape(c, -1)
    r = bias_gradients_torch(torch.as_tensor(probs, dtype=torch.float64), labels)
    return ((r @ v) * _aug(feats)).sum(1).numpy()
