"""Training kernels: plain functions of uint8 image tensors, labels and weights.

Used by the proxy embedder and by verify, so that both train the same way. Weighted
training minimises sum(w_i * loss_i) / sum(w_i) per batch, so coreset weights act as
sample multiplicities. Deterministic for a seed on a given device and thread count.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float in [-1, 1]."""
    return x.float().div_(127.5).sub_(1.0)


def train_classifier(model: nn.Module, images: np.ndarray, labels: np.ndarray, *,
                     weights: np.ndarray | None = None, epochs: int, batch_size: int, lr: float,
                     seed: int, device: torch.device, progress=None, on_epoch_end=None) -> dict:
    """SGD (momentum 0.9, nesterov, wd 5e-4) with a cosine schedule; returns wall seconds and last loss.

    `on_epoch_end(epoch)` runs after each epoch (the proxy records training dynamics there).
    """
    n = len(labels)
    if n == 0:
        raise ValueError("cannot train on an empty set")
    x = torch.from_numpy(np.ascontiguousarray(images))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    w = torch.tensor(np.asarray(weights if weights is not None else np.ones(n)), dtype=torch.float32)
    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps_per_epoch = max(1, -(-n // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    last = float("nan")
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n, generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * batch_size:(b + 1) * batch_size]
            xb = normalise(x[idx].to(device, non_blocking=True))
            yb, wb = y[idx].to(device), w[idx].to(device)
            loss = (F.cross_entropy(model(xb), yb, reduction="none") * wb).sum() / wb.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            last = loss.item()
        if on_epoch_end is not None:
            on_epoch_end(epoch)
        if progress:
            progress(1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"seconds": time.perf_counter() - start, "final_loss": last}


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
