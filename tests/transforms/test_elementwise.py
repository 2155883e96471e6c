"""Unit tests of the elementwise family beyond the shared contract (tests/test_contract.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pushforward.core import Inverse, PushforwardError
from pushforward.transforms.elementwise import (
    LeakyReLU,
    Logit,
    PiecewiseLinear,
    PiecewiseLinearTransformer,
    Sigmoid,
    Tanh,
    log_sigmoid_derivative,
    piecewise_linear,
)

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference(z: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force piecewise-linear map, one scalar at a time (Müller et al. 2019, eq. of the
    piecewise-linear coupling): equal input bins, output widths softmax(logits)."""
    bins = logits.shape[-1]
    x, lad = np.empty_like(z), np.empty_like(z)
    for idx in np.ndindex(*z.shape):
        row = logits[idx]
        q = np.exp(row - row.max())
        q /= q.sum()
        v = z[idx]
        if not 0.0 <= v <= 1.0:
            x[idx], lad[idx] = v, 0.0
            continue
        b = min(int(math.floor(v * bins)), bins - 1)
        x[idx] = q[:b].sum() + (v * bins - b) * q[b]
        lad[idx] = math.log(bins * q[b])
    return x, lad


# --- piecewise_linear, the pure function ----------------------------------------------------


def test_piecewise_linear_matches_brute_force_reference() -> None:
    g = _gen()
    z = torch.rand(50, 3, generator=g, dtype=F64)
    z[0] = torch.tensor([0.0, 1.0, 0.5])  # edges and an interior knot
    z[1] = torch.tensor([-0.5, 1.5, 0.25])  # outside [0, 1]: identity
    logits = 2 * torch.randn(50, 3, 6, generator=g, dtype=F64)  # per-sample (conditional) shape
    x, lad = piecewise_linear(z, logits)
    x_ref, lad_ref = _reference(z.numpy(), logits.numpy())
    np.testing.assert_allclose(x.numpy(), x_ref, atol=1e-13)
    np.testing.assert_allclose(lad.numpy(), lad_ref, atol=1e-13)
    # shared (unconditional) logits broadcast over the batch
    x2, lad2 = piecewise_linear(z, logits[0])
    x2_ref, lad2_ref = _reference(z.numpy(), np.broadcast_to(logits[0].numpy(), (50, 3, 6)))
    np.testing.assert_allclose(x2.numpy(), x2_ref, atol=1e-13)
    np.testing.assert_allclose(lad2.numpy(), lad2_ref, atol=1e-13)


def test_piecewise_linear_is_monotone_and_maps_the_unit_interval_onto_itself() -> None:
    z = torch.linspace(0, 1, 2001, dtype=F64).unsqueeze(-1)  # (2001, 1), many knots hit exactly
    logits = 3 * torch.randn(1, 7, generator=_gen(1), dtype=F64)
    x, lad = piecewise_linear(z, logits)
    assert x[0, 0] == 0.0 and x[-1, 0] == 1.0
    assert bool((x.diff(dim=0) > 0).all()), "not strictly increasing"
    assert bool(torch.isfinite(lad).all())
    # float32 with extreme logits: still inside [0, 1], non-decreasing, finite
    logits32 = torch.tensor([[30.0, -30.0, 0.0, 80.0, -80.0]])
    x32, lad32 = piecewise_linear(torch.linspace(0, 1, 1001).unsqueeze(-1), logits32)
    assert bool(((x32 >= 0) & (x32 <= 1)).all()) and bool((x32.diff(dim=0) >= 0).all())
    assert bool(torch.isfinite(lad32).all())


def test_piecewise_linear_inverse_is_exact() -> None:
    g = _gen(2)
    logits = 2 * torch.randn(4, 5, generator=g, dtype=F64)
    z = torch.rand(300, 4, generator=g, dtype=F64)
    x, lad = piecewise_linear(z, logits)
    z2, lad_inv = piecewise_linear(x, logits, inverse=True)
    assert (z2 - z).abs().max() < 1e-13
    assert (lad + lad_inv).abs().max() < 1e-14
    # the knots themselves (bin edges in data space) map back to the equal-width input edges
    knots = torch.cat([torch.zeros(4, 1, dtype=F64), torch.softmax(logits, -1).cumsum(-1)], -1)
    edges, _ = piecewise_linear(knots.T.contiguous(), logits, inverse=True)
    expected = torch.linspace(0, 1, 6, dtype=F64).unsqueeze(-1).expand(6, 4)
    assert (edges - expected).abs().max() < 1e-13
    # float32 round trip
    z32 = torch.rand(300, 4, generator=g)
    back, _ = piecewise_linear(piecewise_linear(z32, logits.float())[0], logits.float(), True)
    assert (back - z32).abs().max() < 1e-5


def test_piecewise_linear_endpoints_and_outside_values_are_finite() -> None:
    logits = torch.randn(3, 4, generator=_gen(3), requires_grad=True)
    for inverse in (False, True):
        z = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, -3.0], [7.0, 1.0, 0.0]], requires_grad=True)
        out, lad = piecewise_linear(z, logits, inverse=inverse)
        assert bool(torch.isfinite(out).all() and torch.isfinite(lad).all())
        assert out[0, 0] == 0.0 and out[0, 1] == 1.0 and out[1, 0] == 1.0
        assert out[1, 2] == -3.0 and out[2, 0] == 7.0 and lad[1, 2] == 0 and lad[2, 0] == 0
        (out.sum() + lad.sum()).backward()
        assert bool(torch.isfinite(z.grad).all() and torch.isfinite(logits.grad).all())


def test_piecewise_linear_zero_logits_is_the_identity() -> None:
    z = torch.rand(10, 3, generator=_gen(4), dtype=F64)
    x, lad = piecewise_linear(z, torch.zeros(3, 8, dtype=F64))
    assert (x - z).abs().max() < 1e-15 and lad.abs().max() < 1e-15


def test_piecewise_linear_transformer() -> None:
    tr = PiecewiseLinearTransformer(bins=4)
    assert tr.params_per_feature == 4 and tr.identity_params().shape == (4,)
    z = torch.rand(6, 3, generator=_gen(5), dtype=F64)
    params = torch.randn(6, 3, 4, generator=_gen(6), dtype=F64)
    x, lad = tr(z, params)
    assert x.shape == lad.shape == (6, 3)
    assert torch.equal(x, piecewise_linear(z, params)[0])
    z2, lad2 = tr.inverse(x, params)
    assert (z2 - z).abs().max() < 1e-14 and (lad + lad2).abs().max() < 1e-14
    identity = tr.identity_params().to(F64).expand(6, 3, 4)
    assert (tr(z, identity)[0] - z).abs().max() < 1e-15
    with pytest.raises(PushforwardError, match=r"expected shape \(batch, features, 4\)"):
        tr(z, torch.zeros(6, 3, 5))


def test_piecewise_linear_transform_density_on_the_unit_cube() -> None:
    """Under a uniform base, log p(x) = -sum_i log(K Q_{i b_i}) (the paper's density)."""
    t = PiecewiseLinear(2, bins=3).double()
    with torch.no_grad():
        t.params.params["logits"].copy_(torch.log(torch.tensor([[0.5, 0.25, 0.25]] * 2)))
    x = torch.tensor([[0.1, 0.6], [0.9, 0.3]], dtype=F64)  # bins (0, 1) and (2, 0) in data space
    _, ladj = t.inverse(x)
    expected = -torch.log(torch.tensor([3 * 0.5 * 3 * 0.25, 3 * 0.25 * 3 * 0.5], dtype=F64))
    assert (ladj - expected).abs().max() < 1e-14


def test_piecewise_linear_errors() -> None:
    with pytest.raises(PushforwardError, match="bins must be a positive integer"):
        PiecewiseLinear(2, bins=0)
    with pytest.raises(PushforwardError, match=r"expected shape \(batch, 2\), got \(5, 4\)"):
        PiecewiseLinear(2)(torch.rand(5, 4))
    with pytest.raises(PushforwardError, match="conditional"):
        PiecewiseLinear(2, context_features=3)(torch.rand(5, 2))


# --- LeakyReLU ------------------------------------------------------------------------------


def test_leaky_relu_ladj_counts_negative_entries() -> None:
    t = LeakyReLU(0.1)
    z = torch.tensor([[-1.0, -2.0, 3.0, 0.0], [1.0, 2.0, 3.0, 4.0], [-1.0, -1.0, -1.0, -1.0]])
    x, ladj = t(z)
    assert torch.equal(x, torch.where(z < 0, 0.1 * z, z))
    expected = math.log(0.1) * torch.tensor([2.0, 0.0, 4.0])
    assert (ladj - expected).abs().max() < 1e-6
    z2, ladj2 = t.inverse(x)
    assert (z2 - z).abs().max() < 1e-6 and (ladj + ladj2).abs().max() < 1e-6


def test_leaky_relu_learnable_and_conditional() -> None:
    t = LeakyReLU(0.2, learnable=True)
    assert [n for n, _ in t.named_parameters()] == ["params.params.log_slope"]
    x, ladj = t(torch.tensor([[-1.0, 1.0]]))
    assert abs(x[0, 0].item() + 0.2) < 1e-6 and abs(ladj.item() - math.log(0.2)) < 1e-6
    c = LeakyReLU(0.2, learnable=True, context_features=3)
    x, ladj = c(torch.tensor([[-1.0, 1.0], [-2.0, -2.0]]), torch.randn(2, 3))
    assert abs(ladj[1].item() - 2 * math.log(0.2)) < 1e-5  # starts at the unconditional slope
    with pytest.raises(PushforwardError, match="conditional"):
        c(torch.randn(2, 2))
    with pytest.raises(PushforwardError, match="learnable=True"):
        LeakyReLU(context_features=3)
    for bad in (0.0, -0.5, math.inf, "a", True):
        with pytest.raises(PushforwardError, match="negative_slope"):
            LeakyReLU(bad)
    with pytest.raises(PushforwardError, match=r"expected shape \(batch, features\), got \(3,\)"):
        LeakyReLU()(torch.randn(3))


# --- the sigmoid family ---------------------------------------------------------------------


def test_log_sigmoid_derivative_matches_naive_formula() -> None:
    z = torch.linspace(-30, 30, 121, dtype=F64)
    naive = torch.log(torch.sigmoid(z) * torch.sigmoid(-z))  # accurate for |z| <= 30 in float64
    assert (log_sigmoid_derivative(z) - naive).abs().max() < 1e-12
    extreme = log_sigmoid_derivative(torch.tensor([-1e4, 1e4]))  # float32, where naive is -inf
    assert torch.equal(extreme, torch.tensor([-1e4, -1e4]))


def test_logit_ladj_against_finite_differences() -> None:
    h = 1e-6
    for alpha in (0.0, 0.05, 0.3):
        t = Logit(alpha).double()
        z = torch.tensor([[0.01, 0.3, 0.5, 0.97]], dtype=F64)
        x, ladj = t(z)
        deriv = (t(z + h)[0] - t(z - h)[0]) / (2 * h)  # elementwise: one central difference
        assert abs(ladj.item() - deriv.log().sum().item()) < 1e-6
        u = alpha + (1 - 2 * alpha) * z  # Real NVP's form of the log-determinant
        paper = (math.log(1 - 2 * alpha) - torch.log(u) - torch.log1p(-u)).sum()
        assert abs(ladj.item() - paper.item()) < 1e-12
        z2, ladj2 = t.inverse(x)
        assert (z2 - z).abs().max() < 1e-12 and abs((ladj + ladj2).item()) < 1e-12


def test_logit_of_the_image_flows_margin_is_accurate_in_float32() -> None:
    """The image recipes' default margin 1e-6 on dequantized 8-bit pixels, (k + u) / 256: in
    float32, 1 - u near 1 is ~4e-6, of which rounding leaves 1-2%; the log-determinant of one
    bright pixel may be off by ~0.013 nats (measured), but without bias (mean -3e-5 nats)."""
    t = Logit(1e-6)
    g = torch.Generator().manual_seed(0)
    k = torch.cat([torch.zeros(20_000), torch.full((20_000,), 255.0)])
    z = ((k + torch.rand(len(k), generator=g)) / 256).unsqueeze(-1)
    x32, ladj32 = t(z)
    ladj64 = t.double()(z.double())[1]
    error = ladj32.double() - ladj64
    assert error[:20_000].abs().max() < 1e-5  # dark pixels: exact to float32
    assert error.abs().max() < 0.03 and abs(error.mean()) < 2e-4
    assert (t.inverse(x32)[0] - z).abs().max() < 1e-6


def test_logit_is_the_inverse_of_sigmoid() -> None:
    x = torch.randn(5, 3, dtype=F64)
    a, la = Inverse(Logit()).forward(x)
    b, lb = Sigmoid()(x)
    assert (a - b).abs().max() < 1e-15 and (la - lb).abs().max() < 1e-13
    x = torch.tensor([[-0.02, 1.03]])  # inside the margin of alpha = 0.05
    assert bool(torch.isfinite(Logit(0.05)(x)[0]).all())
    with pytest.raises(PushforwardError, match="outside the interval"):
        Logit(0.05)(torch.tensor([[0.5, 1.2]]))
    for bad in (-0.1, 0.5, 1.0):
        with pytest.raises(PushforwardError, match="alpha"):
            Logit(bad)


def test_tanh_matches_torch_and_the_log_derivative() -> None:
    z = torch.linspace(-8, 8, 33, dtype=F64).reshape(11, 3)
    x, ladj = Tanh()(z)
    assert (x - torch.tanh(z)).abs().max() < 1e-15
    assert (ladj - torch.log1p(-(torch.tanh(z) ** 2)).sum(-1)).abs().max() < 1e-9
    tiny = torch.tensor([[1e-30, -1e-20]])  # full relative precision near 0 in both directions
    assert torch.equal(Tanh()(tiny)[0], tiny) and torch.equal(Tanh().inverse(tiny)[0], tiny)


@pytest.mark.parametrize("make", [Sigmoid, Tanh, LeakyReLU], ids=["sigmoid", "tanh", "leaky"])
def test_extreme_inputs_give_finite_outputs(make) -> None:
    t = make()
    z = torch.tensor([[-1e4, -100.0, -3.0, 0.0, 3.0, 100.0, 1e4]], requires_grad=True)
    x, ladj = t(z)
    assert bool(torch.isfinite(x).all() and torch.isfinite(ladj).all())
    (x.sum() + ladj.sum()).backward()
    assert bool(torch.isfinite(z.grad).all())
    # the saturated outputs (exactly 0, +-1) still invert to finite values
    z2, ladj2 = t.inverse(x.detach())
    assert bool(torch.isfinite(z2).all() and torch.isfinite(ladj2).all())
    assert (z2[0, 2:5] - z.detach()[0, 2:5]).abs().max() < 1e-5  # and exactly where not saturated


def test_inverse_domain_errors_and_endpoints() -> None:
    with pytest.raises(PushforwardError, match=r"Sigmoid: 1 input value\(s\) outside"):
        Sigmoid().inverse(torch.tensor([[0.5, 1.5]]))
    with pytest.raises(PushforwardError, match=r"outside the interval \[-1, 1\]"):
        Tanh().inverse(torch.tensor([[-1.2, 0.0]]))
    for dtype in (torch.float32, F64):
        for t, edges in ((Sigmoid(), [0.0, 1.0]), (Tanh(), [-1.0, 1.0]), (Logit(), [0.0, 1.0])):
            v = torch.tensor([edges], dtype=dtype)
            out, lad = t.inverse(v) if not isinstance(t, Logit) else t(v)
            assert bool(torch.isfinite(out).all() and torch.isfinite(lad).all()), type(t)


def test_event_dim_for_images() -> None:
    x = torch.rand(4, 2, 3, 3)
    for t in (
        Sigmoid(event_dim=3),
        Tanh(event_dim=3),
        Logit(0.05, event_dim=3),
        LeakyReLU(event_dim=3),
    ):
        out, ladj = t(x)
        assert out.shape == x.shape and ladj.shape == (4,)
        with pytest.raises(PushforwardError, match="3 event dimensions"):
            t(torch.rand(2, 3, 3))
