"""The Rezende-Mohamed potentials: values against the formulas of Table 1 written out by hand
with scalar math, finiteness (values and gradients) far from the modes where a naive
log(exp + exp) underflows, shapes, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from pushforward.core import PushforwardError
from pushforward.data.potentials import potential, potential_names


def _w1(z1: float) -> float:
    return math.sin(2 * math.pi * z1 / 4)


def _w2(z1: float) -> float:
    return 3 * math.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)


def _w3(z1: float) -> float:
    return 3 / (1 + math.exp(-(z1 - 1) / 0.3))


def _bump(t: float) -> float:
    return math.exp(-0.5 * t * t)


# Table 1 of arXiv:1505.05770, term by term (valid where nothing underflows)
REFERENCE = {
    "U1": lambda z1, z2: (
        0.5 * ((math.hypot(z1, z2) - 2) / 0.4) ** 2
        - math.log(_bump((z1 - 2) / 0.6) + _bump((z1 + 2) / 0.6))
    ),
    "U2": lambda z1, z2: 0.5 * ((z2 - _w1(z1)) / 0.4) ** 2,
    "U3": lambda z1, z2: (
        -math.log(_bump((z2 - _w1(z1)) / 0.35) + _bump((z2 - _w1(z1) + _w2(z1)) / 0.35))
    ),
    "U4": lambda z1, z2: (
        -math.log(_bump((z2 - _w1(z1)) / 0.4) + _bump((z2 - _w1(z1) + _w3(z1)) / 0.35))
    ),
}
POINTS = [(0.0, 0.0), (2.0, 0.0), (-1.5, 0.7), (1.0, 1.0), (0.3, -2.2), (2.5, -1.0)]


def test_names() -> None:
    assert potential_names() == ["U1", "U2", "U3", "U4"]


@pytest.mark.parametrize("name", ["U1", "U2", "U3", "U4"])
def test_values_match_table_1(name: str) -> None:
    z = torch.tensor(POINTS, dtype=torch.float64)
    got = potential(name)(z)
    expected = torch.tensor([-REFERENCE[name](*p) for p in POINTS], dtype=torch.float64)
    assert got.shape == (len(POINTS),)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_values_computed_by_hand() -> None:
    z = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    # U1(0) = 0.5 (2 / 0.4)^2 - log(2 exp(-0.5 (2 / 0.6)^2)) = 12.5 - log 2 + 50 / 9
    assert potential("U1")(z).item() == pytest.approx(-(12.5 - math.log(2) + 50 / 9), abs=1e-12)
    # U2(0, 0.4) = 0.5 (0.4 / 0.4)^2
    assert potential("U2")(torch.tensor([[0.0, 0.4]])).item() == pytest.approx(-0.5)
    # U4(1, 1): w1 = 1, w3 = 1.5: -log(1 + exp(-0.5 (1.5 / 0.35)^2))
    one = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    expected = -math.log1p(math.exp(-0.5 * (1.5 / 0.35) ** 2))
    assert potential("U4")(one).item() == pytest.approx(-expected, rel=1e-12)


@pytest.mark.parametrize("name", ["U1", "U2", "U3", "U4"])
def test_finite_values_and_gradients_on_a_big_grid(name: str) -> None:
    axis = torch.linspace(-60.0, 60.0, 121)
    z = torch.cartesian_prod(axis, axis)
    z = torch.cat([z, torch.tensor([[0.0, 0.0], [1e4, -1e4], [0.0, 300.0]])])
    z.requires_grad_(True)
    log_p = potential(name)(z)
    assert torch.isfinite(log_p).all()
    (grad,) = torch.autograd.grad(log_p.sum(), z)
    assert torch.isfinite(grad).all()
    # far from the modes the density is tiny, not zero: log(exp + exp) would give -inf here
    assert log_p[-1] < -1e4


def test_shapes_dtype_and_case() -> None:
    z = torch.randn(3, 4, 2, dtype=torch.float64)
    out = potential("u3")(z)
    assert out.shape == (3, 4) and out.dtype == torch.float64


def test_errors_name_the_problem() -> None:
    with pytest.raises(PushforwardError, match="U1, U2, U3, U4"):
        potential("U5")
    with pytest.raises(PushforwardError, match=r"expected shape \(batch, 2\)"):
        potential("U1")(torch.zeros(5, 3))
