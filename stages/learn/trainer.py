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
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from stages.learn.augment import augment as dsa
from stages.learn.augment import crop_flip, draw_crop_flip, memory_format_of
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


CROP_PAD = 4  # the `crop_flip` recipe's shift, pixels each way


def augment_batch(x: torch.Tensor, augment: str, gen: torch.Generator) -> torch.Tensor:
    """The recipe's augmentation of one normalised image batch, drawn from the trainer's
    generator: `crop_flip` or `dsa:<kinds>` (`none`: x as it is). Keeps x's memory format."""
    if augment == "crop_flip":
        return crop_flip(x, *draw_crop_flip(len(x), CROP_PAD, gen), pad=CROP_PAD)
    if augment.startswith("dsa:"):
        with torch.no_grad():
            return dsa(x, augment[4:], gen).contiguous(memory_format=memory_format_of(x))
    return x


def autocast_for(device: torch.device, bf16: bool):
    if device.type == "cuda" and bf16:
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


class TrainingLoop:
    """The bookkeeping both trainers (this module's and stages.learn.clip.train's) keep around
    their epochs. Iterating yields the epoch numbers; after each epoch it calls
    `on_epoch_end(epoch)`, then `progress(1)`. The wall clock starts before the first epoch
    and stops after the last, CUDA synchronised at both ends (queued kernels are billed):
    `seconds`. `step` takes one optimiser step and counts it (`steps`, `samples`, `last` loss)."""

    def __init__(self, epochs: int, device: torch.device, *, progress=None, on_epoch_end=None):
        self.epochs, self.device = epochs, device
        self.progress, self.on_epoch_end = progress, on_epoch_end
        self.steps, self.samples = 0, 0
        self.last: torch.Tensor | float = float("nan")
        self.seconds = float("nan")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __iter__(self) -> Iterator[int]:
        self._sync()
        start = time.perf_counter()
        for epoch in range(self.epochs):
            yield epoch
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch)
            if self.progress:
                self.progress(1)
        self._sync()
        self.seconds = time.perf_counter() - start

    @staticmethod
    def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
        for g in opt.param_groups:
            g["lr"] = lr

    def step(self, opt: torch.optim.Optimizer, loss: torch.Tensor, samples: int) -> torch.Tensor:
        """Backpropagate `loss` over `samples` samples and step `opt`; returns the loss, detached."""
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        self.steps += 1
        self.samples += samples
        self.last = loss.detach()
        return self.last

    def result(self) -> dict:
        """What both trainers return: seconds, final_loss (the last step's), steps, epochs."""
        return {"seconds": self.seconds, "final_loss": float(self.last), "steps": self.steps, "epochs": self.epochs}


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
    loop = TrainingLoop(recipe.epochs, device, progress=progress, on_epoch_end=on_epoch_end)
    for epoch in loop:
        model.train()
        batches = list_or_stream(selector, epoch, view)
        total = len(batches) if isinstance(batches, list) else selector.steps_per_epoch(view)
        for b, batch in enumerate(batches):
            loop.set_lr(opt, recipe.lr_at(epoch, min(b / total, 1.0) if total else 0.0))
            xb, yb = view.inputs(batch.rows)
            if xb.ndim == 4:
                xb = augment_batch(xb, recipe.augment, aug_gen)
            with autocast():
                out = model(xb)
            per = F.cross_entropy(out.float(), yb, reduction="none")
            if batch.weights is None:
                loss = per.mean()
            else:
                wb = torch.as_tensor(batch.weights, dtype=torch.float32, device=device)
                loss = (per * wb).sum() / wb.sum()
            loop.step(opt, loss, len(batch.rows))
    return {**loop.result(), "backprop_samples": loop.samples, "probe_samples": view.forwards, **selector.stats()}


def list_or_stream(selector: Selector, epoch: int, view: ModelView):
    """An epoch fixed at its start is materialised (so a per-step schedule knows its length);
    selectors that look at the model between steps stream."""
    it = selector.batches(epoch, view)
    return it if selector.streams else list(it)


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, *, device: torch.device, batch_size: int = 1024) -> np.ndarray:
    """Logits for every image, float32 [N, C]."""
    model.to(device).eval()
    x = torch.from_numpy(np.ascontiguousarray(images))
    out = [model(normalise(x[i:i + batch_size].to(device))).float().cpu() for i in range(0, len(x), batch_size)]
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
