"""Content features: what an image's pixels are, with no model, for exact and near-exact dedup.

An image becomes a 16 x 16 grey thumbnail (area average), centred and scaled to unit norm, so the
cosine of two thumbnails is the Pearson correlation of their pixels (a perceptual-hash-like
feature, kept real-valued so that a threshold can be chosen): a few grey levels of noise, a
re-encode, a change of brightness or contrast leave it near 1, while two different photographs
of the same kind of object, whose shapes differ, stay below it. No model is involved.

A one-pixel translation moves a small image's thumbnail far (a 28 x 28 image shifted by one
pixel correlates at 0.5-0.9 with itself), so the thumbnail is taken of the image's centre (its
one-pixel border left out) and `shifted_thumbnails` also gives the thumbnails of that window
moved by one pixel in each of the 8 directions, at the image's stored resolution. A copy
translated by one pixel, whatever fills its new edge, holds the original's centre exactly in
one of its moved windows: that view correlates at 1 with the original's thumbnail.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import CurateError

THUMB = 16  # thumbnail side: 256 features per image
# (dy, dx) of the views shifted_thumbnails returns, the unshifted one first
SHIFTS = ((0, 0),) + tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights, for RGB to grey


def _grey(images, device) -> torch.Tensor:
    """uint8 [B, C, H, W] -> grey float32 [B, 1, H, W] on device."""
    x = images.to(device) if torch.is_tensor(images) else torch.tensor(np.asarray(images), device=device)
    if x.ndim != 4 or x.dtype != torch.uint8:
        raise CurateError(f"content features: images must be uint8 [N, C, H, W], got {tuple(x.shape)} {x.dtype}")
    x = x.float()
    if x.shape[1] >= 3:  # RGB (an alpha channel, if any, left out)
        return (x[:, :3] * torch.tensor(_LUMA, device=device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return x.mean(1, keepdim=True)


def _unit(t: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 1, H, W] -> [B, size * size]: area-averaged, centred, unit norm. A flat image (no
    contrast at all) gets the constant unit vector: every flat image matches every other one
    and none of the rest (a centred vector sums to zero, so it is orthogonal to them)."""
    f = F.adaptive_avg_pool2d(t, (size, size)).flatten(1)
    f = f - f.mean(1, keepdim=True)
    norm = f.norm(dim=1, keepdim=True)
    flat = (norm <= 1e-3)[:, 0]  # grey levels 0..255: 1e-3 is no contrast at all
    f = f / norm.clamp(min=1e-12)
    f[flat] = 1.0 / size
    return f


def _window(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """The image's centre (one-pixel border left out) moved by (dy, dx)."""
    h, w = x.shape[-2:]
    if h < 3 or w < 3:
        raise CurateError(f"content features: images must be at least 3 x 3 px, got {h} x {w}")
    return x[:, :, 1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx]


def thumbnails(images, *, size: int = THUMB, device="cpu") -> torch.Tensor:
    """Content features float32 [B, size * size] (unit rows) of uint8 images [B, C, H, W]."""
    return _unit(_window(_grey(images, device), 0, 0), size)


def shifted_thumbnails(images, *, size: int = THUMB, device="cpu") -> torch.Tensor:
    """float32 [len(SHIFTS), B, size * size]: the thumbnails of each image's centre window moved by
    the (dy, dx) of SHIFTS, in pixels of the image (view 0 is `thumbnails`)."""
    x = _grey(images, device)
    return torch.stack([_unit(_window(x, dy, dx), size) for dy, dx in SHIFTS])
