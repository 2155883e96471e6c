"""Variational dequantization: q(u | x) passes the shared checker as a conditional flow, its
noise stays inside each pixel's bin, the bound is log p_Y(y) - log q(u | x), both the flow and
the dequantizer learn from it, and a DequantizedFlow saves and loads with its dequantizer."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pushforward import flows, io
from pushforward.core import PushforwardError
from pushforward.data.dequantization import (
    DequantizationBound,
    DequantizedFlow,
    VariationalDequantizer,
)
from pushforward.nn.convnet import ConvResNet

from .checks import Case, check_transform
from .test_cli import fails, run
from .test_cli_images import SMALL_GLOW, gaussian_baseline_bits_per_dim

pytestmark = pytest.mark.usefixtures("float64_seeded")

SHAPE = (1, 2, 4)


def small_model(levels: int = 5) -> DequantizedFlow:
    flow = flows.build("glow", SHAPE, levels=1, layers=1, hidden=(8,))
    return DequantizedFlow(flow, VariationalDequantizer(SHAPE, levels, layers=2, hidden=(8,)))


def test_the_dequantizer_flow_passes_the_checker() -> None:
    """q(u | x) is a conditional flow (context: the flattened image): round trip, log|det|
    against the autograd Jacobian, batch consistency, gradients, save/load, context use."""
    d = math.prod(SHAPE)
    check_transform(
        Case(
            "variational dequantizer",
            lambda: VariationalDequantizer(SHAPE, 5, layers=2, hidden=(8,)).flow.transform,
            event_shape=SHAPE,
            context_features=d,
            perturb=0.05,  # larger random weights saturate the final sigmoid (u at 0 or 1)
        )
    )


def test_noise_stays_in_each_bin_and_the_bound_is_exact() -> None:
    model = small_model(levels=5)
    x = torch.randint(0, 5, (7, *SHAPE)).double()
    torch.manual_seed(3)
    y, log_q = model.dequantizer(x)
    assert torch.equal((y * 5).floor(), x)  # u in (0, 1): y in x's bin [x/L, (x+1)/L)
    torch.manual_seed(3)
    bound = DequantizationBound(model).log_prob(x)
    torch.testing.assert_close(bound, model.log_prob(y) - log_q)
    torch.manual_seed(3)
    discrete = model.discrete_log_prob(x)
    torch.testing.assert_close(discrete, bound - math.prod(SHAPE) * math.log(5))
    # log q is the change of variables of the dequantizer's flow, context = the scaled image
    u = y * 5 - x
    torch.testing.assert_close(log_q, model.dequantizer.flow.log_prob(u, (x / 4 - 0.5).flatten(1)))


def test_the_bound_trains_the_flow_and_the_dequantizer() -> None:
    model = small_model()
    bound = DequantizationBound(model)
    x = torch.randint(0, 5, (16, *SHAPE)).double()
    (-bound.log_prob(x).mean()).backward()
    for part in (model.transform, model.dequantizer):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and any(g is not None and bool(g.abs().sum() > 0) for g in grads)


def test_save_and_load_keep_the_dequantizer(tmp_path) -> None:
    model = small_model().eval()  # eval: no ActNorm data initialisation on the first call
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    config = io.make_config(
        "glow",
        list(SHAPE),
        0,
        {"levels": 1, "layers": 1, "hidden": [8]},
        levels=5,
        dequantize="variational",
        dequantizer={"layers": 2, "hidden": [8]},
    )
    io.save_model(tmp_path / "m", model, config)
    loaded, _ = io.load_model(tmp_path / "m")
    assert isinstance(loaded, DequantizedFlow)
    x = torch.randint(0, 5, (4, *SHAPE)).double()
    torch.manual_seed(0)
    a = model.discrete_log_prob(x)
    torch.manual_seed(0)
    torch.testing.assert_close(loaded.discrete_log_prob(x), a)
    config.pop("dequantizer")
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(PushforwardError, match="'dequantizer'"):
        io.load_model(tmp_path / "m")


def test_bad_input_is_named() -> None:
    with pytest.raises(PushforwardError, match="levels"):
        VariationalDequantizer(SHAPE, 1)
    with pytest.raises(PushforwardError, match="shape"):
        VariationalDequantizer((4, 4), 5)
    with pytest.raises(PushforwardError, match="event shape"):
        DequantizedFlow(
            flows.build("glow", (1, 4, 4), levels=1, layers=1), small_model().dequantizer
        )
    with pytest.raises(PushforwardError, match="images"):
        small_model().dequantizer(torch.zeros(3, 1, 4, 4))


def test_conv_resnet_reads_a_spatial_context_pixel_by_pixel() -> None:
    net = ConvResNet(1, 2, hidden=4, blocks=0, context_features=8, context_shape=(1, 2, 4))
    torch.nn.init.normal_(net.output.weight)
    v, c = torch.randn(3, *SHAPE), torch.randn(3, 8)
    out = net(v, c)
    assert out.shape == (3, *SHAPE, 2)
    c2 = c.clone()
    c2[:, 0] += 1.0  # pixel (0, 0): reaches its 5x5 neighbourhood only (two 3x3 convs)
    changed = (net(v, c2) - out).abs().sum((0, -1))[0]
    assert bool(changed[0, 0] > 0)
    with pytest.raises(PushforwardError, match="channels must be distinct"):
        ConvResNet(2, 2, channels=[0, 2])
    reader = ConvResNet(2, 2, out_channels=1, hidden=4, blocks=0, channels=[1])
    torch.nn.init.normal_(reader.output.weight)
    v = torch.randn(3, 2, 2, 4)
    w = v.clone()
    w[:, 0] += 1.0  # a channel it does not read
    assert reader(v).shape == (3, 1, 2, 4, 2) and torch.equal(reader(v), reader(w))
    with pytest.raises(PushforwardError, match="context_shape"):
        ConvResNet(1, 2, context_features=8, context_shape=(1, 3, 4))
    with pytest.raises(PushforwardError, match="pixels are 4x4"):
        ConvResNet(1, 2, context_features=8, context_shape=(1, 2, 4))(torch.randn(3, 1, 4, 4), c)


def test_cli_fits_digits_with_variational_dequantization(tmp_path) -> None:
    """The CI-sized Glow of tests/test_cli_images.py (5 epochs) with ``--dequantize
    variational`` (dequantizer 4 couplings x 16 channels): measured 2.581 test bits/dim
    (uniform: 2.616; 20 epochs: 2.295 against 2.336); the Gaussian baseline is 3.41. ``eval``
    reproduces fit's test figure exactly."""
    load_digits = pytest.importorskip("pushforward.data.images").load_digits
    pytest.importorskip("sklearn", reason="the digits dataset ships with scikit-learn")
    out = tmp_path / "vd"
    argv = ("fit", "digits", *SMALL_GLOW, "--epochs", 5, "--dequantize", "variational")
    code, stdout, err = run(*argv, "--out", out, "--json")
    assert code == 0, err
    metrics = json.loads(stdout)
    baseline = gaussian_baseline_bits_per_dim(load_digits("train"), load_digits("test"), 17)
    assert metrics["test_bits_per_dim"] < baseline - 0.4
    config = json.loads((out / "config.json").read_text())
    assert config["dequantize"] == "variational" and config["dequantizer"]["layers"] >= 1
    code, stdout, err = run("eval", out, "digits", "--json")
    assert code == 0, err
    assert json.loads(stdout)["log_likelihood"] == pytest.approx(metrics["test_log_likelihood"])
    fails("fit", "digits", "--dequantize", "learned", "--out", tmp_path / "x", match="learned")
