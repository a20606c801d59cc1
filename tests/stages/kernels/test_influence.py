import numpy as np
import torch

from stages.kernels.scores.influence import influence_last_layer, last_layer_hessian


def head_setup(seed=0, n=40, d=3, c=4):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(n, d))
    y = rng.integers(0, c, n)
    w = torch.tensor(rng.normal(size=(c, d + 1)), requires_grad=True)
    return h, y, w


def loss_fn(w, h, y):
    ht = torch.cat([torch.as_tensor(h), torch.ones(len(h), 1, dtype=torch.float64)], 1)
    return torch.nn.functional.cross_entropy(ht @ w.T, torch.as_tensor(y))


def test_hessian_equals_autograd():
    h, y, w = head_setup()
    ref = torch.autograd.functional.hessian(lambda w_: loss_fn(w_, h, y), w.detach())
    ht = np.concatenate([h, np.ones((len(h), 1))], 1)
    probs = torch.softmax(torch.as_tensor(ht) @ w.detach().T, 1).numpy()
    got = last_layer_hessian(probs, h, block=7)
    np.testing.assert_allclose(got.numpy(), ref.reshape(got.shape).numpy(), atol=1e-10)


def test_influence_equals_explicit_formula():
    h, y, w = head_setup(1)
    hv, yv, _ = head_setup(2, n=15)
    wd = w.detach()

    def probs_of(x):
        xt = np.concatenate([x, np.ones((len(x), 1))], 1)
        return torch.softmax(torch.as_tensor(xt) @ wd.T, 1).numpy()

    damping = 0.05
    got = influence_last_layer(probs_of(h), y, h, probs_of(hv), yv, hv, damping=damping)
    hess = torch.autograd.functional.hessian(lambda w_: loss_fn(w_, h, y), wd).reshape(wd.numel(), -1)
    g_val = torch.autograd.functional.jacobian(lambda w_: loss_fn(w_, hv, yv), wd).reshape(-1)
    inv = torch.linalg.inv(hess + damping * torch.eye(len(hess), dtype=torch.float64))
    for i in (0, 7, 39):
        g_i = torch.autograd.functional.jacobian(lambda w_: loss_fn(w_, h[i:i + 1], y[i:i + 1]), wd).reshape(-1)
        assert abs(got[i] - float(g_val @ inv @ g_i)) < 1e-9
