"""ZCA whitening for distillation in a whitened pixel space.

Trajectory matching (MTT, KIP) distils ZCA-whitened images: whitening flattens the pixel
spectrum, so the few synthetic images spend their capacity on edges and shapes rather than on
the dominant low-frequency directions, and experts train faster on it. The synthetic images
then live in the whitened space and must be mapped back (`invert_zca`) to be saved or viewed.

ZCA is W = U diag(1 / sqrt(lambda + eps)) U^T for the eigen decomposition U diag(lambda) U^T
of the feature covariance: the whitening closest to the identity, so whitened images still
look like images. eps regularises the small eigenvalues (noise directions) instead of
blowing them up; it is added to the eigenvalues as it is (the MTT setting, eps = 0.1). The
decomposition runs in float64; the results come back in the input's dtype and device.
"""

from __future__ import annotations

import torch


def _eig(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if x.ndim < 2 or len(x) < 2:
        raise ValueError(f"zca: need at least 2 samples [N, ...], got shape {tuple(x.shape)}")
    if eps < 0:
        raise ValueError(f"zca: eps must be >= 0, got {eps}")
    f = x.reshape(len(x), -1).to(torch.float64)
    mean = f.mean(0)
    c = f - mean
    cov = c.T @ c / len(f)
    lam, u = torch.linalg.eigh(cov)
    lam = lam.clamp_min(0)
    d = lam + eps
    if not bool((d > 0).all()):
        raise ValueError("zca: the covariance is singular; use eps > 0")
    return mean, u, d


def fit_zca(x: torch.Tensor, eps: float = 0.1, *, return_inverse: bool = False):
    """Fit on samples x [N, ...] (flattened to [N, D]): returns (mean [D], W [D, D]), or
    (mean, W, W_inv) with return_inverse=True. W and W_inv are symmetric."""
    mean, u, d = _eig(x, eps)
    dt = x.dtype if x.is_floating_point() else torch.float32
    out = (mean.to(x.device, dt), ((u * d.rsqrt()) @ u.T).to(x.device, dt))
    if return_inverse:
        return out + (((u * d.sqrt()) @ u.T).to(x.device, dt),)
    return out


def apply_zca(x: torch.Tensor, mean: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Whiten x [N, ...] (the shape of the fitted samples); differentiable, shape kept."""
    f = x.reshape(len(x), -1)
    f = f if f.is_floating_point() else f.to(mean.dtype)
    return ((f - mean.to(f.dtype)) @ w.to(f.dtype)).reshape(x.shape)


def invert_zca(z: torch.Tensor, mean: torch.Tensor, w_inv: torch.Tensor) -> torch.Tensor:
    """Map whitened z back to the original space: z @ W_inv + mean, shape kept."""
    f = z.reshape(len(z), -1)
    return (f @ w_inv.to(f.dtype) + mean.to(f.dtype)).reshape(z.shape)
