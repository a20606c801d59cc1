"""Per-batch online selection: the score kernels, the epoch generator, AdaSelection's weights."""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from stages.learn.models import build_model
from stages.learn.online.base import Probe
from stages.learn.online.per_batch import (BASELINES, AdaBoostWeights, AdaSelection, PerBatch, coreset_center,
                                     coreset_cover, grad_norm, keep_count, last_layer_gram, make_per_batch,
                                     top_k)
from stages.learn.trainer import Recipe, train_classifier


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * (255 / 16)).astype(np.uint8)[:, None]
    return x, d.target.astype(np.int64)


def batch(losses, num_classes=3, seed=0):
    """A candidate batch around given losses: probs, feats, labels, rows."""
    rng = np.random.default_rng(seed)
    n = len(losses)
    return (np.asarray(losses, np.float32), rng.dirichlet(np.ones(num_classes), n), rng.normal(size=(n, 4)),
            rng.integers(0, num_classes, n), np.arange(n))


class FakeView:
    """A ModelView stand-in whose probe gives loss = row id, recording what was probed."""

    def __init__(self, n=50, batch_size=8, epochs=2, seed=0, nan=False):
        self.n, self.batch_size, self.epochs, self.seed, self.num_classes = n, batch_size, epochs, seed, 3
        self.labels = np.arange(n) % 3
        self.probed, self.nan, self.forwards = [], nan, 0

    def probe(self, rows):
        self.probed.append(np.array(rows))
        self.forwards += len(rows)
        losses = np.where(self.nan, np.nan, rows).astype(np.float32)
        return Probe(losses, np.full((len(rows), 3), 1 / 3, np.float32), np.zeros((len(rows), 2), np.float32))


# ---------------------------------------------------------------- kernels


def test_big_and_small_loss_keep_the_extreme_losses_of_a_batch():
    losses = [0.1, 2.0, 0.5, 3.0, 1.0, 0.2]
    assert set(PerBatch("big_loss", 0.5).select(*batch(losses), k=3)) == {3, 1, 4}
    assert set(PerBatch("small_loss", 0.5).select(*batch(losses), k=3)) == {0, 5, 2}
    assert [keep_count(m, 0.25) for m in (64, 6, 2, 1)] == [16, 2, 1, 1]  # max(1, round(b * m))


def test_grad_norm_and_gram_match_autograd_on_a_linear_head():
    torch.manual_seed(0)
    head = torch.nn.Linear(5, 4)
    h, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 1, 0])
    grads = []
    for i in range(6):
        head.zero_grad()
        F.cross_entropy(head(h[i:i + 1]), y[i:i + 1]).backward()
        grads.append(torch.cat([head.weight.grad.flatten(), head.bias.grad]).clone())
    g = torch.stack(grads).double().numpy()
    probs = torch.softmax(head(h), 1).detach().numpy()
    np.testing.assert_allclose(grad_norm(probs, y.numpy(), h.numpy()), np.linalg.norm(g, axis=1), rtol=1e-5)
    np.testing.assert_allclose(last_layer_gram(probs, y.numpy(), h.numpy()), g @ g.T, rtol=1e-4, atol=1e-6)


def test_coreset_cover_picks_one_sample_of_each_planted_cluster_first():
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 5.0]])
    cluster = rng.permutation(np.repeat([0, 1, 2], [12, 5, 3]))
    g = centers[cluster] + 0.01 * rng.normal(size=(len(cluster), 3))
    scores = coreset_cover(g @ g.T, k=3)
    assert sorted(cluster[top_k(scores, 3)]) == [0, 1, 2]
    assert len(set(scores)) == len(scores)  # a full order, first pick highest
    center = coreset_center(g @ g.T)
    np.testing.assert_allclose(center, -np.linalg.norm(g - g.mean(0), axis=1), atol=1e-6)


def test_adaboost_weights_rise_for_misclassified_samples():
    boost = AdaBoostWeights(10, num_classes=10)
    rows, correct = np.arange(6), np.array([True, True, True, True, False, False])
    alpha = boost.update(rows, correct)
    w = boost.scores(np.arange(10))
    assert alpha > 0 and (w[4:6] > 1).all() and (w[:4] < 1).all() and (w[6:] == 1).all()
    boost.update(rows, correct)
    assert (boost.scores(rows[4:]) > w[4:6]).all()  # misclassified again: higher still
    # a selector keeps the samples misclassified on their earlier visit
    sel = PerBatch("adaboost", 0.5)
    losses, probs, feats, _, rows = batch(np.ones(6))
    wrong = (probs.argmax(1) + 1) % 3
    sel.select(losses, probs, feats, np.where(rows < 3, wrong, probs.argmax(1)), rows, k=3)
    assert set(sel.select(losses, probs, feats, probs.argmax(1), rows, k=3)) == {0, 1, 2}


# ---------------------------------------------------------------- the epoch generator


def test_batches_probe_every_sample_once_per_epoch_and_keep_the_selected_top_k():
    sel, view = PerBatch("big_loss", 0.25), FakeView(n=50, batch_size=8)
    sel.setup(view)
    for epoch in range(2):
        view.probed.clear()
        kept = [b.rows for b in sel.batches(epoch, view)]
        assert sorted(np.concatenate(view.probed)) == list(range(50))
        for cand, rows in zip(view.probed, kept):  # loss = row id, so big_loss keeps the largest ids
            assert sorted(rows) == sorted(cand)[-keep_count(len(cand), 0.25):]
    assert sel.stats()["selected_samples"] == 2 * (6 * 2 + 1)


@pytest.mark.parametrize("name", ["big_loss", "coreset_cover", "adaselection"])
def test_training_backpropagates_the_kept_counts(digits, name):
    x, y = digits
    n, epochs, bs, frac = len(y), 3, 64, 0.3
    torch.manual_seed(0)
    model = build_model("convnet3", (1, 8, 8), 10, width=32)
    res = train_classifier(model, x, y, recipe=Recipe(epochs=epochs, batch_size=bs, lr=0.05), seed=0,
                           device=torch.device("cpu"), selector=make_per_batch(name, frac), num_classes=10)
    cand = round(bs / frac)  # candidates per step: keeping 30% of them backpropagates ~bs
    per_epoch = sum(keep_count(min(cand, n - i), frac) for i in range(0, n, cand))
    assert res["backprop_samples"] == res["selected_samples"] == epochs * per_epoch
    assert abs(per_epoch - frac * n) <= 1 + n // cand  # about b * N per epoch
    reprobe = res["backprop_samples"] if name == "adaselection" else 0  # the step's effect, on its own rows
    assert res["probe_samples"] == res["candidate_samples"] + reprobe == epochs * n + reprobe
    assert res["steps"] == epochs * -(-n // cand)  # a static 30% subset's step count
    if name == "adaselection":
        alpha = np.array(list(res["alpha"].values()))
        assert list(res["alpha"]) == list(BASELINES) and (alpha >= 0).all() and alpha.sum() == pytest.approx(1)
        assert res["alpha_updates"] == epochs * -(-n // cand)  # every step: its kept rows re-probed


def test_same_seed_gives_the_same_model(digits):
    x, y = digits

    def run(seed):
        torch.manual_seed(0)
        model = build_model("mlp", (1, 8, 8), 10, width=32)
        train_classifier(model, x, y, recipe=Recipe(epochs=2, batch_size=64, lr=0.05), seed=seed,
                         device=torch.device("cpu"), selector=AdaSelection(0.3), num_classes=10)
        return [p.detach().clone() for p in model.parameters()]

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


# ---------------------------------------------------------------- AdaSelection weights


def loss_stream(sel, favoured, rounds=500, seed=0):
    """Synthetic training: the loss level falls by 5% x (share of the kept set that `favoured`
    would have chosen), or by a random amount when favoured is None. Returns alpha per round."""
    rng = np.random.default_rng(seed)
    b, c, k, level = 64, 10, 16, 2.0
    sel.observe(level, 0.0)
    alphas = []
    for t in range(rounds):
        labels = rng.integers(0, c, b)
        probs = rng.dirichlet(np.ones(c), b)
        losses = -np.log(probs[np.arange(b), labels])
        pos = sel.select(losses, probs, rng.normal(size=(b, 8)), labels, t * b + np.arange(b), k)
        own = {"small_loss": top_k(-losses, k), "big_loss": top_k(losses, k)}.get(favoured)
        level *= 1 - 0.05 * (np.isin(pos, own).mean() if own is not None else rng.random())
        alphas.append(sel.observe(level, (t + 1) / rounds))
    return np.array(alphas)


@pytest.mark.parametrize("favoured", ["small_loss", "big_loss"])
def test_adaselection_learns_the_method_whose_picks_reduce_the_loss(favoured):
    sel = AdaSelection(0.25, curriculum=0.0)
    alphas = loss_stream(sel, favoured)
    assert (alphas >= 0).all() and np.allclose(alphas.sum(1), 1)
    settled = dict(zip(sel.methods, alphas[250:].mean(0)))  # uniform start: 1/7 each
    assert max(settled, key=settled.get) == favoured and settled[favoured] > 0.5


def test_adaselection_stays_spread_when_the_loss_ignores_the_selection():
    alphas = loss_stream(AdaSelection(0.25, curriculum=0.0), None)
    assert np.allclose(alphas.sum(1), 1) and alphas[250:].mean(0).max() < 0.35


def test_adaselection_curriculum_favours_easy_picks_early_and_hard_ones_late():
    sel = AdaSelection(0.25, curriculum=0.05)
    rng, rounds, a = np.random.default_rng(0), 400, []
    sel.observe(1.0, 0.0)
    for t in range(rounds):
        labels, probs = rng.integers(0, 10, 64), rng.dirichlet(np.ones(10), 64)
        sel.select(-np.log(probs[np.arange(64), labels]), probs, rng.normal(size=(64, 8)), labels, np.arange(64), 16)
        a.append(dict(zip(sel.methods, sel.observe(1.0, (t + 1) / rounds))))  # flat loss: curriculum only
    early, late = a[rounds // 4], a[-1]
    assert early["small_loss"] > 1 / 7 > early["big_loss"]
    assert late["big_loss"] > 1 / 7 > late["small_loss"]


# ---------------------------------------------------------------- bad settings


@pytest.mark.parametrize("make, match", [
    (lambda: PerBatch("big_loss", 0.0), "fraction"),
    (lambda: PerBatch("big_loss", 1.5), "fraction"),
    (lambda: PerBatch("biggest_loss", 0.5), "score"),
    (lambda: AdaSelection(0.5, methods=("big_loss", "entropy")), "methods"),
    (lambda: AdaSelection(0.5, methods=()), "methods"),
    (lambda: AdaSelection(0.5, eta=0.0), "eta"),
    (lambda: make_per_batch("crest", 0.5), "per-batch method"),
    (lambda: make_per_batch("big_loss", 0.5, eta=1.0), "per-batch method"),
])
def test_bad_settings_raise_naming_the_setting(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_nan_losses_raise():
    with pytest.raises(ValueError, match="NaN"):
        PerBatch("big_loss", 0.5).select(*batch([0.1, np.nan, 0.3]), k=1)
    for sel in (PerBatch("uniform", 0.5), AdaSelection(0.5)):
        view = FakeView(nan=True)
        sel.setup(view)
        with pytest.raises(ValueError, match="NaN"):
            next(sel.batches(0, view))
