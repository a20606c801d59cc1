import numpy as np
import pytest

from stages.kernels.scores.dynamics import auroc, el2n, forgetting, grand_last_layer, loss, margin


def test_el2n_loss_margin_on_known_probs():
    probs = np.array([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]])
    y = np.array([0, 0, 0])
    np.testing.assert_allclose(el2n(probs, y), [np.sqrt(0.02), np.sqrt(0.5), np.sqrt(1.28)], rtol=1e-6)
    np.testing.assert_allclose(loss(probs, y), -np.log([0.9, 0.5, 0.2]), rtol=1e-6)
    np.testing.assert_allclose(margin(probs, y), [-0.8, 0.0, 0.6], atol=1e-7)
    # averaging over seeds
    np.testing.assert_allclose(el2n(np.stack([probs, probs]), y), el2n(probs, y))


def test_forgetting_counts_events_and_never_learned_is_highest():
    correct = np.array([
        [1, 0, 1, 0, 1],  # learned, forgotten, learned, forgotten, learned: 2 events
        [0, 0, 1, 1, 1],  # learned once: 0 events
        [0, 0, 0, 0, 0],  # never learned
        [1, 1, 1, 1, 0],  # forgotten at the end: 1
    ], bool).T
    np.testing.assert_array_equal(forgetting(correct), [2, 0, 5, 1])


def test_grand_closed_form_equals_autograd():
    import torch

    rng = np.random.default_rng(0)
    h = rng.normal(size=(6, 4)).astype(np.float32)
    head = torch.nn.Linear(4, 3)
    y = np.array([0, 1, 2, 0, 1, 2])
    norms = []
    for i in range(6):
        head.zero_grad()
        out = head(torch.from_numpy(h[i:i + 1]))
        torch.nn.functional.cross_entropy(out, torch.tensor([y[i]])).backward()
        norms.append(torch.sqrt(head.weight.grad.pow(2).sum() + head.bias.grad.pow(2).sum()).item())
    probs = torch.softmax(head(torch.from_numpy(h)), 1).detach().numpy()
    np.testing.assert_allclose(grand_last_layer(probs, y, h), norms, rtol=1e-5)


def test_auroc():
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert auroc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert auroc(np.array([1, 1, 1, 1]), np.array([0, 1, 0, 1])) == 0.5
    with pytest.raises(ValueError):
        auroc(np.array([1.0]), np.array([1]))


def test_kmeans_recovers_planted_centres_and_prototype_distance():
    from stages.kernels.cluster import kmeans
    from stages.kernels.scores.prototype import prototype_distance

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 6)) * 10
    x = np.concatenate([c + rng.normal(size=(60, 6)) for c in centres])
    got = kmeans(x, 4, seed=0)
    d = np.linalg.norm(got[:, None] - centres[None], axis=-1)
    assert sorted(d.argmin(1).tolist()) == [0, 1, 2, 3] and d.min(1).max() < 1.0  # centres are ~10 apart; sample means are ~0.3 off
    np.testing.assert_array_equal(got, kmeans(x, 4, seed=0))
    # an outlier far from every centre gets the largest prototype distance
    from stages.kernels.cluster import faiss_kmeans

    fc = faiss_kmeans(x, 4, seed=0)
    if fc is not None:  # faiss is a test dependency: its centres match the planted ones too
        fd = np.linalg.norm(fc[:, None] - centres[None], axis=-1)
        assert sorted(fd.argmin(1).tolist()) == [0, 1, 2, 3] and fd.min(1).max() < 1.0
    y = np.concatenate([x, [[100.0, -100, 100, -100, 100, -100]]])
    y = y - y.mean(0)
    assert prototype_distance(y, 4, seed=0).argmax() == len(y) - 1
