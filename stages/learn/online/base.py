"""Selection during training: what the trainer asks of a selector, and what it offers back.

A `Selector` decides, step by step, which samples the next optimiser step trains on and
with which loss weights. The trainer (`stages.learn.trainer.train_classifier`) calls
`selector.batches(epoch, view)` once per epoch and takes one SGD step per yielded
`Batch`. Because `batches` is a generator it resumes after each step, so a selector
sees the model as it is now through `view` (a forward without gradients, or the
model itself). Offline subsets and full data are the `Static` selector; the online
methods (per-batch selectors, adaptive coresets, CREST) live beside this module.

Budgets: a selector given `fraction` b backpropagates about b * N samples per epoch,
like a static subset of b * N samples trained for the same number of epochs, so that
verify compares methods at equal backpropagation cost (forwards spent on choosing
are counted in `stats()` and in the measured training time).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.nn import functional as F


@dataclass
class Batch:
    rows: np.ndarray  # int64 positions into the training arrays
    weights: np.ndarray | None = None  # per-sample loss weights; None = 1


@dataclass
class Probe:
    """The current model on some rows, float32 numpy: per-sample loss, softmax, penultimate features."""
    losses: np.ndarray
    probs: np.ndarray
    feats: np.ndarray


class ModelView:
    """What a selector may ask of the model being trained.

    `probe(rows)` runs the model in eval mode without gradients and counts the rows in
    `forwards` (the selection's extra cost). `inputs(rows)` gives the normalised,
    device-resident inputs and labels for selectors that need gradients (CREST).
    """

    def __init__(self, model, x: torch.Tensor, y: torch.Tensor, *, prepare, device: torch.device,
                 num_classes: int, batch_size: int, epochs: int, seed: int, autocast=None):
        self.model, self._x, self._y, self._prepare = model, x, y, prepare
        self.device, self.num_classes = device, num_classes
        self.batch_size, self.epochs, self.seed = batch_size, epochs, seed
        self.labels = y.cpu().numpy()
        self.n = len(self.labels)
        self.forwards = 0
        self._autocast = autocast or contextlib.nullcontext

    def inputs(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(np.asarray(rows, np.int64), device=self._x.device)
        return self._prepare(self._x[idx]), self._y[idx].to(self.device)

    @torch.no_grad()
    def probe(self, rows: np.ndarray, chunk: int = 1024) -> Probe:
        rows = np.asarray(rows, np.int64)
        was_training = self.model.training
        self.model.eval()
        losses, probs, feats = [], [], []
        for i in range(0, len(rows), chunk):
            xb, yb = self.inputs(rows[i:i + chunk])
            with self._autocast():
                h = self.model.features(xb)
                logits = self.model.head(h).float()
            losses.append(F.cross_entropy(logits, yb, reduction="none").cpu())
            probs.append(torch.softmax(logits, 1).cpu())
            feats.append(h.float().flatten(1).cpu())
        self.model.train(was_training)
        self.forwards += len(rows)
        if not losses:
            return Probe(np.zeros(0, np.float32), np.zeros((0, self.num_classes), np.float32), np.zeros((0, 0), np.float32))
        return Probe(torch.cat(losses).numpy(), torch.cat(probs).numpy(), torch.cat(feats).numpy())


class Selector(ABC):
    """Base class: implement `batches`. `setup` runs once before the first epoch."""

    name = "selector"
    streams = True  # False: an epoch's batches are fixed when it starts (the trainer lists them)

    def setup(self, view: ModelView) -> None:
        self.rng = np.random.default_rng(view.seed)

    @abstractmethod
    def batches(self, epoch: int, view: ModelView) -> Iterator[Batch]:
        """The epoch's batches, one per optimiser step."""

    def steps_per_epoch(self, view: ModelView) -> int | None:
        """Steps `batches` yields per epoch where known up front (a per-step lr schedule uses it)."""
        return None

    def stats(self) -> dict:
        return {}


def shuffled_batches(rows: np.ndarray, weights: np.ndarray | None, batch_size: int,
                     rng: np.random.Generator) -> Iterator[Batch]:
    """One pass over `rows` in a random order, `batch_size` at a time (the last batch may be short)."""
    order = rng.permutation(len(rows))
    for i in range(0, len(rows), batch_size):
        pick = order[i:i + batch_size]
        yield Batch(rows[pick], None if weights is None else weights[pick])


class Static(Selector):
    """A fixed training set: all samples (rows None) or a subset with optional weights."""

    name = "static"
    streams = False

    def __init__(self, rows: np.ndarray | None = None, weights: np.ndarray | None = None):
        self.rows, self.weights = rows, weights

    def setup(self, view: ModelView) -> None:
        super().setup(view)
        if self.rows is None:
            self.rows = np.arange(view.n)
        self.rows = np.asarray(self.rows, np.int64)
        if self.weights is not None:
            self.weights = np.asarray(self.weights, np.float32)

    def batches(self, epoch: int, view: ModelView) -> Iterator[Batch]:
        yield from shuffled_batches(self.rows, self.weights, view.batch_size, self.rng)
