"""Contrastive (CLIP) training of a small open_clip model on image-caption pairs.

Uint8 images and tokens go to the device once; each epoch is a seeded permutation of the
pairs. Loss: symmetric InfoNCE over the batch with the model's learnable temperature
(logit scale clamped at 100, as in open_clip's trainer). AdamW, weight decay on matrices
and embeddings only (not on gains, biases or the temperature). Deterministic for a seed
on a given device and thread count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from pipeline.errors import CurateError

from stages.learn.augment import crop_flip, draw_crop_flip
from stages.learn.trainer import TrainingLoop, autocast_for, normalise
from stages.learn.clip.model import prepare_images

MAX_LOGIT_SCALE = math.log(100.0)
AUGMENTS = ("none", "crop", "crop_flip")


@dataclass(frozen=True)
class ClipRecipe:
    """How to train. Schedule: one cycle per step, a linear warm-up from 0 to `lr` over the
    first `pct_start` of all steps, then a cosine decay to 0 (the warm-up keeps the fresh
    transformers and the temperature from blowing up at lr 1e-3). augment: `none`, `crop`
    (per-sample shift within a `crop_pad`-pixel black border) or `crop_flip` (that and a
    horizontal flip; not for digits or letters). bf16 autocast applies on CUDA only."""
    epochs: int = 15
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.1
    pct_start: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    bf16: bool = True
    augment: str = "none"
    crop_pad: int = 2

    def lr_at(self, step: int, total: int) -> float:
        warm = max(1, round(self.pct_start * total))
        if step < warm:
            return self.lr * (step + 1) / warm
        return 0.5 * self.lr * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: pair i's image should pick caption i among the batch, and back."""
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    logits = logit_scale.float().exp() * img @ txt.T
    target = torch.arange(len(img), device=img.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def _param_groups(model, weight_decay: float) -> list[dict]:
    """Decay only matrices and embeddings (ndim >= 2), open_clip's rule."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "logit_scale" not in name else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """One epoch of row indices; a last batch of one pair (no negatives) is dropped."""
    perm = torch.randperm(n, generator=gen)
    out = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    return [b for b in out if len(b) >= 2]


def train_clip(model, images: np.ndarray, tokens: torch.Tensor, *, recipe: ClipRecipe | None = None, seed: int,
               device: torch.device, progress=None) -> dict:
    """Train `model` (an open_clip.CLIP) in place on pairs (images[i], tokens[i]).

    images: uint8 [N, C, H, W], C = 1 or 3, H x W the model's image size; tokens: [N, context]
    from `tokenize`. Returns wall seconds, steps, epochs, samples (pairs backpropagated),
    final_loss (last step) and epoch_loss (mean per epoch). `progress(1)` after each epoch.
    """
    recipe = recipe or ClipRecipe()
    images = np.asarray(images)
    n = len(images)
    if n < 2:
        raise CurateError(f"clip training needs at least 2 image-caption pairs, got {n}")
    if images.dtype != np.uint8 or images.ndim != 4:
        raise CurateError(f"clip training takes uint8 images [N, C, H, W], got {images.dtype} {images.shape}")
    if len(tokens) != n:
        raise CurateError(f"clip training: {n} images but {len(tokens)} captions")
    if tuple(images.shape[2:]) != tuple(model.visual.image_size):
        raise CurateError(f"clip training: images are {images.shape[2]}x{images.shape[3]}, "
                          f"the model takes {model.visual.image_size[0]}x{model.visual.image_size[1]}")
    if tokens.shape[1] != model.context_length:
        raise CurateError(f"clip training: tokens have context {tokens.shape[1]}, the model {model.context_length}")
    if recipe.batch_size < 2:
        raise CurateError(f"clip training: batch_size must be at least 2 (a pair needs negatives), got {recipe.batch_size}")
    if recipe.augment not in AUGMENTS:
        raise CurateError(f"clip training: unknown augment '{recipe.augment}' ({', '.join(AUGMENTS)})")

    model.to(device).train()
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    t = torch.as_tensor(tokens, dtype=torch.long).to(device)
    order_gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator().manual_seed(seed + 1)
    autocast = autocast_for(device, recipe.bf16)
    opt = torch.optim.AdamW(_param_groups(model, recipe.weight_decay), lr=recipe.lr, betas=recipe.betas,
                            eps=recipe.eps)
    per_epoch = n // recipe.batch_size + (n % recipe.batch_size >= 2)
    total = per_epoch * recipe.epochs
    loop, epoch_loss = TrainingLoop(recipe.epochs, device, progress=progress), []
    for _ in loop:
        running = torch.zeros((), device=device)
        batches = _batches(n, recipe.batch_size, order_gen)
        for rows in batches:
            loop.set_lr(opt, recipe.lr_at(loop.steps, total))
            idx = rows.to(device)
            xb = x[idx]
            if recipe.augment != "none":
                draw = draw_crop_flip(len(rows), recipe.crop_pad, aug_gen, flip=recipe.augment == "crop_flip")
                xb = crop_flip(normalise(xb), *draw, pad=recipe.crop_pad)
            xb = prepare_images(xb)
            with autocast():
                img, txt = model.encode_image(xb), model.encode_text(t[idx])
            running += loop.step(opt, clip_loss(img, txt, model.logit_scale), len(rows))
            with torch.no_grad():
                model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        epoch_loss.append(float(running) / max(1, len(batches)))
    return {**loop.result(), "samples": loop.samples, "epoch_loss": epoch_loss}
