"""Every registered flow passes the shared checker; the registry's option handling."""

from __future__ import annotations

import pytest
import torch

from pushforward import flows
from pushforward.core import PushforwardError
from pushforward.distributions import Flow
from tests.checks import check_flow, perturb_parameters

SMALL = {"hidden": (16, 16)}  # applied where a recipe has the option, to keep the suite fast


def small_options(name: str, layers: int = 2) -> dict:
    allowed = flows.describe(name).options
    opts = {k: v for k, v in SMALL.items() if k in allowed}
    if "layers" in allowed:
        opts["layers"] = layers
    if "bins" in allowed:
        opts["bins"] = 4
    if flows.describe(name).image:
        opts["hidden"] = (4,)
    return opts


VECTOR = [n for n in flows.names() if not flows.describe(n).image]
IMAGE = [n for n in flows.names() if flows.describe(n).image]
CASES = [(name, d, c) for name in VECTOR for d, c in ((1, 0), (2, 0), (3, 2))]
CASES += [(name, s, c) for name in IMAGE for s, c in (((1, 4, 4), 0), ((2, 4, 4), 2))]


@pytest.mark.parametrize("name,features,context", CASES, ids=lambda v: str(v))
def test_registered_flow(name: str, features: int, context: int) -> None:
    check_flow(name, features, context, **small_options(name))


def test_unknown_flow_is_a_clear_error() -> None:
    with pytest.raises(PushforwardError, match="unknown flow 'nope'; choose from"):
        flows.build("nope", 2)


def test_unknown_option_names_it() -> None:
    with pytest.raises(PushforwardError, match="has no option 'bins'"):
        flows.build("planar", 2, bins=3)


def test_bad_features() -> None:
    with pytest.raises(PushforwardError, match="features must be a positive integer"):
        flows.build("planar", 0)


def test_unknown_base() -> None:
    with pytest.raises(PushforwardError, match="unknown base 'cauchy'"):
        flows.build("planar", 2, base="cauchy")


def test_every_recipe_has_a_summary() -> None:
    for name in flows.names():
        assert flows.describe(name).summary


@pytest.mark.parametrize(
    "name,options",
    [
        ("maf", {"batch_norm": True}),
        ("maf", {"permutation": "random"}),
        ("nsf", {"batch_norm": True, "permutation": "random"}),
        ("maf-mog", {"batch_norm": True, "components": 3}),
    ],
    ids=str,
)
def test_autoregressive_options(name: str, options: dict) -> None:
    check_flow(name, 3, 0, **{**small_options(name), **options})


def perturbed(name: str, features: int | tuple[int, ...], context: int) -> Flow:
    """A registered flow in float64, off its identity start, in eval mode."""
    torch.manual_seed(0)
    flow = flows.build(name, features, context, **small_options(name)).double()
    perturb_parameters(flow, 0.05)
    return flow.eval()


def assert_per_sample_gradients(flow: Flow, per_sample: dict, rows: list[int], *inputs) -> None:
    """``per_sample`` (from ``vmap(grad)``) against one backward per row of ``inputs``."""
    for i in rows:
        flow.zero_grad()
        flow.log_prob(*(t[i : i + 1] for t in inputs)).sum().backward()
        for k, p in flow.named_parameters():
            want = torch.zeros_like(p) if p.grad is None else p.grad
            torch.testing.assert_close(per_sample[k][i], want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", VECTOR)
def test_torch_func_hessian_of_log_prob(name: str) -> None:
    # torch.func.hessian (forward-over-reverse) traces every vector flow, the hand-written
    # autograd Functions included (they step aside under torch.func), and agrees with
    # autograd's double backward
    flow = perturbed(name, 3, 0)
    x = torch.randn(3, dtype=torch.float64)

    def log_p(v: torch.Tensor) -> torch.Tensor:
        return flow.log_prob(v.unsqueeze(0)).sum()

    hess = torch.func.hessian(log_p)(x)
    want = torch.autograd.functional.hessian(log_p, x)
    torch.testing.assert_close(hess, want, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("name", VECTOR)
def test_torch_func_vmap_and_per_sample_gradients(name: str) -> None:
    # vmap over single rows gives the batched log_prob, and vmap(grad) the per-sample
    # gradients with respect to the parameters (what differentially private training needs),
    # numerical inverses (planar, Sylvester) included
    flow = perturbed(name, 3, 2)
    x, c = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    params = {k: v.detach() for k, v in flow.named_parameters()}

    def log_p(p: dict, v: torch.Tensor, cv: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(flow, p, (v.unsqueeze(0), cv.unsqueeze(0))).sum()

    def flow_log_prob(v: torch.Tensor, cv: torch.Tensor) -> torch.Tensor:
        return flow.log_prob(v.unsqueeze(0), cv.unsqueeze(0)).sum()

    lp = torch.func.vmap(flow_log_prob)(x, c)
    torch.testing.assert_close(lp, flow.log_prob(x, c), atol=1e-12, rtol=0)
    per_sample = torch.func.vmap(torch.func.grad(log_p), in_dims=(None, 0, 0))(params, x, c)
    assert_per_sample_gradients(flow, per_sample, [0, 1], x, c)


@pytest.mark.parametrize("name", IMAGE)
def test_torch_func_on_image_flows(name: str) -> None:
    # grad and vmap (log_prob, per-sample gradients) on the image flows too: the conditioners'
    # channels-last layout hint steps aside under vmap, which cannot query it
    flow = perturbed(name, (1, 4, 4), 0)
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64) * 0.8 + 0.1
    params = {k: v.detach() for k, v in flow.named_parameters()}

    def log_p(p: dict, v: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(flow, p, (v.unsqueeze(0),)).sum()

    torch.testing.assert_close(
        torch.func.vmap(lambda v: log_p(params, v))(x), flow.log_prob(x), atol=1e-12, rtol=0
    )
    xi = x[:1].clone().requires_grad_()
    (want,) = torch.autograd.grad(flow.log_prob(xi).sum(), xi)
    got = torch.func.grad(log_p, argnums=1)(params, x[0])
    torch.testing.assert_close(got, want[0], atol=1e-12, rtol=1e-12)
    per_sample = torch.func.vmap(torch.func.grad(log_p), in_dims=(None, 0))(params, x)
    assert_per_sample_gradients(flow, per_sample, [1], x)


@pytest.mark.parametrize("name", IMAGE)
def test_image_flows_with_glows_network_shape(name: str) -> None:
    """kernel=1: per-pixel residual blocks between the 3x3 input and output convolutions."""
    check_flow(name, (1, 4, 4), 0, **{**small_options(name), "kernel": 1})
    flow = flows.build(name, (1, 4, 4), **{**small_options(name), "kernel": 1})
    convs = [m for m in flow.modules() if isinstance(m, torch.nn.Conv2d)]
    assert {m.kernel_size for m in convs} == {(1, 1), (3, 3)}
    for bad in (2, 0, 1.0, True):
        with pytest.raises(PushforwardError, match="kernel must be a positive odd integer"):
            flows.build(name, (1, 4, 4), kernel=bad)


def test_unknown_permutation() -> None:
    with pytest.raises(PushforwardError, match="unknown permutation 'sorted'"):
        flows.build("maf", 3, permutation="sorted")


@pytest.mark.parametrize("hidden", [(), (16, 0), "wide", (1.5,), 0, True], ids=str)
def test_bad_hidden(hidden) -> None:
    with pytest.raises(PushforwardError, match="option hidden must be"):
        flows.build("maf", 3, hidden=hidden)


def test_a_bare_integer_hidden_is_one_width() -> None:
    one, tup = flows.build("maf", 3, hidden=16), flows.build("maf", 3, hidden=(16,))
    assert [p.shape for p in one.parameters()] == [p.shape for p in tup.parameters()]


def test_orders_alternate_between_layers() -> None:
    flow = flows.build("maf", 4, layers=3, hidden=(8,))
    orders = [t.made.order.tolist() for t in flow.transform]
    assert orders == [[0, 1, 2, 3], [3, 2, 1, 0], [0, 1, 2, 3]]


def test_iaf_is_the_inverse_structure_of_maf() -> None:
    from pushforward.core import Inverse
    from pushforward.transforms.autoregressive import MaskedAutoregressive

    flow = flows.build("iaf", 3, layers=2, hidden=(8,))
    assert all(isinstance(t, Inverse) for t in flow.transform)
    assert all(isinstance(t.inv, MaskedAutoregressive) for t in flow.transform)


def test_mog_sampling_in_row_chunks_equals_one_piece(monkeypatch) -> None:
    """Without gradient MADE MoG samples a large batch in row chunks (256 rows here): the
    same draws, row for row, with each row's own context."""
    from pushforward.nn import made

    flow = flows.build("made-mog", 3, 2, hidden=(8,), components=3).double()
    c = torch.randn(600, 2, dtype=torch.float64)
    torch.manual_seed(5)
    one = flow.sample(600, context=c).detach()  # with gradient: one piece
    monkeypatch.setattr(made, "AUTOREGRESS_CHUNK_BYTES", 1)
    torch.manual_seed(5)
    with torch.no_grad():
        chunked = flow.sample(600, context=c)
    torch.testing.assert_close(chunked, one, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["made-mog", "maf-mog"])
def test_mog_samples_follow_the_density(name: str) -> None:
    """The sequential sampler of MADE MoG draws from the density that log_prob evaluates:
    sample moments against moments of the density integrated on a grid."""
    torch.manual_seed(3)
    flow = flows.build(name, 2, **small_options(name, layers=1), components=3).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
        x = flow.sample(40_000)
        n = 800
        axis = torch.linspace(-12, 12, n, dtype=torch.float64)
        grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
        p = flow.log_prob(grid).exp() * (axis[1] - axis[0]) ** 2
    assert abs(float(p.sum()) - 1) < 1e-3
    mean = (p[:, None] * grid).sum(0)
    second = (p[:, None] * grid**2).sum(0)
    sd = (second - mean**2).sqrt()
    tol = 5 * sd / 40_000**0.5
    assert ((x.mean(0) - mean).abs() < tol).all(), (x.mean(0), mean)
    assert ((x.std(0) - sd).abs() < 0.03 * sd).all(), (x.std(0), sd)


@pytest.mark.parametrize("name", ["maf", "iaf", "nsf", "naf", "made", "made-mog", "maf-mog"])
def test_extreme_finite_inputs_give_no_nan(name: str) -> None:
    """|x| up to 1e4 in float32, in both directions, with non-trivial weights."""
    torch.manual_seed(0)
    flow = flows.build(name, 3, 2, **small_options(name))
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    v = torch.tensor([-1e4, -1e3, -5.0, 0.0, 5.0, 1e3, 1e4])
    x = torch.cartesian_prod(v, v, v)
    c = torch.randn(len(x), 2) * 1e2
    with torch.no_grad():
        lp = flow.log_prob(x, c)
        z, li = flow.transform.inverse(x, c)
        x2, lf = flow.transform(x, c)
    for what, t in {"log_prob": lp, "z": z, "ladj": li, "x": x2, "forward ladj": lf}.items():
        assert not t.isnan().any(), f"{name}: NaN in {what}"


def test_image_flows_need_an_image_shape() -> None:
    with pytest.raises(PushforwardError, match=r"image flow: features must be \(channels, h"):
        flows.build("glow", 16)
    with pytest.raises(PushforwardError, match="vector flow: features must be a positive"):
        flows.build("maf", (1, 4, 4))
    with pytest.raises(PushforwardError, match="cannot squeeze 7x7 images"):
        flows.build("glow", (1, 14, 14), levels=2)


@pytest.mark.parametrize("name", ["glow", "realnvp-image"])
def test_image_flow_latent_has_the_image_shape(name: str) -> None:
    flow = flows.build(name, (1, 8, 8), layers=1, hidden=(4,))
    x = torch.rand(3, 1, 8, 8)
    assert flow.latent(x).shape == x.shape
    assert flow.log_prob(x).shape == (3,)


def test_glow_split_prior() -> None:
    """Glow's learned prior of the factored-out channels: one more coupling per split, whose
    network starts at zero, so the flow starts as the one without it; the checker proves it."""
    options = {**small_options("glow"), "levels": 2, "hidden": (8,)}
    check_flow("glow", (1, 4, 4), 0, **options, split_prior=True)
    check_flow("glow", (2, 4, 4), 2, **options, split_prior=True)
    torch.manual_seed(0)
    plain = flows.build("glow", (1, 8, 8), **options)
    torch.manual_seed(0)
    split = flows.build("glow", (1, 8, 8), **options, split_prior=True)
    x = torch.rand(5, 1, 8, 8)
    assert len(split.state_dict()) > len(plain.state_dict())
    torch.testing.assert_close(split.log_prob(x), plain.log_prob(x))
    with pytest.raises(PushforwardError, match="option split_prior must be True or False"):
        flows.build("glow", (1, 8, 8), split_prior=1)


def test_latent_and_samples_are_contiguous_whatever_the_layers_layout() -> None:
    # an NSF layer's spline reads the MADE's transposed output in place and returns views in
    # that layout; what the flow hands a user is contiguous (and the same values)
    torch.manual_seed(0)
    flow = flows.build("nsf", 3, layers=2, hidden=(16, 16), affine=False)
    x = torch.randn(5, 3)
    z, _ = flow.transform.inverse(x)
    assert not z.is_contiguous()
    latent = flow.latent(x)
    assert latent.is_contiguous() and torch.equal(latent, z)
    assert flow.sample((4,)).is_contiguous()
    assert flow.sample_and_log_prob((4,))[0].is_contiguous()
