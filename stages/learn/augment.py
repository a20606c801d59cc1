"""Differentiable Siamese Augmentation (DSA; Zhao & Bilen, ICML 2021).

Distillation compares how a network sees real and synthetic images. Augmenting both keeps
the synthetic images from over-fitting one view of the data, but only if (a) the two batches
get the *same* random transform ("siamese"), so the comparison is between like and like, and
(b) the transform is differentiable in the pixels, so the matching loss reaches the synthetic
images through it. So sampling the random parameters is split from applying them:

    p = sample_params(len(real), kinds, gen)
    loss = match(net(apply(real, p)), net(apply(syn, take(p, len(syn)))))

Parameters are a dict of tensors whose leading dim is the batch size (per-sample mode) or 1
(one set shared by every sample, applicable to a batch of any size). Kinds, applied in a fixed
order whatever order they are listed in (colour, then flip, then one affine warp for
crop/scale/rotate, then cutout):

    color   brightness offset U(-0.5, 0.5), saturation x U(0, 2), contrast x U(0.5, 1.5)
    flip    horizontal, p = 0.5 (exact, by indexing)
    crop    translation by up to 1/8 of the size each way (zeros shifted in)
    scale   x U(0.8, 1.2) per axis
    rotate  U(-15, 15) degrees
    cutout  a square of half the side (a quarter of the area) set to 0, centre uniform

The classifier and CLIP trainers' crop lives here too (`crop_flip`: a per-sample shift within
a black border and a horizontal flip, by indexing), with its draws (`draw_crop_flip`).

Images are normalised floats [B, C, H, W] ([-1, 1] here, so 0 is mid-grey). Parameters are
drawn on `gen`'s device (CPU by default) and then moved, so they are the same for a seed on
any device. grid_sample's backward on CUDA accumulates with atomics: gradients there are
deterministic only up to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.nn import functional as F

from pipeline.methods import DSA_DEFAULT as DEFAULT_KINDS
from pipeline.methods import DSA_KINDS as KINDS

BRIGHTNESS = 1.0      # offset ~ U(-BRIGHTNESS / 2, BRIGHTNESS / 2)
SATURATION = 2.0      # factor ~ U(0, SATURATION)
CONTRAST = 0.5        # factor ~ U(1 - CONTRAST, 1 + CONTRAST)
CROP = 0.125          # shift ~ U(-CROP, CROP) of the size
SCALE = 0.2           # factor ~ U(1 - SCALE, 1 + SCALE) per axis
ROTATE_DEG = 15.0     # angle ~ U(-ROTATE_DEG, ROTATE_DEG)
CUTOUT = 0.5          # side of the cut square, as a fraction of the image side

# the keys each kind puts in a parameter dict
KEYS = {"color": ("brightness", "saturation", "contrast"), "crop": ("translate",), "cutout": ("cutout",),
        "flip": ("flip",), "scale": ("scale",), "rotate": ("rotate",)}


def parse_kinds(kinds: str | Sequence[str] | None) -> list[str]:
    """'color_crop_flip' (or a list) -> ['color', 'crop', 'flip']; '', 'none' or None -> []."""
    if kinds is None:
        return []
    parts = kinds.split("_") if isinstance(kinds, str) else list(kinds)
    parts = [k.strip().lower() for k in parts if k and k.strip().lower() != "none"]
    bad = [k for k in parts if k not in KINDS]
    if bad:
        raise ValueError(f"dsa: unknown augmentation kind(s) {bad}; known: {list(KINDS)}")
    return list(dict.fromkeys(parts))


def sample_params(batch_size: int, kinds: str | Sequence[str] = DEFAULT_KINDS, gen: torch.Generator | None = None,
                  device: torch.device | str | None = None, *, per_sample: bool = True) -> dict[str, torch.Tensor]:
    """Random parameters for `kinds`: one set per sample (leading dim `batch_size`) or, with
    per_sample=False, one set shared by the whole batch (leading dim 1, applicable to any
    batch size: the siamese choice when real and synthetic batches differ in size).

    Deterministic for `gen`'s state; the draws follow the fixed kind order, so listing the
    kinds differently gives the same parameters."""
    wanted = set(parse_kinds(kinds))
    n = batch_size if per_sample else 1
    if n < 1:
        raise ValueError(f"dsa: batch_size must be >= 1, got {batch_size}")
    gdev = gen.device if gen is not None else torch.device("cpu")

    def u(*shape: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=gen, device=gdev)

    p: dict[str, torch.Tensor] = {}
    if "color" in wanted:
        p["brightness"] = u(n, lo=-BRIGHTNESS / 2, hi=BRIGHTNESS / 2)
        p["saturation"] = u(n, lo=0.0, hi=SATURATION)
        p["contrast"] = u(n, lo=1 - CONTRAST, hi=1 + CONTRAST)
    if "flip" in wanted:
        p["flip"] = u(n) < 0.5
    if "crop" in wanted:
        p["translate"] = u(n, 2, lo=-CROP, hi=CROP)             # (dy, dx), fractions of the size
    if "scale" in wanted:
        p["scale"] = u(n, 2, lo=1 - SCALE, hi=1 + SCALE)         # (sy, sx)
    if "rotate" in wanted:
        p["rotate"] = u(n, lo=-ROTATE_DEG, hi=ROTATE_DEG) * (math.pi / 180)   # radians
    if "cutout" in wanted:
        p["cutout"] = u(n, 2)                                    # centre (cy, cx), fractions of the size
    return {k: v.to(device) for k, v in p.items()} if device is not None else p


def take(params: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """The parameters for the first `n` samples (shared parameters pass through): per-sample
    parameters drawn for the larger of two batches then serve both, sample i matching sample i."""
    out = {}
    for k, v in params.items():
        if len(v) != 1 and len(v) < n:
            raise ValueError(f"dsa: parameter {k!r} has {len(v)} rows, cannot take {n}")
        out[k] = v if len(v) == 1 else v[:n]
    return out


def _rows(v: torch.Tensor, b: int, name: str) -> torch.Tensor:
    if len(v) not in (1, b):
        raise ValueError(f"dsa: parameter {name!r} has {len(v)} rows for a batch of {b} "
                         "(use per_sample=False, or take(params, n))")
    return v


def apply(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Apply the transforms in `params` to a float batch [B, C, H, W], differentiably in x.

    The same params applied to two batches transform them identically (siamese); params
    with leading dim 1 apply to a batch of any size."""
    if x.ndim != 4:
        raise ValueError(f"dsa: expected images [B, C, H, W], got shape {tuple(x.shape)}")
    known = {k for ks in KEYS.values() for k in ks}
    unknown = set(params) - known
    if unknown:
        raise ValueError(f"dsa: unknown parameter(s) {sorted(unknown)}")
    b, _, h, w = x.shape
    dt, dev = x.dtype, x.device

    def get(name: str) -> torch.Tensor:
        return _rows(params[name], b, name).to(dev)

    def col(v: torch.Tensor) -> torch.Tensor:      # [n] -> [n, 1, 1, 1]
        return v.to(dt).view(-1, 1, 1, 1)

    if "brightness" in params:
        x = x + col(get("brightness"))
    if "saturation" in params:
        m = x.mean(dim=1, keepdim=True)
        x = (x - m) * col(get("saturation")) + m
    if "contrast" in params:
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - m) * col(get("contrast")) + m
    if "flip" in params:
        x = torch.where(get("flip").view(-1, 1, 1, 1), x.flip(3), x)
    if any(k in params for k in ("translate", "scale", "rotate")):
        x = _warp(x, params, get)
    if "cutout" in params:
        c = get("cutout").to(dt)
        x = x * _cutout_keep(c, h, w, dt, dev)
    return x


def _warp(x: torch.Tensor, params: dict, get) -> torch.Tensor:
    """One bilinear resample for translate/scale/rotate. theta maps output to input
    coordinates in [-1, 1]: input = translate + scale * rotate(output)."""
    b, _, h, w = x.shape
    n = max(len(params[k]) for k in ("translate", "scale", "rotate") if k in params)
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    if "rotate" in params:
        a = get("rotate").to(x.dtype)
        cos, sin = torch.cos(a), torch.sin(a)
        rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)   # [n, 2, 2]
        theta[:, :, :2] = rot.expand(n, 2, 2)
    if "scale" in params:
        s = get("scale").to(x.dtype)                             # (sy, sx); grid rows are (x, y)
        theta[:, :, :2] = theta[:, :, :2] * s.flip(-1)[:, :, None]
    if "translate" in params:
        t = get("translate").to(x.dtype)                         # (dy, dx) as fractions; [-1, 1] spans 2
        theta[:, :, 2] = 2 * t.flip(-1)
    theta = theta.expand(b, 2, 3)
    grid = F.affine_grid(theta, [b, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _cutout_keep(centre: torch.Tensor, h: int, w: int, dt: torch.dtype, dev: torch.device) -> torch.Tensor:
    """[n, 1, H, W] mask, 0 inside a (CUTOUT * H) x (CUTOUT * W) square around each centre
    (clipped at the border), 1 elsewhere."""
    sh, sw = max(1, round(CUTOUT * h)), max(1, round(CUTOUT * w))
    ys = torch.arange(h, device=dev, dtype=dt) + 0.5
    xs = torch.arange(w, device=dev, dtype=dt) + 0.5
    in_y = (ys[None, :] - centre[:, :1] * h).abs() < sh / 2     # [n, H]
    in_x = (xs[None, :] - centre[:, 1:] * w).abs() < sw / 2     # [n, W]
    return (~(in_y[:, :, None] & in_x[:, None, :])).to(dt)[:, None]


def augment(x: torch.Tensor, kinds: str | Sequence[str] = DEFAULT_KINDS, gen: torch.Generator | None = None, *,
            per_sample: bool = True) -> torch.Tensor:
    """apply(x, sample_params(len(x), kinds, gen)): a fresh random transform of one batch."""
    if not parse_kinds(kinds):
        return x
    return apply(x, sample_params(len(x), kinds, gen, x.device, per_sample=per_sample))


# ---------------------------------------------------------------- the training crop


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last where x is laid out so (and has more than one channel), else contiguous."""
    if x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1:
        return torch.channels_last
    return torch.contiguous_format


def draw_crop_flip(n: int, pad: int, gen: torch.Generator, *, flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (shifts [n, 2] in [0, 2 pad], flips [n] bool, p = 0.5) for `crop_flip`, from `gen`
    (CPU). flip=False: no flips, but drawn all the same, so `gen` advances alike."""
    shifts, flips = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen), torch.rand(n, generator=gen) < 0.5
    return shifts, flips if flip else torch.zeros_like(flips)


def crop_flip(x: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor, pad: int, fill: float = -1.0) -> torch.Tensor:
    """Per-sample shifted crop and horizontal flip of a normalised batch [B, C, H, W]: the image
    padded by `pad` with `fill` (-1: black in [-1, 1]), cut at `shifts` (dy, dx), mirrored where
    `flips`. Exact (by indexing; no pixel is invented) and keeps x's memory format. The draws
    (`draw_crop_flip`) are the caller's, so views can be drawn for all rows at once."""
    b, _, h, w = x.shape
    shifts, flips = shifts.to(x.device), flips.to(x.device)
    xp = F.pad(x, (pad, pad, pad, pad), value=fill)
    iy = shifts[:, 0, None] + torch.arange(h, device=x.device)
    ix = shifts[:, 1, None] + torch.arange(w, device=x.device)
    ix = torch.where(flips[:, None], ix.flip(1), ix)
    bidx = torch.arange(b, device=x.device)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[bidx, iy[:, :, None], ix[:, None, :]].permute(0, 3, 1, 2)
    return out.contiguous(memory_format=memory_format_of(x))
