"""The deep sigmoidal flow: against a direct float64 evaluation, log-derivative against
autograd, numerical inverse, monotonicity, identity, extremes, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from pushforward.core import PushforwardError
from pushforward.transforms.naf import DeepSigmoidTransformer, deep_sigmoid_flow


def params(n, hidden, scale=1.0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(scale * torch.randn(n, hidden, generator=g, dtype=dtype) for _ in range(3))


def direct(x, alpha, b, omega, min_slope=1e-3):
    """The paper's formula, naively (float64, moderate values only)."""
    a = torch.nn.functional.softplus(alpha + math.log(math.expm1(1 - min_slope))) + min_slope
    w = torch.softmax(omega, -1)
    s = (w * torch.sigmoid(a * x.unsqueeze(-1) + b)).sum(-1)
    return torch.logit(s)


@pytest.mark.parametrize("hidden", [1, 3, 8])
def test_matches_direct_formula(hidden):
    x = torch.linspace(-6, 6, 121, dtype=torch.float64)
    p = params(121, hidden, scale=1.5, seed=hidden)
    y, lad = deep_sigmoid_flow(x, *p)
    # the naive logit loses digits as S nears 0 or 1 (error ~ eps e^|y|); ours does not
    assert ((y - direct(x, *p)).abs() <= 1e-15 * (1 + y.abs().exp())).all()
    xg = x.clone().requires_grad_()
    (d,) = torch.autograd.grad(direct(xg, *p).sum(), xg)
    torch.testing.assert_close(lad, d.log(), atol=1e-10, rtol=0)


@pytest.mark.parametrize("inverse", [False, True])
def test_logabsdet_matches_autograd(inverse):
    x = torch.linspace(-10, 10, 201, dtype=torch.float64)
    p = params(201, 6, scale=2.0, seed=1)
    if inverse:
        x = deep_sigmoid_flow(x, *p)[0]
    x = x.clone().requires_grad_()
    y, lad = deep_sigmoid_flow(x, *p, inverse=inverse)
    (d,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(d.log(), lad.detach(), atol=1e-9, rtol=0)


@pytest.mark.parametrize("inverse", [False, True])
def test_gradcheck(inverse):
    x = torch.tensor([-7.0, -2.0, -0.3, 0.0, 1.0, 4.0, 9.0], dtype=torch.float64)
    p = params(7, 4, scale=1.5, seed=2)
    if inverse:
        x = deep_sigmoid_flow(x, *p)[0]
    args = [t.clone().requires_grad_() for t in (x, *p)]
    assert torch.autograd.gradcheck(lambda *a: deep_sigmoid_flow(*a, inverse=inverse), args)


@pytest.mark.parametrize("scale", [0.5, 2.0, 5.0])
def test_inverse_round_trip_float64(scale):
    x = torch.linspace(-20, 20, 2001, dtype=torch.float64)
    p = params(2001, 8, scale=scale, seed=3)
    y, lad = deep_sigmoid_flow(x, *p)
    x2, lad2 = deep_sigmoid_flow(y, *p, inverse=True)
    # measured in y units where the map is flat (an x error there is a tiny y error)
    slope = lad.exp().clamp(max=1)
    assert ((x2 - x).abs() * slope).max() < 1e-12
    if scale <= 2.0:
        assert (x2 - x).abs().max() < 1e-9
        assert (lad + lad2).abs().max() < 1e-9
    y3, lad3 = deep_sigmoid_flow(x2, *p)
    assert (y3 - y).abs().max() < 1e-12 * (1 + y.abs().max())
    assert (lad3 + lad2).abs().max() < 1e-9


def test_inverse_round_trip_float32():
    x = torch.linspace(-20, 20, 2001)
    p = params(2001, 8, scale=1.0, dtype=torch.float32, seed=4)
    y, lad = deep_sigmoid_flow(x, *p)
    x2, lad2 = deep_sigmoid_flow(y, *p, inverse=True)
    slope = lad.exp().clamp(max=1)
    assert ((x2 - x).abs() * slope).max() < 1e-5 * 20
    assert (lad + lad2).abs().max() < 1e-3


def test_monotone_and_onto():
    x = torch.linspace(-50, 50, 100001, dtype=torch.float64)
    p = tuple(v.expand(100001, -1) for v in params(1, 8, scale=3.0, seed=5))
    y, lad = deep_sigmoid_flow(x, *p)
    assert (y[1:] > y[:-1]).all()
    # far out the map is asymptotically linear with positive slope: unbounded both ways
    assert y[0] < -50 * 1e-3 and y[-1] > 50 * 1e-3
    assert torch.isfinite(lad).all()


def test_identity_at_identity_params():
    tr = DeepSigmoidTransformer(hidden=8)
    ident = tr.identity_params()
    assert ident.shape == (24,)
    assert (ident[:16] == 0).all() and (ident[16:].diff() > 0).all()  # distinct weights
    for dtype, eps in ((torch.float32, 1.2e-7), (torch.float64, 2.3e-16)):
        z = torch.linspace(-30, 30, 1201, dtype=dtype).reshape(-1, 1)
        x, lad = tr(z, ident.to(dtype).expand(1201, 1, -1))
        assert ((x - z).abs() <= 8 * eps * z.abs().clamp(min=1)).all()
        assert lad.abs().max() <= 16 * eps
        z2, lad2 = tr.inverse(x, ident.to(dtype).expand(1201, 1, -1))
        assert ((z2 - z).abs() <= 8 * eps * z.abs().clamp(min=1)).all()


@pytest.mark.parametrize("inverse", [False, True])
def test_extremes_float32(inverse):
    g = torch.Generator().manual_seed(0)
    n, h = 1000, 8
    x = torch.cat([torch.tensor([-1e4, 1e4, 0.0]), (torch.rand(n - 3, generator=g) * 2 - 1) * 50])
    signs = torch.randint(0, 3, (n, 3 * h), generator=g).float() - 1
    u = (1e3 * signs * torch.rand(n, 3 * h, generator=g)).requires_grad_()
    alpha, b, omega = u[:, :h], u[:, h : 2 * h], u[:, 2 * h :]
    x = x.requires_grad_()
    y, lad = deep_sigmoid_flow(x, alpha, b, omega, inverse=inverse)
    assert torch.isfinite(y).all() and torch.isfinite(lad).all()
    (y.sum() + lad.sum()).backward()
    assert torch.isfinite(u.grad).all() and torch.isfinite(x.grad).all()
    with torch.no_grad():
        back, _ = deep_sigmoid_flow(y, alpha, b, omega, inverse=not inverse)
        again, _ = deep_sigmoid_flow(back, alpha, b, omega, inverse=inverse)
    # well-conditioned side: x where the map is flatter than 1, y where it is steeper
    slope = lad.detach().exp()
    scale = 1 + torch.maximum(x.detach().abs(), y.detach().abs())
    err = torch.where(slope < 1, (back - x.detach()).abs() * slope, (again - y.detach()).abs())
    assert (err / scale).max() < 1e-5


def test_extreme_inputs_identity_float32():
    tr = DeepSigmoidTransformer(hidden=4)
    z = torch.tensor([[-1e4], [1e4], [-1e30], [1e30]])
    p = tr.identity_params().expand(4, 1, -1)
    x, lad = tr(z, p)
    assert ((x - z).abs() <= 4 * 1.2e-7 * z.abs()).all() and torch.isfinite(lad).all()
    z2, _ = tr.inverse(x, p)
    assert ((z2 - z).abs() <= 8 * 1.2e-7 * z.abs()).all()


def test_broadcasting_and_transformer():
    tr = DeepSigmoidTransformer(hidden=5).double()
    assert tr.params_per_feature == 15
    z = torch.randn(7, 3, dtype=torch.float64)
    p = torch.randn(7, 3, 15, dtype=torch.float64)
    x, lad = tr(z, p)
    rx, rlad = deep_sigmoid_flow(z, p[..., :5], p[..., 5:10], p[..., 10:])
    assert torch.equal(x, rx) and torch.equal(lad, rlad)
    z2, lad2 = tr.inverse(x, p)
    torch.testing.assert_close(z2, z, atol=1e-12, rtol=0)
    torch.testing.assert_close(lad2, -lad, atol=1e-12, rtol=0)
    # parameters broadcast over leading dimensions
    y1, _ = deep_sigmoid_flow(z, *(v[0, 0] for v in (p[..., :5], p[..., 5:10], p[..., 10:])))
    assert y1.shape == (7, 3)
    # gradients reach every parameter in both directions
    pp = p.clone().requires_grad_()
    out, l1 = tr(z, pp)
    back, l2 = tr.inverse(x, pp)
    (out.sum() + l1.sum() + back.sum() + l2.sum()).backward()
    assert torch.isfinite(pp.grad).all() and (pp.grad != 0).all()


def test_errors():
    x = torch.randn(4)
    p = torch.randn(3, 4, 5)
    with pytest.raises(PushforwardError, match="same H"):
        deep_sigmoid_flow(x, p[0], p[1], p[2, :, :4])
    with pytest.raises(PushforwardError, match="broadcast"):
        deep_sigmoid_flow(torch.randn(3), *p)
    with pytest.raises(PushforwardError, match="min_slope"):
        deep_sigmoid_flow(x, *p, min_slope=0.0)
    with pytest.raises(PushforwardError, match="hidden"):
        DeepSigmoidTransformer(hidden=0)
    tr = DeepSigmoidTransformer(hidden=2)
    with pytest.raises(PushforwardError, match=r"\(batch, features, 6\)"):
        tr(torch.randn(5, 3), torch.randn(5, 3, 5))
    with pytest.raises(PushforwardError, match="does not match"):
        tr.inverse(torch.randn(5, 3), torch.randn(5, 2, 6))
    with pytest.raises(PushforwardError, match="finite"):
        tr.inverse(torch.tensor([[float("nan")]]), torch.zeros(1, 1, 6))


def test_invert_swaps_the_directions():
    tr = DeepSigmoidTransformer(hidden=3, invert=True).double()
    plain = DeepSigmoidTransformer(hidden=3).double()
    x = torch.randn(6, 2, dtype=torch.float64) * 3
    p = torch.randn(6, 2, 9, dtype=torch.float64)
    z, lad = tr.inverse(x, p)  # closed form: the paper's data-to-noise DSF
    rz, rlad = plain(x, p)
    assert torch.equal(z, rz) and torch.equal(lad, rlad)
    x2, lad2 = tr(z, p)  # numerical
    torch.testing.assert_close(x2, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(lad2, -lad, atol=1e-12, rtol=0)
    ident = tr.identity_params().double().expand(6, 2, -1)
    torch.testing.assert_close(tr(x, ident)[0], x, atol=1e-13, rtol=0)
    assert "invert=True" in repr(tr)
    with pytest.raises(PushforwardError, match="invert"):
        DeepSigmoidTransformer(invert=1)
