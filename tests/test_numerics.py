"""Bracketed root finding and the small stable helpers of :mod:`pushforward.numerics`."""

from __future__ import annotations

import pytest
import torch

from pushforward.core import PushforwardError
from pushforward.numerics import default_tol, implicit_step, monotone_solve, safe_norm

DTYPES = [torch.float32, torch.float64]


def cube(u: torch.Tensor) -> torch.Tensor:
    return u**3


def dcube(u: torch.Tensor) -> torch.Tensor:
    return 3 * u**2


class Counted:
    """Wrap ``f`` to count its evaluations."""

    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, u):
        self.calls += 1
        return self.f(u)


def assert_solved(u, expected, lo, hi, dtype, factor=4.0):
    tol = default_tol(dtype)
    assert u.dtype == dtype and not torch.isnan(u).any()
    assert (u >= lo).all() and (u <= hi).all(), "left the bracket"
    err = ((u - expected).abs() / expected.abs().clamp_min(1.0)).max().item()
    assert err <= factor * tol, f"relative error {err:.3g} > {factor * tol:.1g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("newton", [False, True])
def test_cube_root_batched(dtype, newton):
    expected = torch.linspace(-3, 3, 40, dtype=dtype).reshape(4, 2, 5)
    lo = torch.full((5,), -5.0, dtype=dtype)  # broadcasts against target
    hi = torch.tensor(4.0, dtype=dtype)
    u = monotone_solve(cube, expected**3, lo, hi, df=dcube if newton else None)
    assert u.shape == (4, 2, 5)
    assert_solved(u, expected, lo, hi, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("newton", [False, True])
def test_sigmoid_inverse_is_logit(dtype, newton):
    p = torch.linspace(0.05, 0.95, 19, dtype=dtype)
    lo, hi = torch.tensor(-30.0, dtype=dtype), torch.tensor(30.0, dtype=dtype)

    def dsigmoid(u):
        s = torch.sigmoid(u)
        return s * (1 - s)

    u = monotone_solve(torch.sigmoid, p, lo, hi, df=dsigmoid if newton else None)
    # the logit's conditioning at 0.95 is 1 / (0.95 * 0.05) ~ 21: allow that on top of tol
    assert_solved(u, torch.logit(p), lo, hi, dtype, factor=64.0)


def test_newton_needs_far_fewer_evaluations_than_bisection():
    target = torch.tensor([0.3, 5.0, 120.0], dtype=torch.float64)
    lo, hi = torch.tensor(0.0, dtype=torch.float64), torch.tensor(10.0, dtype=torch.float64)
    f_bisect, f_newton = Counted(cube), Counted(cube)
    a = monotone_solve(f_bisect, target, lo, hi)
    b = monotone_solve(f_newton, target, lo, hi, df=dcube)
    torch.testing.assert_close(a, b, rtol=1e-11, atol=0)
    assert f_newton.calls < 15 < 35 < f_bisect.calls


def test_bracket_is_respected_even_when_the_root_is_outside():
    # f(u) = u has its root 7 outside [0, 1]: the answer is the nearest end, never beyond
    u = monotone_solve(
        lambda u: u,
        torch.tensor([7.0, -7.0]),
        torch.tensor(0.0),
        torch.tensor(1.0),
        df=torch.ones_like,
    )
    assert u.tolist() == pytest.approx([1.0, 0.0], abs=1e-5)


def test_root_at_a_bracket_end_and_degenerate_bracket():
    lo = torch.tensor([2.0, 1.5], dtype=torch.float64)
    hi = torch.tensor([3.0, 1.5], dtype=torch.float64)
    u = monotone_solve(cube, torch.tensor([8.0, 1.5**3], dtype=torch.float64), lo, hi, df=dcube)
    assert u.tolist() == pytest.approx([2.0, 1.5], rel=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_nan_where_f_overflows_or_the_derivative_vanishes(dtype):
    # exp overflows at the top of the bracket (inf / inf Newton steps must fall back)
    lo = torch.tensor(-1000.0, dtype=dtype)
    hi = torch.tensor(torch.finfo(dtype).max / 4, dtype=dtype)
    target = torch.tensor([1e-3, 2.0, 1e30], dtype=dtype)
    u = monotone_solve(torch.exp, target, lo, hi, df=torch.exp)
    assert_solved(u, torch.log(target), lo, hi, dtype, factor=16.0)
    # u^3 at its root 0 has f' = 0 (Newton divides by zero), sign(u)|u|^(1/3) has f' = inf
    z = torch.zeros(3, dtype=dtype)
    u = monotone_solve(
        cube, z, torch.tensor(-1.0, dtype=dtype), torch.tensor(2.0, dtype=dtype), df=dcube
    )
    assert not torch.isnan(u).any() and u.abs().max() < 1e-3
    cbrt = lambda u: u.sign() * u.abs() ** (1 / 3)  # noqa: E731
    dcbrt = lambda u: u.abs() ** (-2 / 3) / 3  # noqa: E731
    u = monotone_solve(
        cbrt,
        torch.tensor([0.0, 0.5], dtype=dtype),
        torch.tensor(-1.0, dtype=dtype),
        torch.tensor(1.0, dtype=dtype),
        df=dcbrt,
    )
    assert_solved(u, torch.tensor([0.0, 0.125], dtype=dtype), -1.0, 1.0, dtype)


def test_custom_tolerance_and_iteration_cap():
    target = torch.tensor([2.0], dtype=torch.float64)
    lo, hi = torch.tensor(0.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    u = monotone_solve(cube, target, lo, hi, tol=1e-3)
    assert abs(u.item() - 2 ** (1 / 3)) < 2e-3
    u = monotone_solve(cube, target, lo, hi, max_iter=3)  # 3 bisections: within 2 / 2^3
    assert abs(u.item() - 2 ** (1 / 3)) <= 0.25


def test_result_is_a_constant_for_autograd():
    target = torch.tensor([8.0], requires_grad=True)
    u = monotone_solve(cube, target, torch.tensor(0.0), torch.tensor(3.0), df=dcube)
    assert not u.requires_grad


def test_bad_brackets_raise():
    with pytest.raises(PushforwardError, match="lo > hi"):
        monotone_solve(cube, torch.zeros(2), torch.tensor([0.0, 1.0]), torch.tensor(0.5))
    with pytest.raises(PushforwardError, match="finite"):
        monotone_solve(cube, torch.zeros(2), torch.tensor(-float("inf")), torch.tensor(1.0))


def test_implicit_step_gives_exact_gradients():
    theta = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1.0, -3.0], dtype=torch.float64, requires_grad=True)

    def f(u):
        return u + theta * torch.tanh(u)

    def df(u):
        return 1 + theta / torch.cosh(u) ** 2

    lo, hi = target.detach() - 3, target.detach() + 3
    u0 = monotone_solve(f, target, lo, hi, df=df)
    u = implicit_step(f, target, u0, df)
    torch.testing.assert_close(u, u0, rtol=1e-15, atol=1e-15)  # the value does not move
    gt, gtheta = torch.autograd.grad(u.sum(), (target, theta))
    slope = df(u0).detach()
    torch.testing.assert_close(gt, 1 / slope)
    torch.testing.assert_close(gtheta, -torch.tanh(u0) / slope)


def test_implicit_step_gives_exact_second_derivatives():
    # u(t) solves u + theta tanh(u) = t: u' = 1 / f'(u), u'' = -f''(u) / f'(u)^3, with
    # f''(u) = -2 theta tanh(u) / cosh(u)^2 (one Newton step alone would give u'' = 0)
    theta = torch.tensor([0.5, 2.0, -0.4], dtype=torch.float64)
    target = torch.tensor([1.0, -3.0, 0.3], dtype=torch.float64, requires_grad=True)

    def f(u):
        return u + theta * torch.tanh(u)

    def df(u):
        return 1 + theta / torch.cosh(u) ** 2

    u0 = monotone_solve(f, target, target.detach() - 3, target.detach() + 3, df=df)
    u = implicit_step(f, target, u0, df)
    (first,) = torch.autograd.grad(u.sum(), target, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), target)
    d2f = -2 * theta * torch.tanh(u0) / torch.cosh(u0) ** 2
    torch.testing.assert_close(second, -d2f / df(u0) ** 3, rtol=1e-12, atol=1e-14)


def test_monotone_solve_under_vmap():
    # vmap cannot branch on the data: every iteration runs, and the roots are the same
    targets = torch.tensor([8.0, -1.0, 27.0, 1e-3], dtype=torch.float64)

    def solve(t):
        lo, hi = torch.tensor(-10.0, dtype=torch.float64), torch.tensor(10.0, dtype=torch.float64)
        return monotone_solve(lambda u: u**3, t, lo, hi, df=lambda u: 3 * u**2)

    torch.testing.assert_close(torch.func.vmap(solve)(targets), solve(targets), rtol=0, atol=0)


def test_safe_norm():
    v = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(safe_norm(v), torch.linalg.vector_norm(v, dim=-1))
    big = torch.tensor([[3e200, -4e200], [3e-200, 4e-200]], dtype=torch.float64)
    torch.testing.assert_close(safe_norm(big), torch.tensor([5e200, 5e-200], dtype=torch.float64))
    z = torch.zeros(2, 3, requires_grad=True)
    safe_norm(z).sum().backward()
    assert torch.equal(z.grad, torch.zeros(2, 3))
