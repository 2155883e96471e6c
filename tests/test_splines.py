"""The rational-quadratic spline: against an independent float64 reference, exact inverse,
log-derivative against autograd, monotonicity, identity, tails, extremes, gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pushforward import native
from pushforward.core import PushforwardError
from pushforward.transforms.splines import RQSplineTransformer, rational_quadratic_spline

B = 5.0


@pytest.fixture(autouse=True, params=["compiled", "reference"])
def spline_path(request, monkeypatch):
    """Every test of this module runs on both paths: the compiled CPU kernel
    (``pushforward/csrc/rqspline.cpp``) and the pure-PyTorch reference."""
    monkeypatch.setenv("PUSHFORWARD_NATIVE", "1" if request.param == "compiled" else "0")
    if request.param == "compiled" and native.library("rqspline") is None:
        pytest.skip(f"compiled spline kernel: {native.status()['rqspline']}")
    return request.param


def reference(x, uw, uh, ud, bound=B, mw=1e-3, mh=1e-3, md=1e-3):
    """Per-element float64 numpy evaluation, straight from the paper's formulas."""
    x, uw, uh, ud = (np.asarray(v, dtype=np.float64) for v in (x, uw, uh, ud))
    ys, lads = np.empty(x.shape), np.empty(x.shape)
    k_ = uw.shape[-1]

    def knots(u, m):
        p = np.exp(u - u.max())
        p = m + (1 - k_ * m) * p / p.sum()
        return -bound + 2 * bound * np.concatenate([[0.0], np.cumsum(p)])

    for i in np.ndindex(x.shape):
        xv = x[i]
        if not -bound < xv < bound:
            ys[i], lads[i] = xv, 0.0
            continue

        xk, yk = knots(uw[i], mw), knots(uh[i], mh)
        xk[-1] = yk[-1] = bound
        d = np.concatenate([[1.0], md + np.log1p(np.exp(ud[i])), [1.0]])
        k = max(j for j in range(k_) if xk[j] <= xv)
        w, h = xk[k + 1] - xk[k], yk[k + 1] - yk[k]
        s, t = h / w, (xv - xk[k]) / w
        den = s + (d[k + 1] + d[k] - 2 * s) * t * (1 - t)
        ys[i] = yk[k] + h * (s * t**2 + d[k] * t * (1 - t)) / den
        num = s**2 * (d[k + 1] * t**2 + 2 * s * t * (1 - t) + d[k] * (1 - t) ** 2)
        lads[i] = math.log(num) - 2 * math.log(den)
    return ys, lads


def params(n, bins, scale=1.0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(
        scale * torch.randn(n, k, generator=g, dtype=dtype) for k in (bins, bins, bins - 1)
    )


@pytest.mark.parametrize("bins", [1, 2, 3, 8])
def test_matches_reference(bins):
    x = torch.linspace(-6, 6, 241, dtype=torch.float64)
    w, h, d = params(241, bins, scale=2.0)
    y, lad = rational_quadratic_spline(x, w, h, d)
    ry, rlad = reference(x, w, h, d)
    np.testing.assert_allclose(y.numpy(), ry, atol=1e-12)
    np.testing.assert_allclose(lad.numpy(), rlad, atol=1e-10)


def test_wide_logits_take_the_per_row_path():
    # logits spanning more than the exponent range cannot share one maximum: the per-row path
    # runs, and agrees with the reference (and with the shared-maximum path on the same map)
    x = torch.linspace(-6, 6, 61, dtype=torch.float64)
    w, h, d = params(61, 6, scale=1.5, seed=4)
    y, lad = rational_quadratic_spline(x, w, h, d)
    shifted = w + 2000.0 * (torch.arange(61) % 2).unsqueeze(1)  # same map: softmax invariance
    y2, lad2 = rational_quadratic_spline(x, shifted, h, d)
    torch.testing.assert_close(y2, y, atol=1e-12, rtol=0)
    torch.testing.assert_close(lad2, lad, atol=1e-10, rtol=0)
    ry, rlad = reference(x, shifted, h, d)
    np.testing.assert_allclose(y2.numpy(), ry, atol=1e-12)
    np.testing.assert_allclose(lad2.numpy(), rlad, atol=1e-10)


def test_matches_reference_other_settings():
    x = torch.linspace(-3, 3, 101, dtype=torch.float64)
    w, h, d = params(101, 5, scale=3.0, seed=3)
    kw = {"bound": 2.5, "min_bin_width": 0.05, "min_bin_height": 0.01, "min_derivative": 0.1}
    y, lad = rational_quadratic_spline(x, w, h, d, **kw)
    ry, rlad = reference(x, w, h, d, bound=2.5, mw=0.05, mh=0.01, md=0.1)
    np.testing.assert_allclose(y.numpy(), ry, atol=1e-12)
    np.testing.assert_allclose(lad.numpy(), rlad, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 2e-5)])
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_inverse_round_trip(dtype, tol, scale):
    n = 4000
    x = 6 * torch.rand(n, dtype=dtype, generator=torch.Generator().manual_seed(1)) * 2 - 6
    w, h, d = params(n, 8, scale=scale, dtype=dtype)
    y, lad = rational_quadratic_spline(x, w, h, d)
    x2, lad2 = rational_quadratic_spline(y, w, h, d, inverse=True)
    # the inverse is exact up to the conditioning of the map: an error of one rounding in y
    # moves x by that over the slope, so the error is measured in y units where slopes are < 1
    slope = lad.exp().clamp(max=1)
    assert ((x2 - x).abs() * slope).max() < tol
    # the inverse's log-derivative is that of the point it returns
    y3, lad3 = rational_quadratic_spline(x2, w, h, d)
    assert (y3 - y).abs().max() < tol
    # (in float32 a rounding of x2 inside a tiny bin moves the log-slope by up to ~1e-3)
    assert (lad3 + lad2).abs().max() < (tol * 10 if dtype == torch.float64 else 5e-3)
    assert (lad3 + lad2).abs().median() < tol
    if dtype == torch.float64 and scale == 1.0:
        assert (lad + lad2).abs().max() < 1e-8
    # and the other way round: forward(inverse(y)) == y
    y3, _ = rational_quadratic_spline(x2, w, h, d)
    assert (y3 - y).abs().max() < tol


@pytest.mark.parametrize("inverse", [False, True])
def test_logabsdet_matches_autograd(inverse):
    x = torch.linspace(-5.5, 5.5, 301, dtype=torch.float64).requires_grad_()
    w, h, d = params(301, 6, scale=2.0, seed=2)
    y, lad = rational_quadratic_spline(x, w, h, d, inverse=inverse)
    (dydx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(torch.log(dydx), lad.detach(), atol=1e-10, rtol=0)


@pytest.mark.parametrize("inverse", [False, True])
def test_gradcheck(inverse):
    x = torch.tensor([-6.0, -4.9, -3.0, -1.0, 0.0, 0.5, 2.0, 4.9, 7.0], dtype=torch.float64)
    for bins in (1, 2, 5):
        w, h, d = params(x.shape[0], bins, scale=1.5, seed=bins)
        if inverse:
            x = rational_quadratic_spline(x, w, h, d)[0]
        args = [t.clone().requires_grad_() for t in (x, w, h, d)]
        assert torch.autograd.gradcheck(
            lambda *a: rational_quadratic_spline(*a, inverse=inverse), args
        )


def test_monotone_and_continuous():
    x = torch.linspace(-7, 7, 20001, dtype=torch.float64)
    w, h, d = (v.expand(20001, -1) for v in params(1, 8, scale=3.0, seed=5))
    y, _ = rational_quadratic_spline(x, w, h, d)
    assert (y[1:] > y[:-1]).all()
    # C1: value and slope agree on both sides of every knot (boundaries included)
    p = 1e-3 + (1 - 8e-3) * torch.softmax(w[0], 0)
    knots = torch.cat([torch.tensor([-B], dtype=torch.float64), -B + 2 * B * p.cumsum(0)])
    knots[-1] = B
    eps = 1e-12
    xs = torch.cat([knots - eps, knots + eps])
    ys, lads = rational_quadratic_spline(xs, *(v[:1].expand(18, -1) for v in (w, h, d)))
    assert (ys[9:] - ys[:9]).abs().max() < 1e-9
    assert (lads[9:] - lads[:9]).abs().max() < 1e-6


def test_identity_at_identity_params():
    tr = RQSplineTransformer(bins=8)
    ident = tr.identity_params()
    assert ident.shape == (23,) and (ident == 0).all()
    for dtype, tol in ((torch.float32, 2e-6), (torch.float64, 1e-14)):
        z = torch.linspace(-7, 7, 1001, dtype=dtype).reshape(1001, 1)
        p = ident.to(dtype).expand(1001, 1, -1)
        x, lad = tr(z, p)
        assert (x - z).abs().max() <= tol * B
        assert lad.abs().max() <= tol * 10
    # the pure function's parameterisation: softplus^-1(1 - m) gives slope exactly 1 too
    theta = torch.tensor(math.log(math.expm1(1 - 1e-3)), dtype=torch.float64)
    assert abs(float(F.softplus(theta) + 1e-3) - 1) < 1e-15


def test_tails_are_exact_identity():
    x = torch.tensor([-1e4, -B - 1e-6, -B, B, B + 1e-6, 123.0, 1e4], dtype=torch.float64)
    w, h, d = params(7, 8, scale=3.0)
    for inverse in (False, True):
        y, lad = rational_quadratic_spline(x, w, h, d, inverse=inverse)
        assert torch.equal(y, x)
        assert torch.equal(lad, torch.zeros_like(lad))


def test_inputs_at_knots():
    # inputs exactly at interior knots: consistent with the reference, round trip, no NaN
    w, h, d = params(1, 4, scale=2.0, seed=7)
    p = torch.softmax(w[0], 0)
    p = 1e-3 + (1 - 4e-3) * p
    knots = -B + 2 * B * torch.cumsum(p, 0)[:-1]
    x = torch.cat([knots, knots.nextafter(torch.tensor(-10.0, dtype=torch.float64))])
    ww, hh, dd = (v.expand(x.shape[0], -1) for v in (w, h, d))
    y, lad = rational_quadratic_spline(x, ww, hh, dd)
    ry, rlad = reference(x, ww, hh, dd)
    np.testing.assert_allclose(y.numpy(), ry, atol=1e-12)
    np.testing.assert_allclose(lad.numpy(), rlad, atol=1e-9)
    x2, _ = rational_quadratic_spline(y, ww, hh, dd, inverse=True)
    assert (x2 - x).abs().max() < 1e-12


@pytest.mark.parametrize("inverse", [False, True])
def test_extremes_float32(inverse):
    g = torch.Generator().manual_seed(0)
    n, bins = 2000, 8
    x = torch.cat(
        [
            torch.tensor([-1e4, 1e4, -B, B, 0.0, -B + 1e-6, B - 1e-6]),
            (torch.rand(n - 7, generator=g) * 2 - 1) * 6,
        ]
    ).requires_grad_()
    signs = torch.randint(0, 3, (n, 3 * bins - 1), generator=g).float() - 1  # -1, 0, 1
    u = (1e3 * signs * torch.rand(n, 3 * bins - 1, generator=g)).requires_grad_()
    w, h, d = u[:, :bins], u[:, bins : 2 * bins], u[:, 2 * bins :]
    y, lad = rational_quadratic_spline(x, w, h, d, inverse=inverse)
    assert torch.isfinite(y).all() and torch.isfinite(lad).all()
    (y.sum() + lad.sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(u.grad).all()
    (dydx,) = torch.autograd.grad(
        rational_quadratic_spline(x, w, h, d, inverse=inverse)[0].sum(), x
    )
    assert (dydx >= -1e-6).all()  # increasing, up to float32 rounding of autograd's chain rule
    # the round trip holds to float32 accuracy, measured where it is well conditioned: on the
    # side where the map is flatter (these maps are near staircases)
    with torch.no_grad():
        back, _ = rational_quadratic_spline(y, w, h, d, inverse=not inverse)
        again, _ = rational_quadratic_spline(back, w, h, d, inverse=inverse)
    slope = lad.detach().exp()
    err = torch.where(slope < 1, (back - x.detach()).abs() * slope, (again - y.detach()).abs())
    assert err.max() < 1e-4


@pytest.mark.parametrize("inverse", [False, True])
def test_inputs_on_the_knots_of_steep_bins_stay_finite_in_float32(inverse):
    # float32 inputs exactly on (and one ulp either side of) the interior knots, with knot
    # derivatives near 1e5: rounding can put the unit input a hair outside the bin it was
    # found in, which with such steep knots once made the forward map's denominator negative
    g = torch.Generator().manual_seed(1)
    n, bins = 2000, 8
    u = torch.randn(n, 3 * bins - 1, generator=g) * 6
    u[:, 2 * bins :] = torch.rand(n, bins - 1, generator=g) * 1e5
    w = torch.softmax(u[:, :bins], -1) * (1 - bins * 1e-3) + 1e-3
    knots = torch.cumsum(w, -1)[:, :-1] * 2 * B - B
    x = torch.stack([knots, knots.nextafter(knots + 1), knots.nextafter(knots - 1)], -1)
    x = x.reshape(n, -1)
    p = u[:, None, :].expand(n, x.shape[1], -1)
    y, lad = rational_quadratic_spline(
        x, p[..., :bins], p[..., bins : 2 * bins], p[..., 2 * bins :], inverse=inverse
    )
    assert torch.isfinite(y).all() and torch.isfinite(lad).all()


def test_extreme_all_equal_large_parameters():
    for dtype in (torch.float32, torch.float64):
        for value in (-1e3, 0.0, 1e3, 1e30, -1e30):
            u = torch.full((3, 23), value, dtype=dtype, requires_grad=True)
            x = torch.tensor([-4.0, 0.1, 4.0], dtype=dtype)
            w, h, d = u[:, :8], u[:, 8:16], u[:, 16:]
            y, lad = rational_quadratic_spline(x, w, h, d)
            x2, lad2 = rational_quadratic_spline(y, w, h, d, inverse=True)
            for v in (y, lad, x2, lad2):
                assert torch.isfinite(v).all(), (dtype, value)
            if abs(value) > 1e3:
                continue  # values stay finite; beyond this the map is a float staircase
            (y.sum() + lad.sum() + x2.sum() + lad2.sum()).backward()
            assert torch.isfinite(u.grad).all()
            assert (x2 - x).abs().max() < (1e-4 if dtype == torch.float32 else 1e-12)


def test_broadcasting_and_shapes():
    w, h, d = params(1, 4)
    x = torch.randn(5, 3, dtype=torch.float64)
    y, lad = rational_quadratic_spline(x, w[0], h[0], d[0])
    assert y.shape == lad.shape == (5, 3)
    y2, lad2 = rational_quadratic_spline(x, *(v[0].expand(5, 3, -1) for v in (w, h, d)))
    assert torch.equal(y, y2) and torch.equal(lad, lad2)
    empty = rational_quadratic_spline(x[:0], w[0], h[0], d[0])[0]
    assert empty.shape == (0, 3)


def test_errors():
    x = torch.randn(4)
    w, h, d = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 7)
    with pytest.raises(PushforwardError, match="K - 1"):
        rational_quadratic_spline(x, w, h, w)
    with pytest.raises(PushforwardError, match="broadcast"):
        rational_quadratic_spline(torch.randn(3), w, h, d)
    with pytest.raises(PushforwardError, match="bound"):
        rational_quadratic_spline(x, w, h, d, bound=0.0)
    with pytest.raises(PushforwardError, match="min_bin_width"):
        rational_quadratic_spline(x, w, h, d, min_bin_width=0.2)
    with pytest.raises(PushforwardError, match="bins"):
        RQSplineTransformer(bins=0)
    with pytest.raises(PushforwardError, match="min_derivative"):
        RQSplineTransformer(min_derivative=1.0)
    tr = RQSplineTransformer(bins=4)
    with pytest.raises(PushforwardError, match=r"\(batch, features, 11\)"):
        tr(torch.randn(5, 3), torch.randn(5, 3, 10))
    with pytest.raises(PushforwardError, match="does not match"):
        tr(torch.randn(5, 3), torch.randn(5, 2, 11))


def test_transformer_matches_pure_function_and_grads():
    tr = RQSplineTransformer(bins=5, bound=3.0).double()
    assert tr.params_per_feature == 14
    z = torch.randn(7, 4, dtype=torch.float64) * 2
    p = torch.randn(7, 4, 14, dtype=torch.float64)
    shift = math.log(math.expm1(1 - 1e-3))
    x, lad = tr(z, p)
    rx, rlad = rational_quadratic_spline(
        z, p[..., :5], p[..., 5:10], p[..., 10:] + shift, bound=3.0
    )
    torch.testing.assert_close(x, rx, atol=1e-14, rtol=0)
    torch.testing.assert_close(lad, rlad, atol=1e-13, rtol=0)
    z2, lad2 = tr.inverse(x, p)
    torch.testing.assert_close(z2, z, atol=1e-12, rtol=0)
    # a parameter-major view (what a structure should hand over) gives the same result, and
    # the same gradient, which comes back in the layout of the parameters
    pm = p.transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()
    pf = p.clone().requires_grad_()
    for inverse in (False, True):
        fn = tr.inverse if inverse else tr
        (gm,) = torch.autograd.grad(fn(z, pm)[1].sum() + fn(z, pm)[0].sum(), pm)
        (gf,) = torch.autograd.grad(fn(z, pf)[1].sum() + fn(z, pf)[0].sum(), pf)
        assert torch.equal(fn(z, pm)[0], fn(z, pf)[0])
        torch.testing.assert_close(gm, gf, atol=1e-12, rtol=0)
        assert gf.is_contiguous() and gm.stride() == pm.stride()
    # float32 module on float32 inputs
    tr32 = RQSplineTransformer(bins=5)
    x32, _ = tr32(z.float(), p.float())
    assert x32.dtype == torch.float32
    # gradients reach every parameter entry that is in play
    pp = p.clone().requires_grad_()
    out, l = tr(z.clamp(-2.9, 2.9), pp)
    (out.sum() + l.sum()).backward()
    assert torch.isfinite(pp.grad).all() and (pp.grad[..., :10] != 0).all()


@pytest.mark.parametrize("inverse", [False, True])
def test_gradgradcheck(inverse):
    # gradients of gradients (a Hessian, a gradient penalty) are exact: under create_graph the
    # backward evaluates the spline again with differentiable operations
    x = torch.tensor([-6.0, -4.9, -3.0, -1.0, 0.0, 0.5, 2.0, 4.9, 7.0], dtype=torch.float64)
    for bins in (1, 3):
        w, h, d = params(x.shape[0], bins, scale=1.5, seed=bins)
        if inverse:
            x = rational_quadratic_spline(x, w, h, d)[0]
        args = [t.clone().requires_grad_() for t in (x, w, h, d)]
        assert torch.autograd.gradgradcheck(
            lambda *a: rational_quadratic_spline(*a, inverse=inverse), args
        )


@pytest.mark.parametrize("inverse", [False, True])
def test_rows_do_not_depend_on_the_rest_of_the_batch(inverse):
    """Each row's result is the same alone and in a batch (no batch-wide shift of logits)."""
    g = torch.Generator().manual_seed(5)
    k = 6
    w, h = (torch.randn(6, k, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    d = torch.randn(6, k - 1, generator=g, dtype=torch.float64)
    w[0] += 20  # rows on very different scales
    x = torch.linspace(-4, 4, 6, dtype=torch.float64)
    y, lad = rational_quadratic_spline(x, w, h, d, inverse=inverse)
    for i in range(6):
        yi, ladi = rational_quadratic_spline(
            x[i : i + 1], w[i : i + 1], h[i : i + 1], d[i : i + 1], inverse=inverse
        )
        assert torch.equal(yi[0], y[i]) and torch.equal(ladi[0], lad[i])


def autograd_reference(x, uw, uh, ud, inverse, bound=B, mw=1e-3, mh=1e-3, md=1e-3):
    """The spline written with differentiable torch operations (softmax, cumsum, gather), in
    the style of nflows: autograd's gradients to compare the hand-written backward with."""
    k_ = uw.shape[-1]

    def knots(u, m):
        p = m + (1 - k_ * m) * torch.softmax(u, -1)
        c = F.pad(torch.cumsum(p, -1), (1, 0))
        return c, p

    cx, w = knots(uw, mw)
    cy, h = knots(uh, mh)
    one = torch.ones_like(ud[..., :1])
    d = torch.cat([one, md + F.softplus(ud), one], -1)
    xi = (x.clamp(-bound, bound) + bound) / (2 * bound)
    search = cy if inverse else cx
    k = (search[..., 1:-1] <= xi.unsqueeze(-1)).sum(-1, keepdim=True)
    x0, y0 = cx.gather(-1, k)[..., 0], cy.gather(-1, k)[..., 0]
    wk, hk = w.gather(-1, k)[..., 0], h.gather(-1, k)[..., 0]
    d0, d1 = d.gather(-1, k)[..., 0], d.gather(-1, k + 1)[..., 0]
    s = hk / wk
    if inverse:
        dy = xi - y0
        a = hk * (s - d0) + dy * (d1 + d0 - 2 * s)
        b = hk * d0 - dy * (d1 + d0 - 2 * s)
        c = -s * dy
        t = 2 * c / (-b - torch.sqrt(b * b - 4 * a * c))
    else:
        t = (xi - x0) / wk
    den = s + (d1 + d0 - 2 * s) * t * (1 - t)
    lad = torch.log(s**2 * (d1 * t**2 + 2 * s * t * (1 - t) + d0 * (1 - t) ** 2)) - 2 * torch.log(
        den
    )
    if inverse:
        out, lad = x0 + t * wk, -lad
    else:
        out = y0 + hk * (s * t**2 + d0 * t * (1 - t)) / den
    inside = (x > -bound) & (x < bound)
    return torch.where(inside, out * 2 * bound - bound, x), torch.where(inside, lad, 0.0)


def comparison_inputs(inverse, seed):
    """300 inputs (two in the tails; for the inverse, their images), parameters of 6 bins, and
    per-entry weights of ``y`` and ``lad``, with the generator that drew the weights."""
    g = torch.Generator().manual_seed(seed)
    n = 300
    x = torch.cat([torch.tensor([-7.0, 6.0]), torch.linspace(-4.99, 4.99, n - 2)]).double()
    w, h, d = params(n, 6, scale=1.5, seed=seed + 1)
    if inverse:
        x = rational_quadratic_spline(x, w, h, d)[0]
    weights = torch.randn(2, n, generator=g, dtype=torch.float64)
    return x, w, h, d, weights, g


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("which", ["y", "lad", "both"])
def test_gradients_match_autograd_reference(inverse, which):
    # the hand-written backward against autograd through a direct implementation, for each
    # output alone (the other's gradient is then None) and both, inputs in the tails included
    x, w, h, d, weights, _ = comparison_inputs(inverse, seed=11)
    grads = []
    for fn in (rational_quadratic_spline, autograd_reference):
        args = [t.clone().requires_grad_() for t in (x, w, h, d)]
        y, lad = fn(*args, inverse=inverse)
        terms = {"y": [(weights[0] * y).sum()], "lad": [(weights[1] * lad).sum()]}
        loss = sum(terms["y"] + terms["lad"]) if which == "both" else terms[which][0]
        grads.append(torch.autograd.grad(loss, args))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("inverse", [False, True])
def test_second_derivatives_match_autograd_reference(inverse):
    # with a graph of the gradient: the same first derivatives as the hand-written backward
    # and the second derivatives of autograd through a direct implementation (before, they
    # were silently 0: the hand-written gradient was a constant to autograd)
    x, w, h, d, weights, g = comparison_inputs(inverse, seed=13)
    probes = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (x, w, h, d)]
    firsts, seconds = [], []
    for fn in (rational_quadratic_spline, autograd_reference):
        args = [t.clone().requires_grad_() for t in (x, w, h, d)]
        y, lad = fn(*args, inverse=inverse)
        loss = (weights[0] * y).sum() + (weights[1] * lad).sum()
        first = torch.autograd.grad(loss, args, create_graph=True)
        firsts.append(first)
        projected = sum((p * f).sum() for p, f in zip(probes, first))
        seconds.append(torch.autograd.grad(projected, args))
    for got, want in zip(*firsts):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
    for got, want in zip(*seconds):
        torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-8)
        assert got.abs().max() > 0


@pytest.mark.parametrize("inverse", [False, True])
def test_torch_func_hessian_matches_autograd(inverse):
    # torch.func cannot trace the hand-written Function: under it the spline runs as plain
    # operations, and torch.func.hessian agrees with autograd's double backward
    x = torch.tensor([-6.0, -4.0, -1.5, 0.2, 1.0, 3.3, 7.0], dtype=torch.float64)
    w, h, d = params(7, 5, scale=1.5, seed=5)
    if inverse:
        x = rational_quadratic_spline(x, w, h, d)[0]

    def f(v):
        y, lad = rational_quadratic_spline(v, w, h, d, inverse=inverse)
        return (y**2).sum() + lad.sum()

    hess = torch.func.hessian(f)(x)
    torch.testing.assert_close(hess, torch.autograd.functional.hessian(f, x), atol=1e-10, rtol=0)
    assert hess.abs().sum() > 0


@pytest.mark.parametrize("inverse", [False, True])
def test_layouts_and_matmul_precision_give_the_same_results(inverse):
    # parameters as a network gives them (a transposed contiguous matrix: moved to the bins'
    # layout by one row selection), in another layout (a strided copy), feature-major (as a
    # MADE's transposed output: the batch taken in that order), and with reduced-precision
    # float32 matrix products allowed (the gradient's move back is then a copy): same bits
    g = torch.Generator().manual_seed(13)
    tr = RQSplineTransformer(bins=8)
    z = torch.randn(64, 5, generator=g) * 3
    p = torch.randn(64, 5, 23, generator=g) * 2
    runs = []
    previous = torch.get_float32_matmul_precision()
    layouts = {
        "native": lambda p: p.clone(),
        "strided": lambda p: p.transpose(0, 1).contiguous().transpose(0, 1),
        # (features, P, batch) in memory: a MADE's transposed output
        "feature-major": lambda p: p.permute(1, 2, 0).contiguous().permute(2, 0, 1),
    }
    for layout, precision in (
        ("native", "highest"),
        ("strided", "highest"),
        ("feature-major", "highest"),
        ("native", "medium"),
    ):
        q = layouts[layout](p)
        q.requires_grad_()
        zz = z.clone().requires_grad_()
        torch.set_float32_matmul_precision(precision)
        try:
            out, lad = (tr.inverse if inverse else tr)(zz, q)
            gz, gq = torch.autograd.grad(out.sum() + lad.sum(), (zz, q))
        finally:
            torch.set_float32_matmul_precision(previous)
        assert gq.stride() == q.stride()
        runs.append((out, lad, gz, gq))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
