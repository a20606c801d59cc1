"""The shared trainer: coreset weights act as sample multiplicities."""

import numpy as np
import pytest
import torch
from torch import nn

from stages.learn.trainer import train_classifier


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


def test_crop_flip_moves_pixels_without_inventing_any():
    """Each augmented image is its source shifted by at most 4 px (black comes in) and maybe mirrored."""
    from stages.learn.trainer import augment_batch

    def crop_flip(x, gen):
        return augment_batch(x, "crop_flip", gen)

    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6) + 1
    out = crop_flip(x, torch.Generator().manual_seed(3))
    assert out.shape == x.shape
    for i in range(2):
        padded = torch.nn.functional.pad(x[i], (4, 4, 4, 4), value=-1.0)  # black in [-1, 1]
        options = [padded[:, dy:dy + 6, dx:dx + 6] for dy in range(9) for dx in range(9)]
        options += [o.flip(-1) for o in options]
        assert any(torch.equal(out[i], o) for o in options)
    assert not torch.equal(out, x) or not torch.equal(crop_flip(x, torch.Generator().manual_seed(4)), x)


def test_mlp_recipe_trains_on_float_feature_rows():
    """Embedding inputs: float rows are used as they are (no pixel scaling); planted classes are learnt."""
    from stages.learn.models import build_model
    from stages.learn.trainer import Recipe, accuracy

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (4, 32)).astype(np.float32)
    y = rng.integers(0, 4, 800)
    x = centres[y] + rng.normal(0, 0.5, (800, 32)).astype(np.float32)
    torch.manual_seed(0)
    model = build_model("mlp", (32,), 4, 64)
    train_classifier(model, x[:600], y[:600], recipe=Recipe(epochs=5, batch_size=32, lr=0.05), seed=0,
                     device=torch.device("cpu"))
    assert accuracy(model, x[600:], y[600:], device=torch.device("cpu")) > 0.95


def test_energy_meter_reads_nothing_without_a_gpu():
    from pipeline.energy import EnergyMeter

    assert EnergyMeter(torch.device("cpu")).read() is None


def test_step_schedule_matches_the_reference_recipe():
    """lr 0.01, x0.1 at epoch 10 of 20 (the reference script); cosine decays to zero."""
    from stages.learn.trainer import Recipe

    r = Recipe(epochs=20, lr=0.01, schedule="step", milestones=(10,))
    assert r.lr_at(0, 0.0) == r.lr_at(9, 0.99) == 0.01 and r.lr_at(10, 0.0) == pytest.approx(0.001)
    c = Recipe(epochs=4, lr=0.1)
    assert c.lr_at(0, 0.0) == pytest.approx(0.1) and c.lr_at(2, 0.0) == pytest.approx(0.05) and c.lr_at(3, 0.999) < 1e-3
