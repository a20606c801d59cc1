"""DSA (differentiable siamese augmentation) and ZCA whitening for dataset distillation."""

import math

import pytest
import torch

from stages.learn import augment as dsa
from stages.learn.distill.zca import apply_zca, fit_zca, invert_zca

ALL = dsa.DEFAULT_KINDS


def batch(n=6, c=3, hw=8, seed=0, dtype=torch.float32):
    return torch.rand(n, c, hw, hw, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 - 1


def test_parse_kinds():
    assert dsa.parse_kinds(ALL) == ["color", "crop", "cutout", "flip", "scale", "rotate"]
    assert dsa.parse_kinds("none") == dsa.parse_kinds("") == dsa.parse_kinds(None) == []
    assert dsa.parse_kinds(["flip", "crop"]) == ["flip", "crop"]
    with pytest.raises(ValueError, match="blur"):
        dsa.parse_kinds("crop_blur")
    x = batch()
    assert dsa.augment(x, "none", torch.Generator()) is x


def test_apply_is_differentiable_in_the_pixels():
    x = batch().requires_grad_(True)
    p = dsa.sample_params(len(x), ALL, torch.Generator().manual_seed(1))
    out = dsa.apply(x, p)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # and the gradient is the true one (every kind, per-sample params, float64)
    xd = batch(2, 2, 4, seed=3, dtype=torch.float64).requires_grad_(True)
    pd = dsa.sample_params(2, ALL, torch.Generator().manual_seed(4))
    assert torch.autograd.gradcheck(lambda t: dsa.apply(t, pd), (xd,))


def test_same_params_transform_two_batches_identically():
    x = batch()
    gen = torch.Generator().manual_seed(2)
    p = dsa.sample_params(len(x), ALL, gen)
    assert torch.equal(dsa.apply(x.clone(), p), dsa.apply(x.clone(), p))
    assert not torch.allclose(dsa.apply(x, p), x)
    # shared params (one set per batch) fit a batch of any size, sample for sample alike
    shared = dsa.sample_params(len(x), ALL, gen, per_sample=False)
    assert torch.allclose(dsa.apply(x[:2], shared), dsa.apply(x, shared)[:2], atol=1e-6)
    # per-sample params drawn for the larger batch serve the smaller one index by index
    assert torch.allclose(dsa.apply(x[:2], dsa.take(p, 2)), dsa.apply(x, p)[:2], atol=1e-6)


def test_param_shapes_per_sample_and_shared():
    gen = torch.Generator().manual_seed(0)
    per = dsa.sample_params(5, ALL, gen)
    shared = dsa.sample_params(5, ALL, gen, per_sample=False)
    assert set(per) == set(shared) == {"brightness", "saturation", "contrast", "flip", "translate", "scale",
                                       "rotate", "cutout"}
    for k in per:
        assert per[k].shape[0] == 5 and shared[k].shape[0] == 1
        assert per[k].shape[1:] == shared[k].shape[1:]
    assert per["translate"].shape == per["scale"].shape == per["cutout"].shape == (5, 2)
    assert per["flip"].dtype == torch.bool
    assert set(dsa.sample_params(3, "crop_flip", gen)) == {"translate", "flip"}
    assert dsa.take(per, 2)["scale"].shape == (2, 2) and dsa.take(shared, 2)["scale"].shape == (1, 2)
    with pytest.raises(ValueError, match="rows"):
        dsa.apply(batch(4), per)                    # per-sample params of 5 on a batch of 4


def test_ranges():
    p = dsa.sample_params(4000, ALL, torch.Generator().manual_seed(0))
    assert p["translate"].abs().max() <= dsa.CROP
    assert (p["scale"] >= 0.8).all() and (p["scale"] <= 1.2).all()
    assert p["rotate"].abs().max() <= math.radians(15) + 1e-6
    assert abs(p["flip"].float().mean() - 0.5) < 0.03
    assert (p["cutout"] >= 0).all() and (p["cutout"] <= 1).all()


def test_deterministic_for_a_generator():
    x = batch()
    a = dsa.augment(x, ALL, torch.Generator().manual_seed(7))
    b = dsa.augment(x, ALL, torch.Generator().manual_seed(7))
    c = dsa.augment(x, ALL, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # the draw order is fixed, whatever order the kinds are listed in
    p1 = dsa.sample_params(4, "rotate_flip_color", torch.Generator().manual_seed(1))
    p2 = dsa.sample_params(4, "color_flip_rotate", torch.Generator().manual_seed(1))
    assert all(torch.equal(p1[k], p2[k]) for k in p1)


def test_flip_twice_is_identity():
    x = batch()
    p = {"flip": torch.tensor([True, False, True, True, False, True])}
    once = dsa.apply(x, p)
    assert torch.equal(dsa.apply(once, p), x)
    assert torch.equal(once[0], x[0].flip(2)) and torch.equal(once[1], x[1])


def test_geometry_identity_shift_and_rotation():
    x = batch()
    ident = {"translate": torch.zeros(1, 2), "scale": torch.ones(1, 2), "rotate": torch.zeros(1)}
    assert torch.allclose(dsa.apply(x, ident), x, atol=1e-5)
    # a shift by one pixel (1/8 of 8 px) along x: content moves one column, zeros come in
    out = dsa.apply(x, {"translate": torch.tensor([[0.0, 1 / 8]])})
    assert torch.allclose(out[..., :-1], x[..., 1:], atol=1e-5)
    assert out[..., -1].abs().max() < 1e-5
    # a quarter turn is rigid: pixel centres land on pixel centres
    turned = dsa.apply(x, {"rotate": torch.tensor([math.pi / 2])})
    assert torch.allclose(turned, torch.rot90(x, 1, (2, 3)), atol=1e-5)
    # colour at its neutral values (no offset, factors 1) is the identity too
    neutral = {"brightness": torch.zeros(1), "saturation": torch.ones(1), "contrast": torch.ones(1)}
    assert torch.allclose(dsa.apply(x, neutral), x, atol=1e-6)


def test_cutout_zeroes_the_expected_area():
    ones = torch.ones(3, 2, 16, 16)
    out = dsa.apply(ones, {"cutout": torch.full((1, 2), 0.5)})   # centred: a full 8 x 8 square
    assert torch.equal((out == 0).float().mean((1, 2, 3)), torch.full((3,), 0.25))
    # random centres, uniform over the image: the square is clipped at the border, so the
    # expected zeroed fraction per axis is 0.5 - 0.0625 = 0.4375, and 0.4375 ** 2 in all
    ones = torch.ones(4000, 1, 32, 32)
    out = dsa.augment(ones, "cutout", torch.Generator().manual_seed(0))
    frac = (out == 0).float().mean((1, 2, 3))
    assert frac.max() <= 0.25 and abs(frac.mean().item() - 0.4375 ** 2) < 0.01


def test_zca_whitens_correlated_data():
    g = torch.Generator().manual_seed(0)
    d = 12
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    x = (torch.randn(20000, d, generator=g, dtype=torch.float64) @ mix + 3.0).view(-1, 3, 2, 2)
    mean, w = fit_zca(x, eps=0.0)          # a full-rank covariance needs no regularising
    assert torch.allclose(w, w.T) and mean.shape == (d,) and w.shape == (d, d)
    z = apply_zca(x, mean, w)
    assert z.shape == x.shape
    f = z.flatten(1)
    cov = (f - f.mean(0)).T @ (f - f.mean(0)) / len(f)
    assert torch.allclose(cov, torch.eye(d, dtype=cov.dtype), atol=1e-8)
    # regularised: the small eigen-directions are damped instead of blown up
    _, w_reg = fit_zca(x, eps=0.1)
    assert torch.linalg.matrix_norm(w_reg, 2) < torch.linalg.matrix_norm(w, 2)


def test_zca_inverts():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(500, 1, 4, 4, generator=g) * 2 - 1
    x = x + x.roll(1, dims=3)                               # correlated neighbours
    mean, w, w_inv = fit_zca(x, eps=0.1, return_inverse=True)
    assert mean.dtype == w.dtype == w_inv.dtype == torch.float32
    assert torch.allclose(invert_zca(apply_zca(x, mean, w), mean, w_inv), x, atol=1e-4)
    u8 = ((x.clamp(-1, 1) + 1) * 127).to(torch.uint8)       # uint8 inputs: float32 results
    m8, w8 = fit_zca(u8)
    assert w8.dtype == torch.float32 and apply_zca(u8, m8, w8).dtype == torch.float32
    with pytest.raises(ValueError, match="singular"):
        fit_zca(torch.zeros(10, 4), eps=0.0)
