"""Training kernels: one SGD loop for the proxy embedder, verify and the online selectors.

Inputs are uint8 images [N, C, H, W] (scaled to [-1, 1]) or float feature rows [N, D]
(used as they are). Weighted training minimises sum(w_i * loss_i) / sum(w_i) per batch,
so coreset weights act as sample multiplicities. What each step trains on comes from a
`Selector` (stages.learn.online): a fixed set by default. Deterministic for a seed on a given
device and thread count.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from stages.learn.online.base import ModelView, Selector, Static


@dataclass(frozen=True)
class Recipe:
    """How to train: SGD with momentum, a fixed epoch count and an lr schedule.

    schedule: `cosine` (per step, to zero) or `step` (lr x `gamma` at each epoch in
    `milestones`). augment: `none`, `crop_flip` (random 4 px shifted crop and
    horizontal flip, per sample) or `dsa:<kinds>` (stages.learn.augment, per sample, e.g.
    `dsa:color_crop_flip`: how distilled sets are evaluated). bf16 and channels_last apply on CUDA only.
    """
    epochs: int
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: tuple[int, ...] = field(default_factory=tuple)
    gamma: float = 0.1
    augment: str = "none"
    bf16: bool = True
    channels_last: bool = True

    def lr_at(self, epoch: int, frac: float) -> float:
        """Learning rate at `frac` in [0, 1) through `epoch`."""
        if self.schedule == "step":
            return self.lr * self.gamma ** sum(epoch >= m for m in self.milestones)
        return 0.5 * self.lr * (1 + math.cos(math.pi * (epoch + frac) / self.epochs))


def normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float in [-1, 1]; float inputs pass through."""
    if x.dtype == torch.uint8:
        return x.float().div_(127.5).sub_(1.0)
    return x.float()


def crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4, fill: float = -1.0) -> torch.Tensor:
    """Random shifted crop and horizontal flip, per sample, of a normalised image batch; the
    border comes in as `fill` (-1: black in [-1, 1]). Keeps x's memory format."""
    b, _, h, w = x.shape
    shifts = torch.randint(0, 2 * pad + 1, (b, 2), generator=gen).to(x.device)
    flips = (torch.rand(b, generator=gen) < 0.5).to(x.device)
    xp = F.pad(x, (pad, pad, pad, pad), value=fill)
    iy = shifts[:, 0, None] + torch.arange(h, device=x.device)
    ix = shifts[:, 1, None] + torch.arange(w, device=x.device)
    ix = torch.where(flips[:, None], ix.flip(1), ix)
    bidx = torch.arange(b, device=x.device)[:, None, None]
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1 else torch.contiguous_format
    return xp.permute(0, 2, 3, 1)[bidx, iy[:, :, None], ix[:, None, :]].permute(0, 3, 1, 2).contiguous(memory_format=fmt)


def dsa_augment(x: torch.Tensor, kinds: str, gen: torch.Generator) -> torch.Tensor:
    """DSA transforms of one normalised batch, drawn from the trainer's generator."""
    from stages.learn.augment import augment

    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1 else torch.contiguous_format
    with torch.no_grad():
        return augment(x, kinds, gen).contiguous(memory_format=fmt)


def autocast_for(device: torch.device, bf16: bool):
    if device.type == "cuda" and bf16:
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def train_classifier(model: nn.Module, images: np.ndarray, labels: np.ndarray, *,
                     weights: np.ndarray | None = None, recipe: Recipe | None = None, seed: int,
                     device: torch.device, selector: Selector | None = None, num_classes: int | None = None,
                     progress=None, on_epoch_end=None, **recipe_fields) -> dict:
    """Train `model` in place; returns wall seconds, steps, samples backpropagated, last loss, selector stats.

    `recipe` or its fields as keywords (epochs=..., batch_size=..., lr=...). `selector`
    decides each step's samples (default: every sample, or the `weights` subset, once per
    epoch). `on_epoch_end(epoch)` runs after each epoch (the proxy records dynamics there).
    """
    recipe = recipe or Recipe(**recipe_fields)
    n = len(labels)
    if n == 0:
        raise ValueError("cannot train on an empty set")
    if selector is None:
        selector = Static(None, weights)
    elif weights is not None:
        raise ValueError("pass weights to the selector, not beside it")
    cuda = device.type == "cuda"
    fmt = torch.channels_last if (cuda and recipe.channels_last and np.ndim(images) == 4) else torch.contiguous_format
    model.to(device, memory_format=fmt)
    # uint8 images are small: keep them on the device once instead of copying each batch
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
    aug_gen = torch.Generator().manual_seed(seed + 1)
    autocast = autocast_for(device, recipe.bf16)

    def prepare(xb: torch.Tensor) -> torch.Tensor:
        return normalise(xb).contiguous(memory_format=fmt) if xb.ndim == 4 else normalise(xb)

    view = ModelView(model, x, y, prepare=prepare, device=device,
                     num_classes=num_classes or int(np.max(labels)) + 1, batch_size=recipe.batch_size,
                     epochs=recipe.epochs, seed=seed, autocast=autocast)
    selector.setup(view)
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                          nesterov=recipe.nesterov and recipe.momentum > 0, weight_decay=recipe.weight_decay)
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    last, steps, seen = float("nan"), 0, 0
    for epoch in range(recipe.epochs):
        model.train()
        batches = list_or_stream(selector, epoch, view)
        total = len(batches) if isinstance(batches, list) else selector.steps_per_epoch(view)
        for b, batch in enumerate(batches):
            for g in opt.param_groups:
                g["lr"] = recipe.lr_at(epoch, min(b / total, 1.0) if total else 0.0)
            xb, yb = view.inputs(batch.rows)
            if recipe.augment == "crop_flip" and xb.ndim == 4:
                xb = crop_flip(xb, aug_gen)
            elif recipe.augment.startswith("dsa:") and xb.ndim == 4:
                xb = dsa_augment(xb, recipe.augment[4:], aug_gen)
            with autocast():
                out = model(xb)
            per = F.cross_entropy(out.float(), yb, reduction="none")
            if batch.weights is None:
                loss = per.mean()
            else:
                wb = torch.as_tensor(batch.weights, dtype=torch.float32, device=device)
                loss = (per * wb).sum() / wb.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            seen += len(batch.rows)
            last = loss.detach()
        if on_epoch_end is not None:
            on_epoch_end(epoch)
        if progress:
            progress(1)
    if cuda:
        torch.cuda.synchronize(device)
    return {"seconds": time.perf_counter() - start, "final_loss": float(last), "steps": steps, "epochs": recipe.epochs,
            "backprop_samples": seen, "probe_samples": view.forwards, **selector.stats()}


def list_or_stream(selector: Selector, epoch: int, view: ModelView):
    """An epoch fixed at its start is materialised (so a per-step schedule knows its length);
    selectors that look at the model between steps stream."""
    it = selector.batches(epoch, view)
    return it if selector.streams else list(it)


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, *, device: torch.device, batch_size: int = 1024,
            features: bool = False) -> np.ndarray:
    """Logits (or penultimate features) for every image, float32 [N, D]."""
    model.to(device).eval()
    x = torch.from_numpy(np.ascontiguousarray(images))
    fn = model.features if features else model
    out = [fn(normalise(x[i:i + batch_size].to(device))).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


@torch.no_grad()
def features_and_probs(model: nn.Module, images: np.ndarray, *, device: torch.device,
                       batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features [N, D] and softmax outputs [N, C] in one pass (float32)."""
    model.to(device).eval()
    x = torch.from_numpy(np.ascontiguousarray(images))
    feats, probs = [], []
    for i in range(0, len(x), batch_size):
        h = model.features(normalise(x[i:i + batch_size].to(device)))
        feats.append(h.float().cpu())
        probs.append(torch.softmax(model.head(h).float(), 1).cpu())
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, device: torch.device) -> float:
    logits = predict(model, images, device=device)
    return float((logits.argmax(1) == np.asarray(labels)).mean())
