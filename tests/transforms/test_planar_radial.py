"""Planar and radial flows beyond the shared contract: the invertibility constraint, exact
inverses over many parameter draws and extreme inputs, and clear errors."""

from __future__ import annotations

import pytest
import torch

from pushforward.core import PushforwardError
from pushforward.transforms.planar_radial import Planar, Radial

D64 = torch.float64
SCALES = torch.logspace(-3, 3, 64, dtype=D64)  # input magnitudes of the round-trip tests


def set_params(t: torch.nn.Module, **values: torch.Tensor) -> None:
    with torch.no_grad():
        for name, value in values.items():
            t.params.params[name].copy_(value)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs() / b.abs().clamp_min(1.0)).max().item()


@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0, 1e4])
def test_planar_constraint_holds_for_random_and_extreme_parameters(scale):
    g = torch.Generator().manual_seed(0)
    t = Planar(4).double()
    for _ in range(20):
        u = scale * torch.randn(4, generator=g, dtype=D64)
        w = torch.randn(4, generator=g, dtype=D64)
        set_params(t, u=u, w=w)
        c = t.coefficients()
        wu_hat = (c["w"] * c["u_hat"]).sum(-1)
        assert c["wu_hat"] >= -1 and wu_hat >= -1 - 1e-9 * scale
        torch.testing.assert_close(wu_hat, c["wu_hat"], rtol=1e-9, atol=1e-9 * scale)
    # w^T u = -1e4: softplus underflows, the floor keeps 1 + w^T u_hat > 0
    set_params(t, u=-1e4 * w / (w * w).sum(), w=w)
    c = t.coefficients()
    assert c["softplus_wu"] > 0 and c["wu_hat"] >= -1
    # the reparameterisation only moves u along w, to w^T u_hat = softplus(w^T u) - 1
    set_params(t, u=10 * w / (w * w).sum(), w=w)
    expected = (torch.nn.functional.softplus(torch.tensor(10.0, dtype=D64)) - 1) * w / (w * w).sum()
    torch.testing.assert_close(t.coefficients()["u_hat"], expected)


@pytest.mark.parametrize("activation", ["tanh", "leaky_relu"])
def test_planar_round_trip_over_many_parameter_draws(activation):
    """Round trip below 1e-8 in float64, for 100 random parameter sets (a quarter next to the
    boundary w^T u_hat = -1), inputs up to |z| ~ 1e3.

    With leaky_relu the whole half-space a > 0 is contracted along w by 1 + w^T u_hat, so x
    itself only holds the digits of z up to that factor: its boundary draws stay at 1e-2."""
    g = torch.Generator().manual_seed(1)
    t = Planar(5, activation=activation).double()
    boundary = -12.0 if activation == "tanh" else -4.6
    worst = 0.0
    for i in range(100):
        w = torch.randn(5, generator=g, dtype=D64) * 3 ** torch.randn((), generator=g)
        wu = boundary if i % 4 == 0 else 4 * torch.randn((), generator=g).item()
        u = wu * w / (w * w).sum() + torch.randn(5, generator=g, dtype=D64) * 0.1
        u = u - (w * u).sum() / (w * w).sum() * w + wu * w / (w * w).sum()  # exact w^T u = wu
        set_params(t, u=u, w=w, b=3 * torch.randn((), generator=g, dtype=D64))
        z = (
            torch.randn(64, 5, generator=g, dtype=D64)
            * torch.logspace(-1, 3, 64, dtype=D64)[:, None]
        )
        x, lf = t(z)
        z2, li = t.inverse(x)
        worst = max(worst, relative_error(z2, z))
        # next to the boundary the ladj varies fast with a (g''/g' up to ~1/sqrt(1 + w^T u_hat))
        torch.testing.assert_close(lf + li, torch.zeros_like(lf), rtol=0, atol=1e-8)
    assert worst < 1e-8, f"worst relative round-trip error {worst:.3g}"


def test_radial_round_trip_over_many_parameter_draws():
    g = torch.Generator().manual_seed(2)
    t = Radial(5).double()
    worst = 0.0
    for _ in range(100):
        set_params(
            t,
            z0=torch.randn(5, generator=g, dtype=D64),
            alpha_raw=4 * torch.randn((), generator=g, dtype=D64),
            beta_raw=4 * torch.randn((), generator=g, dtype=D64),
        )
        z = (
            torch.randn(64, 5, generator=g, dtype=D64)
            * torch.logspace(-3, 3, 64, dtype=D64)[:, None]
        )
        x, lf = t(z)
        z2, li = t.inverse(x)
        worst = max(worst, relative_error(z2, z))
        torch.testing.assert_close(lf + li, torch.zeros_like(lf), rtol=0, atol=1e-9)
    assert worst < 1e-8, f"worst relative round-trip error {worst:.3g}"


def test_float32_round_trip():
    torch.manual_seed(3)
    z = torch.randn(200, 4)
    for t in (Planar(4), Radial(4)):
        x, lf = t(z)
        z2, li = t.inverse(x)
        torch.testing.assert_close(z2, z, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lf + li, torch.zeros_like(lf), rtol=0, atol=1e-5)


def test_planar_log_determinant_is_accurate_next_to_the_boundary():
    """With w^T u_hat = -1 + 6e-6, float32 still matches the float64 ladj to 1e-5 relative (the
    naive log(1 + h' w^T u_hat) loses all digits where h' ~ 1)."""
    w = torch.tensor([1.0, 2.0, -0.5])
    t32 = Planar(3)
    set_params(t32, u=-12 * w / (w * w).sum(), w=w, b=torch.tensor(0.0))
    t64 = Planar(3).double()
    t64.load_state_dict(t32.state_dict())
    z = torch.randn(500, 3) * 1e-2  # a = w^T z close to 0, where h'(a) ~ 1
    l32 = t32(z)[1]
    l64 = t64(z.double())[1]
    assert relative_error(l32.double(), l64) < 1e-5 * l64.abs().max().item()
    assert torch.isfinite(t32.inverse(t32(z)[0])[1]).all()


def test_radial_inverse_at_the_centre():
    t = Radial(3).double()
    set_params(t, z0=torch.tensor([1.0, -2.0, 0.5], dtype=D64))
    c = t.coefficients()
    x = c["z0"].detach().clone().expand(2, 3).requires_grad_(True)
    z, li = t.inverse(x)
    assert torch.equal(z, x.detach())
    expected = -3 * torch.log(c["alpha_plus_beta"] / c["alpha"])  # the scale 1 + beta / alpha
    torch.testing.assert_close(li, expected.detach().expand(2))
    (z.sum() + li.sum()).backward()
    assert torch.isfinite(x.grad).all()
    # and the forward map fixes the centre
    assert torch.equal(t(c["z0"].detach()[None])[0][0], c["z0"].detach())


@pytest.mark.parametrize(
    "make",
    [lambda: Planar(3), lambda: Planar(3, activation="leaky_relu"), lambda: Radial(3)],
    ids=["planar", "planar_leaky", "radial"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_nan_for_extreme_finite_inputs(make, dtype):
    t = make().to(dtype)
    big = torch.finfo(dtype).max ** 0.75
    tiny = torch.finfo(dtype).tiny
    z = torch.tensor(
        [[big, -big, 1.0], [tiny, 0.0, -tiny], [0.0, 0.0, 0.0], [big, big, big]], dtype=dtype
    )
    for v in (z, -z):
        for out, ladj in (t(v), t.inverse(v)):
            assert not torch.isnan(out).any() and not torch.isnan(ladj).any()
            assert torch.isfinite(ladj).all()


def test_conditional_parameters_follow_the_context():
    t = Planar(2, context_features=3).double()
    c = torch.randn(4, 3, dtype=D64)
    z = torch.randn(4, 2, dtype=D64)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.1 * torch.randn_like(p))
    coefficients = t.coefficients(c)
    assert coefficients["u_hat"].shape == (4, 2) and coefficients["b"].shape == (4,)
    assert (coefficients["wu_hat"] >= -1).all()
    x, _ = t(z, c)
    torch.testing.assert_close(t.inverse(x, c)[0], z, rtol=0, atol=1e-10)
    with pytest.raises(PushforwardError, match="conditional"):
        t(z)


def test_errors_name_the_problem():
    with pytest.raises(PushforwardError, match=r"unknown activation 'relu'; choose from tanh"):
        Planar(2, activation="relu")
    with pytest.raises(PushforwardError, match="features must be a positive integer"):
        Radial(0)
    with pytest.raises(PushforwardError, match=r"expected shape \(batch, 3\), got \(5, 4\)"):
        Planar(3)(torch.randn(5, 4))
    with pytest.raises(PushforwardError, match=r"expected shape \(batch, 3\), got \(5, 4\)"):
        Radial(3).inverse(torch.randn(5, 4))
    with pytest.raises(PushforwardError, match="NaN"):
        Planar(2).inverse(torch.tensor([[float("nan"), 0.0]]))
