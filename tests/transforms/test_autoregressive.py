"""Autoregressive layers and the affine/additive transformers, beyond the shared contract: the
fast sequential direction against the d-pass reference, triangular Jacobians in the ordering,
identity at initialisation, IAF as ``Inverse``, and the transformers' own maps."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

import pushforward.transforms.autoregressive as autoregressive_module
import pushforward.transforms.transformers as transformers_module
from pushforward.core import Inverse, PushforwardError
from pushforward.transforms.autoregressive import MaskedAutoregressive, iaf_layer
from pushforward.transforms.elementwise import PiecewiseLinearTransformer
from pushforward.transforms.transformers import AdditiveTransformer, AffineTransformer
from tests.checks import perturb_parameters

F64 = torch.float64
C = 3


pytestmark = pytest.mark.usefixtures("float64_seeded")


TRANSFORMERS = {
    "affine": AffineTransformer,
    "additive": AdditiveTransformer,
    "piecewise": lambda: PiecewiseLinearTransformer(bins=4),  # any Transformer plugs in
}

FAST_CASES = [
    # transformer, features, context, order, residual, hidden
    ("affine", 1, 0, "natural", False, (16, 16)),
    ("affine", 1, C, "random", True, (16, 16)),
    ("affine", 2, 0, "natural", False, (16, 16)),
    ("affine", 5, 0, "random", False, (16, 16)),
    ("affine", 5, C, "natural", False, (16, 16)),
    ("affine", 5, C, "random", True, (16, 16)),
    ("affine", 9, C, "random", False, (40, 40, 40)),  # wide: block-triangular layers
    ("affine", 9, 0, torch.tensor([4, 1, 8, 0, 2, 7, 3, 6, 5]), True, (40, 40)),
    ("additive", 1, 0, "natural", False, (16, 16)),
    ("additive", 5, 0, "random", True, (16, 16)),
    ("additive", 5, C, "random", False, (16, 16)),
    ("piecewise", 4, C, "random", False, (16, 16)),
]


def _make(kind, d, cf, order, residual, hidden) -> MaskedAutoregressive:
    t = MaskedAutoregressive(d, TRANSFORMERS[kind](), cf, hidden, order, residual, seed=2)
    t.made.block_size = 8
    perturb_parameters(t)
    return t


def _inputs(kind: str, d: int, cf: int, batch=(7,)):
    z = torch.rand(*batch, d) if kind == "piecewise" else torch.randn(*batch, d)
    c = torch.randn(*batch, cf) if cf else None
    return z, c


def _ids(case) -> str:
    kind, d, cf, order, residual, hidden = case
    order = order if isinstance(order, str) else "tensor"
    return f"{kind}-d{d}-c{cf}-{order}" + "-residual" * residual + f"-w{hidden[0]}"


@pytest.mark.parametrize("case", FAST_CASES, ids=_ids)
def test_fast_sequential_forward_equals_the_d_pass_reference(case) -> None:
    t = _make(*case)
    z, c = _inputs(case[0], case[1], case[2])
    x_ref, ladj_ref = t.forward_reference(z, c)
    with torch.no_grad():  # in-place fast path (sampling)
        x, ladj = t(z, c)
    torch.testing.assert_close(x, x_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(ladj, ladj_ref, atol=1e-10, rtol=0)
    x2, ladj2 = t(z, c)  # out-of-place fast path (gradients tracked)
    torch.testing.assert_close(x2, x_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(ladj2, ladj_ref, atol=1e-10, rtol=0)
    z2, ladj_inv = t.inverse(x, c)  # the parallel pass undoes it
    torch.testing.assert_close(z2, z, atol=1e-10, rtol=0)
    torch.testing.assert_close(ladj_inv, -ladj, atol=1e-10, rtol=0)


@pytest.mark.parametrize("case", FAST_CASES[:4], ids=_ids)
def test_sampling_in_row_chunks_equals_one_piece(case, monkeypatch) -> None:
    """Without gradient a large batch runs in row chunks (here of 256 rows, with a ragged
    tail): the same rows come out, in the same order, with their own contexts."""
    from pushforward.nn import made

    t = _make(*case)
    z, c = _inputs(case[0], case[1], case[2], batch=(3, 250))
    x_one, ladj_one = t(z, c)  # with gradient: one piece
    monkeypatch.setattr(made, "AUTOREGRESS_CHUNK_BYTES", 1)
    assert t.made.autoregress_rows(z.dtype) == 256
    with torch.no_grad():
        x, ladj = t(z, c)
    assert x.shape == z.shape and ladj.shape == (3, 250)
    torch.testing.assert_close(x, x_one.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(ladj, ladj_one.detach(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("case", FAST_CASES[4:8], ids=_ids)
def test_gradients_through_the_fast_forward_equal_the_reference_ones(case) -> None:
    t = _make(*case)
    z, c = _inputs(case[0], case[1], case[2])
    z.requires_grad_(True)
    if c is not None:
        c.requires_grad_(True)
    leaves = [z, *([c] if c is not None else []), *t.parameters()]
    w = torch.randn(z.shape)

    def loss(x: torch.Tensor, ladj: torch.Tensor) -> torch.Tensor:
        return (x * w).sum() + ladj.sum()

    fast = torch.autograd.grad(loss(*t(z, c)), leaves, allow_unused=True)
    ref = torch.autograd.grad(loss(*t.forward_reference(z, c)), leaves, allow_unused=True)
    for a, b in zip(fast, ref):
        if b is None:
            assert a is None or torch.all(a == 0)
        else:
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "order, residual, cf",
    [("natural", False, 0), ("random", False, C), ("random", True, 0), ("natural", True, C)],
)
def test_jacobians_are_triangular_in_the_ordering(order: str, residual: bool, cf: int) -> None:
    d = 6
    t = _make("affine", d, cf, order, residual, (24, 24))
    x, c = _inputs("affine", d, cf, (1,))
    rank = torch.argsort(t.made.order)  # rank[k]: the feature generated k-th
    for direction in (t.inverse, t.forward):
        jac = torch.autograd.functional.jacobian(lambda v, f=direction: f(v[None], c)[0][0], x[0])
        in_order = jac[rank][:, rank]
        assert torch.all(torch.triu(in_order, diagonal=1) == 0), "not triangular in the order"
        assert torch.all(in_order.diagonal() != 0)
        assert torch.all(torch.tril(in_order, diagonal=-1).abs().amax(0)[:-1] > 0)


@pytest.mark.parametrize("kind", ["affine", "additive"])
@pytest.mark.parametrize("cf", [0, C])
def test_a_fresh_layer_is_the_identity(kind: str, cf: int) -> None:
    t = MaskedAutoregressive(4, TRANSFORMERS[kind](), cf, (16, 16), "random", residual=bool(cf))
    z, c = _inputs(kind, 4, cf)
    for direction in (t.forward, t.inverse):
        x, ladj = direction(z, c)
        torch.testing.assert_close(x, z, atol=0, rtol=0)
        torch.testing.assert_close(ladj, torch.zeros(7), atol=0, rtol=0)


def test_leading_batch_shapes_in_both_directions() -> None:
    t = _make("affine", 5, C, "random", False, (16, 16))
    z, c = _inputs("affine", 5, C, (2, 3))
    with torch.no_grad():
        x, ladj = t(z, c)
        x_flat, ladj_flat = t(z.reshape(6, 5), c.reshape(6, C))
        z2, ladj2 = t.inverse(x, c)
    assert x.shape == (2, 3, 5) and ladj.shape == (2, 3) and ladj2.shape == (2, 3)
    torch.testing.assert_close(x.reshape(6, 5), x_flat, atol=1e-12, rtol=0)
    torch.testing.assert_close(ladj.reshape(6), ladj_flat, atol=1e-12, rtol=0)
    torch.testing.assert_close(z2, z, atol=1e-10, rtol=0)


def test_iaf_is_the_inverse_of_a_maf_layer() -> None:
    torch.manual_seed(3)
    iaf = iaf_layer(4, AffineTransformer(), C, (16, 16), "random", seed=2)
    torch.manual_seed(3)
    maf = MaskedAutoregressive(4, AffineTransformer(), C, (16, 16), "random", seed=2)
    assert isinstance(iaf, Inverse) and isinstance(iaf.inv, MaskedAutoregressive)
    assert Inverse(iaf) is iaf.inv
    iaf.inv.load_state_dict(maf.state_dict())
    perturb_parameters(maf)
    iaf.inv.load_state_dict(maf.state_dict())
    z, c = _inputs("affine", 4, C)
    x, ladj = iaf(z, c)  # sampling: the parallel pass
    x_maf, ladj_maf = maf.inverse(z, c)
    assert torch.equal(x, x_maf) and torch.equal(ladj, ladj_maf)
    z2, ladj2 = iaf.inverse(x, c)  # density: sequential
    torch.testing.assert_close(z2, z, atol=1e-10, rtol=0)
    torch.testing.assert_close(ladj2, -ladj, atol=1e-10, rtol=0)


def test_float32_fast_path_matches_the_reference() -> None:
    torch.set_default_dtype(torch.float32)
    t = MaskedAutoregressive(12, AffineTransformer(), C, (64, 64), "random")
    t.made.block_size = 16
    perturb_parameters(t, 0.05)
    z, c = torch.randn(50, 12), torch.randn(50, C)
    with torch.no_grad():
        x, ladj = t(z, c)
        x_ref, ladj_ref = t.forward_reference(z, c)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, x_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ladj, ladj_ref, atol=1e-4, rtol=1e-4)


def test_errors_name_the_problem() -> None:
    t = MaskedAutoregressive(3, AffineTransformer(), C, (8,))
    with pytest.raises(PushforwardError, match="needs a context"):
        t(torch.randn(4, 3))
    with pytest.raises(PushforwardError, match="needs a context"):
        t.inverse(torch.randn(4, 3))
    with pytest.raises(PushforwardError, match=r"expected shape \(batch, 3\)"):
        t(torch.randn(4, 2), torch.randn(4, C))
    with pytest.raises(PushforwardError, match="unconditional"):
        MaskedAutoregressive(3, AffineTransformer(), hidden=(8,))(
            torch.randn(4, 3), torch.randn(4, C)
        )


# --- the transformers ------------------------------------------------------------------------


def test_affine_transformer_map_inverse_and_log_derivative() -> None:
    tr = AffineTransformer(scale_bound=3.0)
    z = torch.randn(5, 4)
    params = 2 * torch.randn(5, 4, 2)
    x, lad = tr(z, params)
    log_s = 3.0 * torch.tanh(params[..., 1] / 3.0)
    torch.testing.assert_close(x, z * log_s.exp() + params[..., 0], atol=1e-14, rtol=0)
    torch.testing.assert_close(lad, log_s, atol=0, rtol=0)
    z2, lad2 = tr.inverse(x, params)
    torch.testing.assert_close(z2, z, atol=1e-12, rtol=0)
    torch.testing.assert_close(lad2, -lad, atol=0, rtol=0)
    # lad is the derivative of the map, entry by entry
    deriv = torch.autograd.functional.jacobian(lambda v: tr(v[None], params[:1])[0][0], z[0])
    torch.testing.assert_close(deriv.diagonal().log(), lad[0], atol=1e-12, rtol=0)


def test_affine_transformer_scale_is_bounded_and_finite_for_any_parameters() -> None:
    tr = AffineTransformer()
    raw = torch.tensor([-1e6, -50.0, 0.0, 50.0, 1e6])
    params = torch.stack([torch.zeros(5), raw], -1)[None]
    x, lad = tr(torch.ones(1, 5), params)
    assert torch.all(lad.abs() <= 5.0) and torch.all(torch.isfinite(x))
    assert torch.all(torch.isfinite(tr.inverse(x, params)[0]))
    # identity_params is the identity; small raw values act like exp(raw)
    ident = tr.identity_params().expand(1, 5, 2)
    assert torch.equal(tr(torch.ones(1, 5), ident)[0], torch.ones(1, 5))
    assert math.isclose(tr.log_scale(torch.tensor(1e-3)).item(), 1e-3, rel_tol=1e-7)


def test_sigmoid_gate_contracts_the_inverse_and_bounds_both_directions() -> None:
    """Glow's gate: the inverse multiplies by (sigmoid(raw + 2) + 1e-3) / (sigmoid(2) + 1e-3),
    so it expands by at most 1.135 and contracts by at most ~1e-3, for any raw value."""
    tr = AffineTransformer(scale="sigmoid")
    raw = torch.tensor([-1e6, -50.0, -1.0, 0.0, 1.0, 50.0, 1e6], dtype=torch.float64)
    params = torch.stack([torch.zeros(7, dtype=torch.float64), raw], -1)[None]
    z, lad = tr.inverse(torch.ones(1, 7, dtype=torch.float64), params)
    gate = (torch.sigmoid(raw + 2) + 1e-3) / (math.exp(2) / (1 + math.exp(2)) + 1e-3)
    torch.testing.assert_close(z[0], gate, atol=1e-15, rtol=1e-14)
    torch.testing.assert_close(lad[0], gate.log(), atol=1e-15, rtol=1e-14)
    assert torch.all(lad <= math.log(1.1353)) and torch.all(lad >= math.log(1.1e-3))
    assert z[0, 3] == 1.0 and lad[0, 3] == 0.0  # raw = 0 (identity_params) is the identity
    x, lad_forward = tr(z, params)
    torch.testing.assert_close(x, torch.ones(1, 7, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(lad_forward, -lad, atol=0, rtol=0)
    with pytest.raises(PushforwardError, match="unknown affine scale 'exp'; choose from: tanh"):
        AffineTransformer(scale="exp")


def test_asymmetric_scale_bound_clamps_each_side_and_is_smooth_at_zero() -> None:
    tr = AffineTransformer(scale_bound=(math.log(2), 5.0))
    raw = torch.tensor([-1e6, -3.0, -1e-4, 0.0, 1e-4, 3.0, 1e6], dtype=torch.float64)
    log_s = tr.log_scale(raw)
    assert torch.all(log_s >= -math.log(2)) and torch.all(log_s <= 5.0)
    torch.testing.assert_close(log_s[0], torch.tensor(-math.log(2), dtype=torch.float64))
    torch.testing.assert_close(log_s[-1], torch.tensor(5.0, dtype=torch.float64))
    torch.testing.assert_close(log_s[2:5], raw[2:5], atol=1e-12, rtol=0)  # slope 1 at 0
    torch.testing.assert_close(log_s[1], math.log(2) * torch.tanh(raw[1] / math.log(2)))
    torch.testing.assert_close(log_s[5], 5.0 * torch.tanh(raw[5] / 5.0))
    # the inverse expands by at most 2 whatever the parameters
    params = torch.stack([torch.zeros(7, dtype=torch.float64), raw], -1)[None]
    z, lad = tr.inverse(torch.ones(1, 7, dtype=torch.float64), params)
    assert torch.all(z <= 2.0) and torch.all(lad <= math.log(2))
    assert "scale_bound=(0.693147, 5)" in repr(tr)
    for bad in ((1.0, 0.0), (1.0, 2.0, 3.0), (math.inf, 1.0)):
        with pytest.raises(PushforwardError, match="a positive number or a pair of them"):
            AffineTransformer(scale_bound=bad)


def test_additive_transformer_is_volume_preserving() -> None:
    tr = AdditiveTransformer()
    z, params = torch.randn(5, 3), torch.randn(5, 3, 1)
    x, lad = tr(z, params)
    torch.testing.assert_close(x, z + params[..., 0], atol=0, rtol=0)
    assert torch.equal(lad, torch.zeros(5, 3))
    z2, lad2 = tr.inverse(x, params)
    torch.testing.assert_close(z2, z, atol=1e-15, rtol=0)
    assert torch.equal(tr.identity_params(), torch.zeros(1))


def test_transformer_parameter_errors() -> None:
    with pytest.raises(PushforwardError, match="scale_bound"):
        AffineTransformer(scale_bound=0.0)
    with pytest.raises(PushforwardError, match="scale_bound"):
        AffineTransformer(scale_bound=float("inf"))
    with pytest.raises(PushforwardError, match=r"expected shape \(batch, features, 2\)"):
        AffineTransformer()(torch.zeros(2, 3), torch.zeros(2, 3, 3))
    with pytest.raises(PushforwardError, match=r"expected shape \(batch, features, 1\)"):
        AdditiveTransformer().inverse(torch.zeros(2, 3), torch.zeros(2, 3, 2))


def test_doctests() -> None:
    for module in (autoregressive_module, transformers_module):
        torch.set_default_dtype(torch.float32)
        result = doctest.testmod(module, extraglobs={"torch": torch}, report=False)
        assert result.attempted > 0 and result.failed == 0, f"{module.__name__}: {result}"
