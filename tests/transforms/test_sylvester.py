"""Sylvester flows beyond the shared contract: Q's orthonormality, the triangular structure in
Q's coordinates, exact inverses next to the invertibility boundary and for extreme inputs,
amortized parameters per context row, and clear errors."""

from __future__ import annotations

import doctest

import pytest
import torch

from pushforward.core import Inverse, PushforwardError
from pushforward.transforms import sylvester as sylvester_module
from pushforward.transforms.householder import householder_product
from pushforward.transforms.sylvester import (
    SylvesterHouseholder,
    SylvesterOrthogonal,
    SylvesterTriangular,
    orthogonalize,
)

D64 = torch.float64


def orthonormality_error(q: torch.Tensor) -> float:
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return (q.mT @ q - eye).abs().max().item()


def row_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Max-norm error of each row relative to max(1, |b|) of the row (Q mixes coordinates)."""
    return (a - b).abs().amax(-1) / b.abs().amax(-1).clamp_min(1.0)


def randomize(t: torch.nn.Module, seed: int, scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in t.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def set_diagonals(t: torch.nn.Module, r: float, r_tilde: float) -> None:
    with torch.no_grad():
        t.params.params["r_diag"].fill_(r)
        t.params.params["r_tilde_diag"].fill_(r_tilde)


def make(kind: str, d: int, m: int | None = None, **kw) -> torch.nn.Module:
    if kind == "orthogonal":
        return SylvesterOrthogonal(d, m=m, **kw)
    if kind == "householder":
        return SylvesterHouseholder(d, reflections=3, **kw)
    return SylvesterTriangular(d, flip=kind == "triangular_flip", **kw)


KINDS = ["orthogonal", "householder", "triangular", "triangular_flip"]


# --- Q ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (5, 3), (5, 5), (16, 8), (7, 2, 4, 4)])
def test_orthogonalize_reaches_float64_precision_and_the_polar_factor(shape):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(*shape, generator=g, dtype=D64)
    q = orthogonalize(a)
    assert q.shape == a.shape
    assert orthonormality_error(q) < 1e-13
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    torch.testing.assert_close(q, u @ vh, rtol=0, atol=1e-12)


@pytest.mark.parametrize("condition", [1e2, 1e6, 1e10])
def test_orthogonalize_ill_conditioned_and_scaled_matrices(condition):
    g = torch.Generator().manual_seed(1)
    u = torch.linalg.qr(torch.randn(6, 4, generator=g, dtype=D64))[0]
    v = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=D64))[0]
    s = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), 4, dtype=D64)
    for scale in (1e-150, 1.0, 1e150):
        q = orthogonalize(scale * (u * s) @ v.T)
        assert orthonormality_error(q) < 1e-13
        torch.testing.assert_close(q, u @ v.T, rtol=0, atol=1e-12 * condition)


def test_orthogonalize_float32_and_batch_independence():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(9, 5, 3, generator=g)
    a[0] = a[0] @ torch.diag(torch.tensor([1.0, 1e-3, 1e-5]))  # needs many more steps
    q = orthogonalize(a)
    assert orthonormality_error(q) < 1e-5
    # each matrix stops on its own: the same result alone as in the batch, up to rounding
    for i in range(9):
        torch.testing.assert_close(orthogonalize(a[i]), q[i], rtol=0, atol=1e-6)


def test_orthogonalize_gradient():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 2, generator=g, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(orthogonalize, (a,))


def test_orthogonalize_errors():
    with pytest.raises(PushforwardError, match="rank deficient"):
        orthogonalize(torch.zeros(3, 2, dtype=D64))
    with pytest.raises(PushforwardError, match="M <= d"):
        orthogonalize(torch.randn(2, 3))
    with pytest.raises(PushforwardError, match="rank deficient"):
        orthogonalize(torch.randn(5, 3) @ torch.diag(torch.tensor([1.0, 1e-3, 1e-4])), max_steps=5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("context_features", [0, 3])
def test_q_is_orthonormal_for_every_transform(kind, context_features):
    t = make(kind, 5, m=3, context_features=context_features, hidden=(16,)).double()
    randomize(t, 4)
    c = torch.randn(6, 3, dtype=D64) if context_features else None
    q = t.q_matrix(c)
    m = 3 if kind == "orthogonal" else 5
    assert q.shape == ((6, 5, m) if context_features else (5, m))
    assert orthonormality_error(q) < 1e-13


def test_q_of_the_householder_and_triangular_variants():
    t = SylvesterHouseholder(4, reflections=3).double()
    randomize(t, 5)
    torch.testing.assert_close(t.q_matrix(), householder_product(t.params.params["vectors"]))
    eye = torch.eye(4, dtype=D64)
    torch.testing.assert_close(SylvesterTriangular(4).double().q_matrix(), eye)
    torch.testing.assert_close(SylvesterTriangular(4, flip=True).double().q_matrix(), eye.flip(0))


# --- the map ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_forward_is_the_sylvester_map_with_its_triangular_determinant(kind):
    t = make(kind, 5, m=3).double()
    randomize(t, 6)
    q = t.q_matrix()
    c = t.coefficients()
    r, rt, b = c["r"], c["r_tilde"], c["b"]
    assert torch.equal(r, r.triu()) and torch.equal(rt, rt.triu())
    z = torch.randn(8, 5, dtype=D64)
    a = z @ q @ rt.T + b
    x, ladj = t(z)
    torch.testing.assert_close(x, z + torch.tanh(a) @ r.T @ q.T)
    slope = 1 + torch.diagonal(r) * torch.diagonal(rt) * (1 - torch.tanh(a) ** 2)
    torch.testing.assert_close(ladj, torch.log(slope).sum(-1))
    # the directions orthogonal to Q's columns are unchanged
    complement = torch.eye(5, dtype=D64) - q @ q.T
    torch.testing.assert_close((x - z) @ complement, torch.zeros_like(z), rtol=0, atol=1e-14)


@pytest.mark.parametrize("flip", [False, True])
def test_triangular_variant_is_triangular(flip):
    t = SylvesterTriangular(4, flip=flip).double()
    randomize(t, 7)
    jac = torch.autograd.functional.jacobian(lambda u: t(u[None])[0][0], torch.randn(4, dtype=D64))
    other = jac.tril(-1) if not flip else jac.triu(1)
    assert other.abs().max() == 0 and jac.abs().max() > 0


@pytest.mark.parametrize("raw", [0.5, 5.0, 20.0, 1e4])
def test_the_diagonal_constraint_holds_for_extreme_parameters(raw):
    t = SylvesterTriangular(3).double()
    randomize(t, 8)
    set_diagonals(t, raw, -raw)
    c = t.coefficients()
    opr = c["one_plus_rho"]
    assert (opr > 0).all()
    exact = 1 - torch.tanh(torch.tensor(raw, dtype=D64)) ** 2
    expected = exact.clamp_min(torch.finfo(D64).tiny).expand(3)
    if raw < 20:  # computed without cancellation (1 - tanh^2 is exact enough here)
        torch.testing.assert_close(opr, expected, rtol=1e-12, atol=0)
    set_diagonals(t, raw, raw)
    same_sign = 1 + torch.tanh(torch.tensor(raw, dtype=D64)) ** 2
    torch.testing.assert_close(t.coefficients()["one_plus_rho"], same_sign.expand(3))


# --- inverse ----------------------------------------------------------------------------------


def jacobian(t: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """dx/dz = I + Q R diag(tanh'(a)) R~ Q^T, one (d, d) matrix per row of z."""
    q, c = t.q_matrix(), t.coefficients()
    a = z @ q @ c["r_tilde"].T + c["b"]
    inner = c["r"] * (1 - torch.tanh(a) ** 2).unsqueeze(-2) @ c["r_tilde"]
    return torch.eye(z.shape[-1], dtype=z.dtype) + q @ inner @ q.T


@pytest.mark.parametrize("kind", KINDS + ["orthogonal_m2"])
@pytest.mark.parametrize("raw", [0.0, 4.0, 8.0, 12.0])
def test_inverse_is_exact_up_to_the_conditioning_near_the_boundary(kind, raw):
    """With every 1 + r_ii r~_ii down to ~1.5e-10 (raw = 12) and random off-diagonals, inputs
    up to |z| ~ 1e3, float64: the computed inverse maps back onto x to rounding (backward error
    ~1e-15), its error is at most 1e-10 plus a few ulps times the condition number of the
    inverse (which compounds the factors 1 / (1 + r_ii r~_ii tanh'(a_i)) along the triangle:
    no method can do better from a rounded x), and its ladj is minus the forward one at the
    solution."""
    eps = torch.finfo(D64).eps
    for seed in range(4):
        t = (make("orthogonal", 5, m=2) if kind == "orthogonal_m2" else make(kind, 5)).double()
        randomize(t, 100 + seed)
        set_diagonals(t, raw, -raw)
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(64, 5, generator=g, dtype=D64)
        z = z * torch.logspace(-3, 3, 64, dtype=D64)[:, None]
        x, lf = t(z)
        z2, li = t.inverse(x)
        x2, lf2 = t(z2)
        assert row_error(x2, x).max() < 1e-14
        # the ladj sums logs of size up to ~23: a few ulps of that, whatever the BLAS kernel
        torch.testing.assert_close(li, -lf2, rtol=1e-13, atol=1e-12)
        size = x.abs().amax(-1).clamp_min(1) / z.abs().amax(-1).clamp_min(1)
        condition = torch.linalg.matrix_norm(torch.linalg.inv(jacobian(t, z)), ord=2) * size
        bound = 1e-10 + 8 * eps * condition
        assert (row_error(z2, z) <= bound).all(), f"{(row_error(z2, z) / bound).max():.3g}"


@pytest.mark.parametrize("kind", KINDS + ["orthogonal_m2"])
def test_inverse_to_1e_10_next_to_the_boundary(kind):
    """Every 1 + r_ii r~_ii ~ 2.5e-5 (raw = 6): the coordinates do not compound (R and R~
    diagonal) and the round trip holds to 1e-10 relative, inputs up to |z| ~ 1e3."""
    worst = 0.0
    for seed in range(4):
        t = (make("orthogonal", 5, m=2) if kind == "orthogonal_m2" else make(kind, 5)).double()
        randomize(t, 200 + seed)
        set_diagonals(t, 6.0, -6.0)
        with torch.no_grad():
            t.params.params["r_upper"].zero_()
            t.params.params["r_tilde_upper"].zero_()
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(256, 5, generator=g, dtype=D64)
        z = z * torch.logspace(-3, 3, 256, dtype=D64)[:, None]
        x, lf = t(z)
        z2, li = t.inverse(x)
        worst = max(worst, row_error(z2, z).max().item())
        torch.testing.assert_close(lf + li, torch.zeros_like(lf), rtol=0, atol=1e-8)
    assert worst < 1e-10, f"worst relative round-trip error {worst:.3g}"


@pytest.mark.parametrize("kind", KINDS)
def test_inverse_gradients_are_exact(kind):
    """Gradients of the inverse (z and ladj) with respect to x and to every parameter, through
    the implicit steps of the back-substitution, against finite differences."""
    inv = Inverse(make(kind, 3, m=2).double())
    randomize(inv, 9)
    names = [name for name, _ in inv.named_parameters()]
    values = tuple(p.detach().clone().requires_grad_() for p in inv.parameters())
    x = torch.randn(4, 3, dtype=D64, requires_grad=True)

    def inverse(x: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.func.functional_call(inv, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(inverse, (x, *values), atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_extreme_finite_inputs_float32(kind):
    t = make(kind, 5, m=3)
    randomize(t, 10)
    g = torch.Generator().manual_seed(11)
    z = torch.randn(64, 5, generator=g) * torch.logspace(-4, 4, 64)[:, None]
    z[0] = torch.tensor([1e4, -1e4, 1e4, -1e4, 0.0])
    x, lf = t(z)
    assert torch.isfinite(x).all() and torch.isfinite(lf).all()
    z2, li = t.inverse(x.detach())
    assert torch.isfinite(z2).all() and torch.isfinite(li).all()
    assert row_error(z2, z).max() < 1e-5
    assert (lf + li).abs().max() < 1e-4
    # and the inverse of arbitrary extreme points (not images of moderate ones)
    with torch.no_grad():
        w, lw = t.inverse(torch.full((3, 5), 1e4) * torch.tensor([[1.0], [-1.0], [0.5]]))
    assert torch.isfinite(w).all() and torch.isfinite(lw).all()
    # gradients of both directions stay finite
    (x.sum() + lf.sum() + z2.sum() + li.sum()).backward()
    for name, p in t.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    # extreme parameters (r_ii r~_ii = -1 in float32): no NaN either
    set_diagonals(t, 1e4, -1e4)
    with torch.no_grad():
        x, lf = t(z)
        z2, li = t.inverse(x)
    assert torch.isfinite(x).all() and torch.isfinite(lf).all()
    assert torch.isfinite(z2).all() and torch.isfinite(li).all()


# --- amortized parameters ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_amortized_parameters_differ_per_context_row(kind):
    t = make(kind, 4, m=3, context_features=3, hidden=(16,)).double()
    randomize(t, 12, scale=0.5)
    g = torch.Generator().manual_seed(13)
    c = torch.randn(7, 3, generator=g, dtype=D64)
    z = torch.randn(7, 4, generator=g, dtype=D64)
    x, lf = t(z, c)
    z2, li = t.inverse(x, c)
    coefficients = t.coefficients(c)
    assert (coefficients["r"][0] - coefficients["r"][1]).abs().max() > 1e-3
    if kind in ("orthogonal", "householder"):
        q = t.q_matrix(c)
        assert (q[0] - q[1]).abs().max() > 1e-3
    for i in range(7):
        xi, lfi = t(z[i : i + 1], c[i : i + 1])
        torch.testing.assert_close(xi[0], x[i], rtol=0, atol=1e-13)
        torch.testing.assert_close(lfi[0], lf[i], rtol=0, atol=1e-13)
        zi, lii = t.inverse(x[i : i + 1], c[i : i + 1])
        torch.testing.assert_close(zi[0], z2[i], rtol=0, atol=1e-12)
        torch.testing.assert_close(lii[0], li[i], rtol=0, atol=1e-12)
        # the same point under another row's context maps elsewhere
        other = t(z[i : i + 1], c[(i + 1) % 7 : (i + 1) % 7 + 1])[0]
        assert (other - xi).abs().max() > 1e-6
    torch.testing.assert_close(z2, z, rtol=0, atol=1e-10)


# --- errors and docs --------------------------------------------------------------------------


def test_errors():
    with pytest.raises(PushforwardError, match="m .* must be at most features = 3"):
        SylvesterOrthogonal(3, m=4)
    with pytest.raises(PushforwardError, match="m must be a positive integer"):
        SylvesterOrthogonal(3, m=0)
    with pytest.raises(PushforwardError, match="features must be a positive integer"):
        SylvesterTriangular(0)
    with pytest.raises(PushforwardError, match="reflections must be a positive integer"):
        SylvesterHouseholder(3, reflections=0)
    with pytest.raises(PushforwardError, match="flip must be True or False"):
        SylvesterTriangular(3, flip="yes")
    with pytest.raises(PushforwardError, match="ortho_steps must be a positive integer"):
        SylvesterOrthogonal(3, ortho_steps=0)
    with pytest.raises(PushforwardError, match="ortho_tol must be in"):
        SylvesterOrthogonal(3, ortho_tol=0.0)
    t = SylvesterOrthogonal(3, m=2)
    with pytest.raises(PushforwardError, match=r"expected shape \(batch, 3\), got \(2, 4\)"):
        t(torch.zeros(2, 4))
    with pytest.raises(PushforwardError, match=r"expected shape \(batch, 3\)"):
        t.inverse(torch.zeros(3))
    with pytest.raises(PushforwardError, match="NaN or infinite"):
        t.inverse(torch.tensor([[0.0, float("nan"), 1.0]]))
    with torch.no_grad():
        t.params.params["q"].zero_()
    with pytest.raises(PushforwardError, match="rank deficient"):
        t(torch.zeros(2, 3))
    conditional = SylvesterHouseholder(3, context_features=2, hidden=(8,))
    with pytest.raises(PushforwardError, match="conditional"):
        conditional(torch.zeros(2, 3))


def test_doctests() -> None:
    torch.set_default_dtype(torch.float32)
    result = doctest.testmod(sylvester_module, extraglobs={"torch": torch}, report=False)
    assert result.attempted > 0 and result.failed == 0, f"{result}"
