"""MADE: the autoregressive property, degrees, masks, the block-triangular evaluation, the
sequential evaluation, and state restoration."""

from __future__ import annotations

import doctest
import io
import pickle

import pytest
import torch

import pushforward.nn.made as made_module
from pushforward.core import PushforwardError
from pushforward.nn import MADE
from pushforward.nn.made import BLOCK_WEIGHTS, _BlockTriangularLinear, hidden_degrees
from tests.checks import perturb_parameters

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("float64_seeded")


def _jacobian(made: MADE, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """d out[i, h] / d x[j] at one point, shape (features, heads, features)."""
    return torch.autograd.functional.jacobian(lambda v: made(v[None], c)[0], x)


CONFIGS = [
    # features, hidden, heads, context, order, residual, block_size
    (1, (8, 8), 2, 0, "natural", False, 128),
    (1, (8, 8), 1, 2, "random", True, 128),
    (2, (8,), 1, 0, "natural", False, 128),
    (6, (20, 20), 3, 0, "natural", False, 128),
    (6, (20, 20), 2, 2, "random", False, 4),  # block-triangular hidden layers
    (6, (20, 20), 2, 0, "random", True, 4),
    (7, (24, 24, 24), 1, 3, torch.tensor([3, 0, 6, 1, 5, 2, 4]), True, 128),
    (7, (13, 30), 2, 0, torch.tensor([3, 0, 6, 1, 5, 2, 4]), False, 6),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"d{c[0]}-{c[1]}-h{c[2]}-c{c[3]}")
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_outputs_depend_exactly_on_the_earlier_inputs(config, activation: str) -> None:
    d, hidden, heads, cf, order, residual, block = config
    made = MADE(d, hidden, heads, cf, order, residual, activation, seed=3, block_size=block)
    perturb_parameters(made)
    deg = made.input_degrees
    allowed = deg[None, :] < deg[:, None]  # allowed[i, j]: output i may read input j
    for _ in range(3):
        x = torch.randn(d)
        c = torch.randn(1, cf) if cf else None
        jac = _jacobian(made, x, c).abs().amax(1)
        assert jac.shape == (d, d)
        assert torch.all(jac[~allowed] == 0), "an output reads an input not before it"
        if activation == "tanh":  # no dead units: every earlier input is read
            assert torch.all(jac[allowed] > 0)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("d", [1, 4])
def test_context_enters_every_output_unmasked(residual: bool, d: int) -> None:
    """Including the first input's outputs (through the degree-0 hidden units)."""
    made = MADE(d, (16, 16), 2, 3, "random", residual, "tanh")
    perturb_parameters(made)
    assert made.degrees[1].min() == 0
    x, c = torch.randn(d), torch.randn(3)
    jac = torch.autograd.functional.jacobian(lambda u: made(x[None], u[None])[0], c)
    assert torch.all(jac.abs().amax(-1) > 0)


def test_hidden_degrees_cover_1_to_d_minus_1_evenly() -> None:
    for d, width in [(2, 5), (5, 16), (43, 512), (10, 9), (3, 100)]:
        deg = hidden_degrees(d, width)
        assert deg.shape == (width,) and torch.all(deg[1:] >= deg[:-1])
        counts = torch.bincount(deg, minlength=d)[1:]
        assert deg.min() >= 1 and deg.max() <= d - 1
        if width >= d - 1:
            assert counts.min() >= 1 and counts.max() - counts.min() <= 1
    assert torch.equal(hidden_degrees(1, 4), torch.zeros(4, dtype=torch.long))
    assert torch.equal(hidden_degrees(7, 30), hidden_degrees(7, 30))
    deg = hidden_degrees(5, 17, conditional=True)  # 0..d-1 when a context is given
    counts = torch.bincount(deg, minlength=5)
    assert deg.min() == 0 and deg.max() == 4 and counts.max() - counts.min() <= 1


def test_masks_follow_the_degree_rules() -> None:
    made = MADE(5, (12, 9), heads=2, order="random")
    degrees = made.degrees
    assert [len(g) for g in degrees] == [5, 12, 9]
    assert torch.equal(degrees[0], made.order + 1)
    assert torch.equal(made.mask0, (degrees[1][:, None] >= degrees[0]).to(F64))
    assert torch.equal(made.mask1, (degrees[2][:, None] >= degrees[1]).to(F64))
    out_deg = degrees[0].repeat_interleave(2)
    assert torch.equal(made.output_degrees, out_deg)
    assert torch.equal(made.mask_output, (out_deg[:, None] > degrees[2]).to(F64))


def test_orders_natural_random_and_tensor() -> None:
    assert torch.equal(MADE(4, (8,)).order, torch.arange(4))
    a, b = MADE(6, (8,), order="random", seed=1), MADE(6, (8,), order="random", seed=1)
    assert torch.equal(a.order, b.order)
    others = {tuple(MADE(6, (8,), order="random", seed=s).order.tolist()) for s in range(5)}
    assert len(others) > 1
    assert torch.equal(MADE(3, (8,), order=torch.tensor([2, 0, 1])).order, torch.tensor([2, 0, 1]))
    for bad in ["reverse", torch.tensor([0, 0, 1]), torch.tensor([0.0, 1.0, 2.0]), torch.arange(4)]:
        with pytest.raises(PushforwardError, match="order"):
            MADE(3, (8,), order=bad)


def test_invalid_arguments_are_clear_errors() -> None:
    with pytest.raises(PushforwardError, match="equal hidden widths"):
        MADE(3, (8, 16), residual=True)
    with pytest.raises(PushforwardError, match="at least one hidden layer"):
        MADE(3, ())
    with pytest.raises(PushforwardError, match="activation"):
        MADE(3, (8,), activation="sigmoidal")
    with pytest.raises(PushforwardError, match="features"):
        MADE(0, (8,))
    with pytest.raises(PushforwardError, match="context_features"):
        MADE(3, (8,), context_features=-1)
    made = MADE(3, (8,), context_features=2)
    with pytest.raises(PushforwardError, match="needs a context"):
        made(torch.randn(4, 3))
    with pytest.raises(PushforwardError, match=r"expected shape \(batch, 3\)"):
        made(torch.randn(4, 2), torch.randn(4, 2))
    with pytest.raises(PushforwardError, match="unconditional"):
        MADE(3, (8,))(torch.randn(4, 3), torch.randn(4, 2))


def _assert_same_values_and_gradients(
    out: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, made: MADE, made_ref: MADE
) -> None:
    """``out`` of ``made`` equals ``ref`` of ``made_ref`` (to float64 rounding), and so do their
    gradients with respect to the input ``x`` and to each parameter."""
    torch.testing.assert_close(out, ref, atol=1e-13, rtol=0)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *made.parameters()], g)
    refs = torch.autograd.grad(ref, [x, *made_ref.parameters()], g)
    for a, b in zip(grads, refs):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=0)


@pytest.mark.parametrize("order", ["natural", "reversed", "random"])
@pytest.mark.parametrize("context", [0, 2])
def test_block_triangular_evaluation_equals_the_dense_masked_product(
    order: str, context: int
) -> None:
    ranks = {"natural": "natural", "reversed": torch.arange(9).flip(0), "random": "random"}
    for residual in (False, True):
        torch.manual_seed(1)
        kw = {"heads": 2, "context_features": context, "residual": residual, "order": ranks[order]}
        blocked = MADE(9, (40, 40), **kw, block_size=8)
        dense = MADE(9, (40, 40), **kw, block_size=999)
        perturb_parameters(blocked)
        dense.load_state_dict(blocked.state_dict())
        assert blocked._blocks and not dense._blocks
        assert dense._output_blocks is None
        # the output layer's groups: about half the dense work for consecutive degrees
        if order == "random":
            assert blocked._output_blocks is None
        else:
            groups = blocked._output_blocks
            assert groups is not None and len(groups) == 3
            assert sum((hi - lo) * p for lo, hi, _, p in groups) < 0.75 * 18 * 40
            for lo, hi, q, p in groups:
                m = blocked.mask_output
                assert torch.all(m[lo:hi, :q] == 1) and torch.all(m[lo:hi, p:] == 0)
        c = torch.randn(2, 3, 2) if context else None
        x = torch.randn(2, 3, 9, requires_grad=True)
        _assert_same_values_and_gradients(blocked(x, c), dense(x, c), x, blocked, dense)


@pytest.mark.parametrize("block_size", [None, 8])
def test_transposed_output_has_the_same_values_and_gradients(block_size: int | None) -> None:
    # transposed=True: the same outputs and gradients, laid out as a contiguous
    # (features * heads, rows) matrix, through the dense output product and the grouped one
    torch.manual_seed(2)
    made = MADE(9, (40, 40), heads=3, context_features=2, block_size=block_size)
    perturb_parameters(made)
    assert (made._output_blocks is None) == (block_size is None)
    for shape in ((5,), (2, 3), (0,)):
        x = torch.randn(*shape, 9, requires_grad=True)
        c = torch.randn(*shape, 2)
        ref, out = made(x, c), made(x, c, transposed=True)
        assert out.shape == ref.shape == (*shape, 9, 3)
        if out.numel() > 27:
            assert out.reshape(-1, 27).t().is_contiguous() and not out.is_contiguous()
        _assert_same_values_and_gradients(out, ref, x, made, made)
    if block_size is not None:
        groups, mask = made._output_blocks, made.mask_output
        w = torch.randn(27, 40, requires_grad=True)
        b = torch.randn(27, requires_grad=True)
        h = torch.randn(2, 3, 40, requires_grad=True)

        def f(h, w, b):
            return _BlockTriangularLinear.apply(h, w, b, mask, groups, True)

        assert torch.autograd.gradcheck(f, (h, w, b))
        assert torch.autograd.gradgradcheck(f, (h, w, b))


def test_block_groups_cut_at_degree_boundaries() -> None:
    made = MADE(43, (512, 512))
    (blocks,) = made._blocks.values()
    deg = made.degrees[1]
    assert len(blocks) == 4 and blocks[0][0] == 0 and blocks[-1][1] == 512
    for lo, hi, q, p in blocks:
        assert lo == 0 or deg[lo] != deg[lo - 1]
        assert torch.all(made.mask1[lo:hi, :q] == 1) and torch.all(made.mask1[lo:hi, p:] == 0)
    made.block_size = 1000
    assert made._blocks == {}


def test_default_groups_hold_about_block_weights_weights() -> None:
    # None: about 2**16 weights per group, so the rows per group follow the input width
    wide, narrow = MADE(6, (512, 512), heads=23), MADE(6, (256, 256), heads=23)
    assert wide.block_size is None and BLOCK_WEIGHTS == 2**16
    assert len(wide._blocks[1]) == 4  # 128-row groups of a 512-wide layer
    assert narrow._blocks == {}  # a 256-wide layer is one 256-row group: dense
    assert narrow._output_blocks is None  # 11 inputs (256 rows) per group cover all 6
    assert len(MADE(43, (256, 256), heads=23)._output_blocks) == 4
    narrow.block_size = 128  # an explicit size counts rows, whatever the width
    assert len(narrow._blocks[1]) == 2
    narrow.block_size = None
    assert narrow._blocks == {}
    with pytest.raises(PushforwardError, match="block_size"):
        MADE(6, (20, 20), block_size=0)


def test_block_triangular_function_gradcheck_and_gradgradcheck() -> None:
    made = MADE(6, (20, 20), block_size=5)
    blocks, mask = made._blocks[1], made.mask1
    w = torch.randn(20, 20, requires_grad=True)
    b = torch.randn(20, requires_grad=True)
    h = torch.randn(2, 3, 20, requires_grad=True)

    def f(h, w, b):
        return _BlockTriangularLinear.apply(h, w, b, mask, groups)

    groups = blocks

    assert torch.autograd.gradcheck(f, (h, w, b))
    assert torch.autograd.gradgradcheck(f, (h, w, b))
    # the output layer's groups, reversed order: the last input's rows read no hidden unit
    out = MADE(6, (20, 20), heads=3, order=torch.arange(6).flip(0), block_size=3)
    groups, mask = out._output_blocks, out.mask_output
    assert groups is not None and groups[-1][3] == 0
    w = torch.randn(18, 20, requires_grad=True)
    b = torch.randn(18, requires_grad=True)
    assert torch.autograd.gradcheck(f, (h, w, b))
    assert torch.autograd.gradgradcheck(f, (h, w, b))


@pytest.mark.parametrize("activation", ["relu", "gelu"])  # gelu: no in-place form
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_autoregress_reproduces_the_parallel_pass(
    residual: bool, grad: bool, activation: str
) -> None:
    """params handed to step(i) are exactly the parallel pass's outputs at the final x."""
    kw = {"context_features": 2, "order": "random", "residual": residual}
    made = MADE(6, (20, 20), heads=2, activation=activation, **kw)
    perturb_parameters(made)
    c = torch.randn(5, 2)
    noise = torch.randn(5, 6)
    seen: dict[int, torch.Tensor] = {}

    def step(i: int, params: torch.Tensor) -> torch.Tensor:
        seen[i] = params
        return noise[:, i] + torch.tanh(params[:, 0]) * params[:, 1]

    with torch.set_grad_enabled(grad):
        x = made.autoregress(step, 5, c)
    assert sorted(seen) == list(range(6))
    assert [i for i in seen] == torch.argsort(made.order).tolist()  # called in the order
    full = made(x, c)
    for i, params in seen.items():
        torch.testing.assert_close(params, full[:, i], atol=1e-12, rtol=0)
    assert x.requires_grad == grad


def test_state_dict_restores_a_random_order_and_rebuilds_the_masks() -> None:
    a = MADE(5, (16, 16), heads=2, order="random", seed=4)
    b = MADE(5, (16, 16), heads=2, order="random", seed=5)
    assert not torch.equal(a.order, b.order)
    keys = set(a.state_dict())
    assert "order" in keys and not any("mask" in k or "degrees" in k for k in keys)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.order, b.order) and torch.equal(a.mask_output, b.mask_output)
    x = torch.randn(3, 5)
    assert torch.equal(a(x), b(x))


def test_dtype_conversion_pickling_and_batch_shapes() -> None:
    torch.set_default_dtype(torch.float32)
    made = MADE(4, (8, 8), heads=2, order="random")
    assert made.mask0.dtype == torch.float32
    made = made.double()
    assert made.mask0.dtype == F64 and made.mask_output.dtype == F64
    x = torch.randn(2, 3, 4, dtype=F64)
    out = made(x)
    assert out.shape == (2, 3, 4, 2)
    torch.testing.assert_close(out.reshape(6, 4, 2), made(x.reshape(6, 4)), atol=1e-14, rtol=0)
    buffer = io.BytesIO()
    torch.save(made, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(x), out)
    assert pickle.loads(pickle.dumps(made)).order.tolist() == made.order.tolist()


def test_doctests() -> None:
    result = doctest.testmod(made_module, extraglobs={"torch": torch}, report=False)
    assert result.attempted > 0 and result.failed == 0, str(result)


def test_torch_func_transforms_trace_the_dense_products() -> None:
    # torch.func (jacrev, hessian) cannot trace the block-triangular autograd Function; under
    # it the MADE takes the dense masked products: the same Jacobian as plain autograd's
    torch.manual_seed(4)
    made = MADE(9, (40, 40), heads=2, context_features=2, block_size=8).double()
    perturb_parameters(made)
    assert made._blocks and made._output_blocks is not None
    x, c = torch.randn(9, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64)

    def f(v: torch.Tensor) -> torch.Tensor:
        return made(v.unsqueeze(0), c).reshape(-1)

    jac = torch.func.jacrev(f)(x)
    torch.testing.assert_close(jac, torch.autograd.functional.jacobian(f, x), atol=1e-13, rtol=0)
    # and the autoregressive property holds in it: output i depends on inputs of lower degree
    lower = made.order.unsqueeze(1) > made.order.unsqueeze(0)  # [i, j]: j precedes i
    assert torch.all(jac.view(9, 2, 9)[~lower.unsqueeze(1).expand(9, 2, 9)] == 0)
