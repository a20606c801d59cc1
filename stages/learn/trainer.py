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
    """How to train: SGD with momentum, a fixed epoch count (or step count) and an lr schedule.

    `steps` set: exactly that many optimiser steps whatever the training set's size (the
    equal-steps protocol); epochs follow from it, the last one partial, and the schedule
    runs on steps: `cosine` to zero at the last step, `step` with `milestones` counted in
    steps. Otherwise `epochs` full passes with `cosine` (per step, to zero) or `step`
    (lr x `gamma` at each epoch in `milestones`). augment: `none`, `crop_flip` (random 4 px shifted crop and
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
    steps: int | None = None  # the equal-steps protocol: this many optimiser steps, `epochs` unused

    def lr_at(self, epoch: int, frac: float) -> float:
        """Learning rate at `frac` in [0, 1) through `epoch` (the fixed-epochs protocol)."""
        if self.schedule == "step":
            return self.lr * self.gamma ** sum(epoch >= m for m in self.milestones)
        return 0.5 * self.lr * (1 + math.cos(math.pi * (epoch + frac) / self.epochs))

    def lr_at_step(self, step: int) -> float:
        """Learning rate of optimiser step `step` (0-based) of `steps` (the equal-steps protocol)."""
        if self.schedule == "step":
            return self.lr * self.gamma ** sum(step >= m for m in self.milestones)
        return 0.5 * self.lr * (1 + math.cos(math.pi * step / self.steps))


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
    `seconds`. `step` takes one optimiser step and counts it (`steps`, `samples`, `last` loss,
    every step's loss for `loss_curve`). With `max_steps` the epochs go on until that many
    steps are taken (`done` tells the inner loop to stop mid-epoch); `epochs` is then only the
    planned count a selector's schedule was told."""

    def __init__(self, epochs: int, device: torch.device, *, progress=None, on_epoch_end=None,
                 max_steps: int | None = None):
        self.epochs, self.device, self.max_steps = epochs, device, max_steps
        self.progress, self.on_epoch_end = progress, on_epoch_end
        self.steps, self.samples = 0, 0
        self.last: torch.Tensor | float = float("nan")
        self.losses: list[torch.Tensor] = []  # detached, stacked once at the end (no sync per step)
        self.seconds = float("nan")
        self.epochs_run = 0

    @property
    def done(self) -> bool:
        return self.max_steps is not None and self.steps >= self.max_steps

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __iter__(self) -> Iterator[int]:
        self._sync()
        start = time.perf_counter()
        epoch = 0
        while not self.done if self.max_steps is not None else epoch < self.epochs:
            before = self.steps
            yield epoch
            if self.max_steps is not None and self.steps == before:
                raise ValueError(f"epoch {epoch} took no optimiser step: {self.max_steps} steps cannot be reached")
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch)
            if self.progress:
                self.progress(1)
            epoch += 1
        self.epochs_run = epoch
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
        self.losses.append(self.last)
        return self.last

    def loss_curve(self, parts: int = 10) -> list[float]:
        """The training loss as it went: the mean step loss over each of `parts` equal shares of
        the steps (fewer shares when there were fewer steps)."""
        if not self.losses:
            return []
        per_step = torch.stack(self.losses).float().cpu().numpy()
        return [float(c.mean()) for c in np.array_split(per_step, min(parts, len(per_step)))]

    def result(self) -> dict:
        """What both trainers return: seconds, final_loss (the last step's), steps, epochs (run),
        loss_curve."""
        return {"seconds": self.seconds, "final_loss": float(self.last), "steps": self.steps,
                "epochs": self.epochs_run, "loss_curve": self.loss_curve()}


def train_classifier(model: nn.Module, images: np.ndarray, labels: np.ndarray, *,
                     weights: np.ndarray | None = None, recipe: Recipe | None = None, seed: int,
                     device: torch.device, selector: Selector | None = None, num_classes: int | None = None,
                     progress=None, on_epoch_end=None, **recipe_fields) -> dict:
    """Train `model` in place; returns wall seconds, steps, samples backpropagated, last loss, selector stats.

    `recipe` or its fields as keywords (epochs=..., batch_size=..., lr=...). `selector`
    decides each step's samples (default: every sample, or the `weights` subset, once per
    epoch). `on_epoch_end(epoch)` runs after each epoch (the proxy records dynamics there).
    With `recipe.steps` it stops after exactly that many steps, and `epochs` in the result is
    steps / planned steps per epoch (a float: the last epoch may be partial).
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
    if recipe.steps is not None:  # the selector's schedule (re-selection epochs, progress) sees the derived epochs
        per_epoch = planned_steps_per_epoch(selector, view)
        view.epochs = math.ceil(recipe.steps / per_epoch)
    selector.setup(view)
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                          nesterov=recipe.nesterov and recipe.momentum > 0, weight_decay=recipe.weight_decay)
    loop = TrainingLoop(view.epochs, device, progress=progress, on_epoch_end=on_epoch_end, max_steps=recipe.steps)
    for epoch in loop:
        model.train()
        batches = list_or_stream(selector, epoch, view)
        total = len(batches) if isinstance(batches, list) else selector.steps_per_epoch(view)
        for b, batch in enumerate(batches):
            if loop.done:
                break
            loop.set_lr(opt, recipe.lr_at_step(loop.steps) if recipe.steps is not None
                        else recipe.lr_at(epoch, min(b / total, 1.0) if total else 0.0))
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
    out = {**loop.result(), "backprop_samples": loop.samples, "probe_samples": view.forwards, **selector.stats()}
    if recipe.steps is not None:
        out["epochs"] = round(loop.steps / per_epoch, 4)
    return out


def planned_steps_per_epoch(selector: Selector, view: ModelView) -> int:
    """Steps one epoch takes: the selector's own count where it knows one (online methods),
    else one per batch of its fixed rows (all rows before an adaptive method's first selection)."""
    known = selector.steps_per_epoch(view)
    if known:
        return int(known)
    rows = getattr(selector, "rows", None)
    return max(1, math.ceil((view.n if rows is None else len(rows)) / view.batch_size))


@torch.no_grad()
def fit_on(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, device: torch.device) -> dict:
    """How well the trained model fits its own training set, measured in one clean pass after
    training (eval mode, no augmentation, unweighted): mean cross-entropy and accuracy, and the
    classes it tells apart (ln of which is a uniform guess's loss). Unlike the running loss of
    the last epoch it is one model, not an average over a moving one."""
    logits = torch.from_numpy(predict(model, images, device=device))
    y = torch.from_numpy(np.asarray(labels, np.int64))
    return {"train_loss": float(F.cross_entropy(logits, y)), "train_acc": float((logits.argmax(1) == y).float().mean()),
            "classes": int(logits.shape[1])}


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
