"""Coupling layers beyond the shared contract: the mask constructors, the block-triangular
Jacobian (the identity part passes through exactly), identity at initialisation, the one-feature
case, custom conditioners, extreme inputs, errors, and the residual MLP conditioner."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import Tensor, nn

import pushforward.nn.resnet as resnet_module
import pushforward.transforms.coupling as coupling_module
from pushforward import flows
from pushforward.core import Inverse, PushforwardError
from pushforward.nn.resnet import ResidualMLP
from pushforward.transforms.coupling import (
    Coupling,
    channel_mask,
    checkerboard_mask,
    split_mask,
)
from pushforward.transforms.linear import ElementwiseAffine
from pushforward.transforms.splines import RQSplineTransformer
from pushforward.transforms.transformers import AdditiveTransformer, AffineTransformer
from tests.checks import check_flow, perturb_parameters

F64 = torch.float64
C = 3
TRANSFORMERS = {
    "affine": AffineTransformer,
    "additive": AdditiveTransformer,
    "spline": lambda: RQSplineTransformer(bins=4),
}


pytestmark = pytest.mark.usefixtures("float64_seeded")


# -- masks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("kind", ["half", "alternating"])
def test_split_masks_partition_the_features(d: int, kind: str) -> None:
    mask = split_mask(d, kind)
    flipped = split_mask(d, kind, flip=True)
    assert mask.dtype == torch.bool and mask.shape == (d,)
    assert torch.equal(flipped, ~mask)
    assert int(mask.sum()) == (d + 1) // 2  # unflipped: ceil(d / 2) transformed, never empty
    index = torch.arange(d)
    if kind == "half":
        assert torch.equal(mask, index >= d // 2)  # identity part first, as x_{1:d} in RealNVP
    else:
        assert torch.equal(mask, index % 2 == 0)


def test_split_mask_values() -> None:
    assert split_mask(4).tolist() == [False, False, True, True]
    assert split_mask(3, flip=True).tolist() == [True, False, False]
    assert split_mask(4, "alternating").tolist() == [True, False, True, False]
    assert split_mask(1).tolist() == [True]
    assert split_mask(1, flip=True).tolist() == [False]


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 2, 3), (3, 4, 4), (2, 5, 3)])
def test_checkerboard_mask(shape: tuple[int, int, int]) -> None:
    c, h, w = shape
    mask = checkerboard_mask(c, h, w)
    assert mask.dtype == torch.bool and mask.shape == shape
    for i in range(h):
        for j in range(w):
            assert bool((mask[:, i, j] == ((i + j) % 2 == 0)).all())
    assert torch.equal(checkerboard_mask(c, h, w, flip=True), ~mask)
    # neighbours along each spatial axis always fall in different parts
    if h > 1:
        assert bool((mask[:, 1:] != mask[:, :-1]).all())
    if w > 1:
        assert bool((mask[:, :, 1:] != mask[:, :, :-1]).all())


@pytest.mark.parametrize("shape", [(1, 2, 2), (2, 3, 1), (3, 2, 2), (4, 1, 3)])
def test_channel_mask(shape: tuple[int, int, int]) -> None:
    c, h, w = shape
    mask = channel_mask(c, h, w)
    assert mask.dtype == torch.bool and mask.shape == shape
    for k in range(c):
        assert bool((mask[k] == (k >= c // 2)).all())
    assert int(mask[:, 0, 0].sum()) == (c + 1) // 2
    assert torch.equal(channel_mask(c, h, w, flip=True), ~mask)


def test_mask_errors_name_the_problem() -> None:
    with pytest.raises(PushforwardError, match="unknown mask kind 'odd'"):
        split_mask(3, "odd")
    with pytest.raises(PushforwardError, match="features must be a positive integer"):
        split_mask(0)
    with pytest.raises(PushforwardError, match="height must be a positive integer"):
        checkerboard_mask(1, 0, 2)
    with pytest.raises(PushforwardError, match="channels must be a positive integer"):
        channel_mask(0, 2, 2)


# -- structure ---------------------------------------------------------------------------------


def _jacobian(fn, v: Tensor) -> Tensor:
    shape = v.shape
    return torch.autograd.functional.jacobian(
        lambda u: fn(u.reshape(1, *shape))[0].reshape(-1), v.reshape(-1)
    )


@pytest.mark.parametrize("kind", ["affine", "additive", "spline"])
@pytest.mark.parametrize("mask_kind,flip", [("half", False), ("alternating", True)])
@pytest.mark.parametrize("cf", [0, C])
def test_jacobian_is_block_triangular(kind: str, mask_kind: str, flip: bool, cf: int) -> None:
    d = 6
    mask = split_mask(d, mask_kind, flip)
    layer = Coupling(mask, TRANSFORMERS[kind](), context_features=cf, hidden=(16, 16))
    perturb_parameters(layer)
    c = torch.randn(1, cf) if cf else None
    a, b = (~mask).nonzero().squeeze(-1), mask.nonzero().squeeze(-1)
    for direction in (layer, Inverse(layer)):
        v = 1.5 * torch.randn(d)
        jac = _jacobian(lambda u, f=direction: f(u, c), v)
        # identity rows: exactly the unit vectors (the identity part passes through)
        assert torch.equal(jac[a], torch.eye(d)[a])
        # transformed rows: zero among the other transformed entries (elementwise), and some
        # dependence on the identity part
        jbb = jac[b][:, b]
        assert torch.equal(jbb, torch.diag(torch.diagonal(jbb)))
        assert bool((torch.diagonal(jbb) > 0).all())
        assert jac[b][:, a].abs().sum() > 0


@pytest.mark.parametrize("kind", ["affine", "additive", "spline"])
def test_identity_part_passes_through_exactly_in_both_directions(kind: str) -> None:
    mask = split_mask(5, "alternating")
    layer = Coupling(mask, TRANSFORMERS[kind](), context_features=C, hidden=(16, 16))
    perturb_parameters(layer)
    z, c = 3 * torch.randn(4, 7, 5), torch.randn(4, 7, C)
    x, ladj = layer(z, c)
    assert ladj.shape == (4, 7)
    assert torch.equal(x[..., ~mask], z[..., ~mask])
    assert not torch.allclose(x[..., mask], z[..., mask])
    z2, ladj2 = layer.inverse(x, c)
    assert torch.equal(z2[..., ~mask], x[..., ~mask])
    torch.testing.assert_close(z2, z, atol=1e-9, rtol=0)
    torch.testing.assert_close(ladj + ladj2, torch.zeros_like(ladj), atol=1e-9, rtol=0)


@pytest.mark.parametrize("kind", ["affine", "additive", "spline"])
@pytest.mark.parametrize("d,cf", [(1, 0), (1, C), (4, 0), (4, C)])
@pytest.mark.parametrize("residual", [False, True])
def test_a_fresh_layer_is_the_identity(kind: str, d: int, cf: int, residual: bool) -> None:
    layer = Coupling(
        split_mask(d), TRANSFORMERS[kind](), context_features=cf, hidden=(16, 16), residual=residual
    )
    z = torch.randn(9, d)
    c = torch.randn(9, cf) if cf else None
    x, ladj = layer(z, c)
    torch.testing.assert_close(x, z, atol=1e-12, rtol=0)
    torch.testing.assert_close(ladj, torch.zeros(9), atol=1e-12, rtol=0)


def test_one_feature_uses_learned_constants_or_the_context() -> None:
    # no identity features and no context: the parameters are free (an elementwise map)
    layer = Coupling(split_mask(1), AffineTransformer())
    assert layer.conditioner.net is None
    assert layer.conditioner.constant.shape == (1, 2)
    with torch.no_grad():
        layer.conditioner.constant.copy_(torch.tensor([[1.0, 0.5]]))
    z = torch.randn(6, 1)
    x, ladj = layer(z)
    scale = torch.exp(5.0 * torch.tanh(torch.tensor(0.5 / 5.0)))
    torch.testing.assert_close(x, z * scale + 1.0)
    torch.testing.assert_close(ladj, torch.log(scale).expand(6))
    # with a context the parameters are a network of the context alone
    layer = Coupling(split_mask(1), AffineTransformer(), context_features=2, hidden=(8,))
    assert layer.conditioner.net[0].in_features == 2
    perturb_parameters(layer)
    x1, _ = layer(z, torch.zeros(6, 2))
    x2, _ = layer(z, torch.ones(6, 2))
    assert (x1 - x2).abs().max() > 1e-6


def test_default_conditioner_sees_only_the_identity_features_and_the_context() -> None:
    layer = Coupling(split_mask(5, "alternating"), AffineTransformer(), None, C, hidden=(8,))
    assert layer.conditioner.net[0].in_features == 2 + C
    assert layer.conditioner.net.last.out_features == 3 * 2
    layer = Coupling(split_mask(5), AffineTransformer(), hidden=(8, 8), residual=True)
    assert isinstance(layer.conditioner.net, ResidualMLP)
    assert layer.conditioner.net.first.in_features == 2


class _Recording(nn.Module):
    """A custom conditioner that records what it is given."""

    def __init__(self, shape: tuple[int, ...], params: int):
        super().__init__()
        self.shape, self.params = shape, params
        self.weight = nn.Parameter(0.1 * torch.randn(params))
        self.seen: list[tuple[Tensor, Tensor | None]] = []

    def forward(self, identity: Tensor, context: Tensor | None) -> Tensor:
        self.seen.append((identity, context))
        return torch.tanh(identity).unsqueeze(-1) * self.weight + 0.1


def test_custom_conditioner_gets_the_masked_input_and_the_context() -> None:
    mask = checkerboard_mask(2, 3, 3)
    net = _Recording((2, 3, 3), 2)
    layer = Coupling(mask, AffineTransformer(), net, context_features=C)
    z, c = torch.randn(4, 2, 3, 3), torch.randn(4, C)
    x, ladj = layer(z, c)
    identity, context = net.seen[-1]
    assert torch.equal(identity, z.masked_fill(mask, 0.0))
    assert torch.equal(context, c)
    assert ladj.shape == (4,)
    assert torch.equal(x[:, ~mask], z[:, ~mask])
    z2, _ = layer.inverse(x, c)
    torch.testing.assert_close(z2, z, atol=1e-12, rtol=0)
    identity, _ = net.seen[-1]
    assert torch.equal(identity, x.masked_fill(mask, 0.0))


def test_custom_conditioner_output_shape_is_checked() -> None:
    class Wrong(nn.Module):
        def forward(self, identity: Tensor, context: Tensor | None) -> Tensor:
            return identity.unsqueeze(-1).expand(*identity.shape, 3)  # P = 3, not 2

    layer = Coupling(split_mask(4), AffineTransformer(), Wrong())
    with pytest.raises(
        PushforwardError,
        match=r"conditioner output: expected shape \(5, 4, 2\) \(every entry\) or \(5, 2, 2\)",
    ):
        layer(torch.randn(5, 4))


@pytest.mark.parametrize("kind", ["affine", "spline"])
@pytest.mark.parametrize("cf", [0, C])
def test_extreme_finite_inputs_give_no_nan_in_float32(kind: str, cf: int) -> None:
    torch.set_default_dtype(torch.float32)
    layer = Coupling(
        split_mask(6, "alternating"), TRANSFORMERS[kind](), context_features=cf, hidden=(16, 16)
    )
    perturb_parameters(layer, 0.5)
    magnitudes = torch.tensor([0.0, 1e-3, 1.0, 4.99, 5.01, 1e2, 1e3, 1e4])
    signs = torch.tensor([1.0, -1.0])
    values = (magnitudes.unsqueeze(-1) * signs).reshape(-1)
    z = values[torch.randint(0, values.numel(), (64, 6))]
    c = (1e4 * torch.randn(64, cf)) if cf else None
    z.requires_grad_(True)
    for direction in (layer, layer.inverse):
        out, ladj = direction(z, c)
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all() and torch.isfinite(ladj).all()
        layer.zero_grad()
        (out.sum() + ladj.sum()).backward()
        assert torch.isfinite(z.grad).all()
        for name, p in layer.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), name
        z.grad = None


def test_leading_batch_shapes_and_batch_of_one() -> None:
    layer = Coupling(split_mask(4), RQSplineTransformer(bins=4), None, C, hidden=(16, 16))
    perturb_parameters(layer, 0.1)
    z, c = torch.randn(2, 3, 4), torch.randn(2, 3, C)
    x, ladj = layer(z, c)
    xf, ladjf = layer(z.reshape(6, 4), c.reshape(6, C))
    torch.testing.assert_close(x.reshape(6, 4), xf, atol=1e-12, rtol=0)
    torch.testing.assert_close(ladj.reshape(6), ladjf, atol=1e-12, rtol=0)
    # one context for the whole batch broadcasts
    x1, _ = layer(z, c[:1, :1])
    x2, _ = layer(z, c[:1, :1].expand(2, 3, C))
    assert torch.equal(x1, x2)


def test_state_dict_restores_the_mask_and_its_indices() -> None:
    a = Coupling(split_mask(4, "alternating"), AffineTransformer(), hidden=(8,))
    b = Coupling(split_mask(4, "alternating", flip=True), AffineTransformer(), hidden=(8,))
    perturb_parameters(a)
    b.load_state_dict(a.state_dict())
    z = torch.randn(5, 4)
    assert torch.equal(b.mask, a.mask)
    assert torch.equal(b(z)[0], a(z)[0])
    assert "identity_index" not in a.state_dict()


def test_errors_name_the_problem() -> None:
    layer = Coupling(split_mask(3), AffineTransformer(), context_features=2, hidden=(8,))
    with pytest.raises(PushforwardError, match=r"expected shape \(batch, 3\), got \(5, 4\)"):
        layer(torch.randn(5, 4), torch.randn(5, 2))
    with pytest.raises(PushforwardError, match="needs a context"):
        layer(torch.randn(5, 3))
    with pytest.raises(PushforwardError, match=r"context: expected shape \(batch, 2\)"):
        layer(torch.randn(5, 3), torch.randn(5, 3))
    image = Coupling(channel_mask(2, 2, 2), AffineTransformer(), _Recording((2, 2, 2), 2))
    with pytest.raises(PushforwardError, match=r"expected shape \(batch, 2, 2, 2\)"):
        image(torch.randn(5, 2, 3, 3))
    with pytest.raises(PushforwardError, match="selects no entry to transform"):
        Coupling(split_mask(1, flip=True), AffineTransformer())
    with pytest.raises(PushforwardError, match="mask must be boolean"):
        Coupling(torch.tensor([0.0, 1.0]), AffineTransformer())
    with pytest.raises(PushforwardError, match="mask must be a boolean torch.Tensor"):
        Coupling([True, False], AffineTransformer())  # type: ignore[arg-type]
    with pytest.raises(PushforwardError, match="transformer must be a pushforward Transformer"):
        Coupling(split_mask(2), nn.Identity())  # type: ignore[arg-type]
    with pytest.raises(PushforwardError, match="conditioner must be a torch.nn.Module"):
        Coupling(split_mask(2), AffineTransformer(), conditioner=lambda a, c: a)  # type: ignore[arg-type]
    with pytest.raises(PushforwardError, match="context_features must be a non-negative"):
        Coupling(split_mask(2), AffineTransformer(), context_features=-1)
    with pytest.raises(PushforwardError, match="residual blocks need equal hidden widths"):
        Coupling(split_mask(2), AffineTransformer(), hidden=(8, 4), residual=True)
    with pytest.raises(PushforwardError, match="unknown activation 'swish'"):
        Coupling(split_mask(2), AffineTransformer(), activation="swish")
    with pytest.raises(PushforwardError, match="hidden width must be a positive integer"):
        Coupling(split_mask(2), AffineTransformer(), hidden=(0,))
    # 0/1 integer masks are accepted
    layer = Coupling(torch.tensor([0, 1, 1]), AffineTransformer(), hidden=(8,))
    assert layer.mask.tolist() == [False, True, True]


# -- the residual MLP --------------------------------------------------------------------------


def test_residual_mlp_blocks_start_near_the_identity() -> None:
    net = ResidualMLP(3, 2, hidden=(16, 16, 16))
    assert len(net.blocks) == 3 and net.last is net.output
    x = torch.randn(10, 3)
    direct = net.output(net.first(x))
    assert (net(x) - direct).abs().max() < 0.05
    with pytest.raises(PushforwardError, match="equal hidden widths"):
        ResidualMLP(3, 2, hidden=(16, 8))
    with pytest.raises(PushforwardError, match="at least one hidden width"):
        ResidualMLP(3, 2, hidden=())
    with pytest.raises(PushforwardError, match="in_features must be a positive integer"):
        ResidualMLP(0, 2)


def test_doctests() -> None:
    for module in (coupling_module, resnet_module):
        torch.set_default_dtype(torch.float32)
        result = doctest.testmod(module, extraglobs={"torch": torch}, report=False)
        assert result.attempted > 0 and result.failed == 0, f"{module.__name__}: {result}"


# -- the registered coupling flows (nice, realnvp, nsf-coupling) ---------------------------------


@pytest.mark.parametrize(
    "name,options",
    [
        ("realnvp", {"batch_norm": True}),
        ("nsf-coupling", {"permutation": "random"}),
        ("nsf-coupling", {"permutation": "reverse"}),
    ],
    ids=str,
)
def test_coupling_recipe_variants_pass_the_flow_checker(name: str, options: dict) -> None:
    torch.set_default_dtype(torch.float32)
    check_flow(name, 3, 2, hidden=(16, 16), layers=3, **options)


def test_coupling_recipes_are_built_as_documented() -> None:
    torch.set_default_dtype(torch.float32)
    nice = flows.build("nice", 4, layers=3, hidden=(8,)).transform
    assert isinstance(nice[0], ElementwiseAffine)  # the diagonal scaling, on the latent side
    couplings = list(nice)[1:]
    assert all(isinstance(t.transformer, AdditiveTransformer) for t in couplings)
    assert [t.mask.tolist() for t in couplings] == [
        [True, False, True, False],
        [False, True, False, True],
        [True, False, True, False],
    ]
    realnvp = flows.build("realnvp", 3, layers=3, hidden=(8,), batch_norm=True).transform
    kinds = [type(t).__name__ for t in realnvp]
    assert kinds == ["Coupling", "BatchNorm", "Coupling", "BatchNorm", "Coupling"]
    nsf = flows.build("nsf-coupling", 3, layers=2, hidden=(8, 8), bins=5).transform
    kinds = [type(t).__name__ for t in nsf]
    assert kinds == ["LULinear", "Coupling", "LULinear", "Coupling", "LULinear"]
    assert nsf[1].transformer.bins == 5 and isinstance(nsf[1].conditioner.net, ResidualMLP)
    nsf = flows.build("nsf-coupling", 3, layers=2, hidden=(8,), permutation="reverse").transform
    assert [type(t).__name__ for t in nsf] == ["Coupling", "Permutation", "Coupling"]
    # one feature: every layer transforms it (no flipped, empty masks)
    one = flows.build("realnvp", 1, layers=3, hidden=(8,)).transform
    assert all(t.mask.tolist() == [True] for t in one)


def test_coupling_recipe_defaults() -> None:
    assert flows.describe("nice").options == {
        "layers": 4,
        "hidden": (256, 256, 256, 256),
        "base": "normal",
    }
    assert flows.describe("realnvp").options == {
        "layers": 10,
        "hidden": (256, 256),
        "base": "normal",
        "batch_norm": False,
    }
    assert flows.describe("nsf-coupling").options == {
        "layers": 10,
        "hidden": (256, 256),
        "bins": 8,
        "base": "normal",
        "permutation": "lu",
    }


def test_coupling_recipe_errors_name_the_option() -> None:
    with pytest.raises(PushforwardError, match="unknown permutation 'shuffle'"):
        flows.build("nsf-coupling", 3, permutation="shuffle")
    with pytest.raises(PushforwardError, match="widths must be equal, got \\(32, 16\\)"):
        flows.build("nsf-coupling", 3, hidden=(32, 16))
    with pytest.raises(PushforwardError, match="option hidden must be a sequence of positive"):
        flows.build("realnvp", 3, hidden="wide")
    with pytest.raises(PushforwardError, match="option batch_norm must be True or False"):
        flows.build("realnvp", 3, batch_norm="yes")
    with pytest.raises(PushforwardError, match="option layers must be a positive integer"):
        flows.build("nice", 3, layers=0)
    with pytest.raises(PushforwardError, match="has no option 'bins'"):
        flows.build("realnvp", 3, bins=4)


@pytest.mark.parametrize("name", ["nice", "realnvp", "nsf-coupling"])
def test_coupling_flows_give_no_nan_for_extreme_finite_inputs(name: str) -> None:
    """|x| up to 1e4 in float32, in both directions, with non-trivial weights."""
    torch.set_default_dtype(torch.float32)
    flow = flows.build(name, 3, 2, hidden=(16, 16), layers=3)
    perturb_parameters(flow, 0.1)
    v = torch.tensor([-1e4, -1e3, -5.0, 0.0, 5.0, 1e3, 1e4])
    x = torch.cartesian_prod(v, v, v)
    c = torch.randn(len(x), 2) * 1e2
    with torch.no_grad():
        lp = flow.log_prob(x, c)
        z, li = flow.transform.inverse(x, c)
        x2, lf = flow.transform(x, c)
    for what, t in {"log_prob": lp, "z": z, "ladj": li, "x": x2, "forward ladj": lf}.items():
        assert t.dtype == torch.float32
        assert not t.isnan().any(), f"{name}: NaN in {what}"
