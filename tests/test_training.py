"""The shared trainer: coreset weights act as sample multiplicities."""

import numpy as np
import torch
from torch import nn

from stages.training import train_classifier


def fit(images, labels, weights, seed=0):
    """A model without batch statistics (as instance-norm recipes are): batch norm would see
    repeated samples in its batch mean and variance, which a loss weight cannot reproduce."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 3))
    train_classifier(model, images, labels, weights=weights, epochs=5, batch_size=10_000, lr=0.05, seed=seed,
                     device=torch.device("cpu"))
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_integer_weights_train_like_repeated_samples():
    """Full-batch steps: sum(w l) / sum(w) over the subset is the mean loss over the samples
    repeated w times, so both runs take the same steps (up to float rounding)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 1, 8, 8), dtype=np.uint8)
    y = rng.integers(0, 3, 12)
    w = np.array([1, 3, 2, 1, 5, 1, 2, 4, 1, 1, 2, 3])
    weighted = fit(x, y, w.astype(np.float32))
    repeated = fit(np.repeat(x, w, axis=0), np.repeat(y, w), None)
    unweighted = fit(x, y, None)
    torch.testing.assert_close(weighted, repeated, rtol=1e-4, atol=1e-5)
    assert (weighted - unweighted).abs().max() > 1e-3  # the weights did change the training
