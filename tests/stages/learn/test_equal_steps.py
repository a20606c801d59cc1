"""The trainer's equal-steps protocol: exactly `steps` optimiser steps whatever the set's size or
selector, the lr schedule on steps; and the fit it reports on its own training set."""

import math

import numpy as np
import pytest
import torch

from stages.learn.trainer import Recipe, fit_on, predict, train_classifier

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: threads only add overhead


@pytest.fixture
def counted_steps(monkeypatch):
    """Every SGD step taken, with the lr it used: counted at the optimiser, not by the trainer."""
    lrs = []
    real = torch.optim.SGD.step

    def step(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    return lrs


def data(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8), rng.integers(0, 3, n)


def model():
    """A body and a head (online selectors probe features): two small hidden layers."""
    from stages.learn.models import build_model

    torch.manual_seed(0)
    return build_model("mlp", (1, 8, 8), 3, width=16)


@pytest.mark.parametrize("n, weighted", [(1000, False), (130, True), (7, False)])
def test_every_set_size_gets_exactly_the_steps(counted_steps, n, weighted):
    """1000 samples: 32 batches an epoch, so 100 steps are 3 epochs and 4 of a 4th; 7 samples:
    one batch an epoch, 100 epochs."""
    x, y = data(n)
    w = np.linspace(0.5, 2, n).astype(np.float32) if weighted else None
    fit = train_classifier(model(), x, y, weights=w, recipe=Recipe(epochs=99, steps=100, batch_size=32),
                           seed=0, device=CPU)
    per_epoch = math.ceil(n / 32)
    assert len(counted_steps) == fit["steps"] == 100
    assert fit["epochs"] == pytest.approx(100 / per_epoch, abs=1e-4)
    full, part = divmod(100, per_epoch)
    assert fit["backprop_samples"] == full * n + part * 32  # whole epochs, then `part` full batches


def test_fixed_epochs_still_follow_the_set_size(counted_steps):
    x, y = data(130)
    fit = train_classifier(model(), x, y, recipe=Recipe(epochs=3, batch_size=32), seed=0, device=CPU)
    assert len(counted_steps) == fit["steps"] == 3 * 5 and fit["epochs"] == 3


@pytest.mark.parametrize("method, opts", [("uniform", {}), ("craig", {"every": 1, "kappa": 0.5}), ("crest", {})])
def test_online_selectors_take_exactly_the_steps(counted_steps, method, opts):
    """Per-batch, adaptive (its subset epochs are shorter than the warm-start ones) and CREST."""
    from stages.learn.online import make_selector

    x, y = data(400)
    fit = train_classifier(model(), x, y, recipe=Recipe(epochs=1, steps=37, batch_size=16), seed=0, device=CPU,
                           selector=make_selector(method, 0.25, **opts), num_classes=3)
    assert len(counted_steps) == fit["steps"] == 37


def test_step_schedule_counts_milestones_in_steps(counted_steps):
    x, y = data(50)
    train_classifier(model(), x, y, recipe=Recipe(epochs=1, steps=30, batch_size=16, lr=0.1, schedule="step",
                                                   milestones=(10, 25), gamma=0.5), seed=0, device=CPU)
    assert counted_steps == pytest.approx([0.1] * 10 + [0.05] * 15 + [0.025] * 5)


def test_cosine_schedule_reaches_zero_at_the_last_step(counted_steps):
    x, y = data(50)
    train_classifier(model(), x, y, recipe=Recipe(epochs=1, steps=20, batch_size=16, lr=0.2, schedule="cosine"),
                     seed=0, device=CPU)
    want = [0.1 * (1 + math.cos(math.pi * s / 20)) for s in range(20)]
    assert counted_steps == pytest.approx(want)


def test_loss_curve_has_a_mean_per_tenth_of_the_steps():
    x, y = data(200)
    fit = train_classifier(model(), x, y, recipe=Recipe(epochs=1, steps=40, batch_size=20, lr=0.05), seed=0,
                           device=CPU)
    curve = fit["loss_curve"]
    assert len(curve) == 10 and all(np.isfinite(curve))
    assert curve[-1] < curve[0]  # random pixels are memorised a little even in 40 steps


def test_fit_on_is_the_clean_loss_and_accuracy_on_the_training_set():
    x, y = data(300)
    m = model()
    train_classifier(m, x, y, recipe=Recipe(epochs=5, batch_size=32), seed=0, device=CPU)
    got = fit_on(m, x, y, device=CPU)
    logits = predict(m, x, device=CPU).astype(np.float64)
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    assert got["train_loss"] == pytest.approx(-logp[np.arange(len(y)), y].mean(), rel=1e-5)
    assert got["train_acc"] == pytest.approx(float((logits.argmax(1) == y).mean()))
    assert 0.34 < got["train_acc"] < 1  # it learnt something of its random labels, not all


def test_a_selector_without_batches_cannot_loop_forever():
    from stages.learn.online.base import Selector

    class Empty(Selector):
        def batches(self, epoch, view):
            return iter(())

    x, y = data(20)
    with pytest.raises(ValueError, match="took no optimiser step: 5 steps cannot be reached"):
        train_classifier(model(), x, y, recipe=Recipe(epochs=1, steps=5), seed=0, device=CPU, selector=Empty())
