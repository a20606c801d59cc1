"""The proxy network: a small CNN trained for a few epochs over one or more seeds,
recording per-epoch training dynamics for the scores.
"""

from __future__ import annotations

import numpy as np
import torch

from stages.learn.models import build_model, seeded_init
from stages.learn.trainer import features_and_probs, train_classifier


def train_proxy(images: np.ndarray, labels: np.ndarray, *, num_classes: int, epochs: int, seeds: int,
                width: int, batch_size: int, lr: float, seed: int, device: torch.device, arch: str = "small_cnn",
                extra_images: np.ndarray | None = None, progress=None) -> dict:
    """Train `seeds` proxies; returns

    feats [N, D], extra_feats and extra_probs (penultimate features and softmax of seed 0's
    final model on the training and the extra images),
    probs [S, E, N, C] float16 softmax per seed and epoch, hnorm [S, E, N] float32 norms of
    the penultimate features (for GraNd), seconds (training time, all seeds).
    """
    n = len(labels)
    probs = np.zeros((seeds, epochs, n, num_classes), np.float16)
    hnorm = np.zeros((seeds, epochs, n), np.float32)
    seconds, first = 0.0, None
    for s in range(seeds):
        model = seeded_init(seed + s, lambda: build_model(arch, images.shape[1:], num_classes, width=width))

        def record(epoch: int, s=s, model=model):
            h, p = features_and_probs(model, images, device=device)
            probs[s, epoch] = p
            hnorm[s, epoch] = np.linalg.norm(h, axis=1)

        fit = train_classifier(model, images, labels, epochs=epochs, batch_size=batch_size, lr=lr,
                               seed=seed + s, device=device, on_epoch_end=record, progress=progress)
        seconds += fit["seconds"]
        if first is None:
            first = model
    feats, _ = features_and_probs(first, images, device=device)
    extra = features_and_probs(first, extra_images, device=device) if extra_images is not None else (None, None)
    return {"feats": feats, "extra_feats": extra[0], "extra_probs": extra[1], "probs": probs, "hnorm": hnorm,
            "seconds": seconds}
