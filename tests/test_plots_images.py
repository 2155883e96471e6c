"""Image plots: samples at several temperatures, latent interpolation, reconstruction and latent
attribute edits each write a PNG of the size the grid implies; sampling at a temperature scales
the base noise; the plots leave matplotlib's global state alone."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pushforward import flows, plots
from pushforward.core import PushforwardError
from pushforward.distributions import DiagNormal, Flow, StandardNormal
from pushforward.plots import _slerp
from pushforward.transforms.linear import ElementwiseAffine

PNG = b"\x89PNG\r\n\x1a\n"
LEVELS = 17


def _png_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == PNG and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def glow() -> Flow:
    torch.manual_seed(0)
    return flows.build("glow", (1, 8, 8), levels=2, layers=1, hidden=(8,))


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, np.ndarray]:
    """Eight 8x8 'images' of two labels at bin midpoints in [0, 1) (no scikit-learn needed)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, LEVELS, (12, 1, 8, 8), generator=g)
    return (x.double() + 0.5) / LEVELS, np.array([3, 5] * 6)


def test_grid_size_formula() -> None:
    # width (cols * 0.6 + 1.1) in, height sum of (rows * 0.6 + 0.65) in, at 100 dpi
    assert plots.image_grid_size([2, 2, 2], 8) == (590, 555)
    assert plots.image_grid_size([1], 3) == (290, 125)


def test_image_samples(glow: Flow, tmp_path: Path) -> None:
    path = plots.image_samples(glow, tmp_path / "a" / "samples.png", levels=LEVELS)
    assert path == tmp_path / "a" / "samples.png"
    assert _png_size(path) == plots.image_grid_size([2, 2, 2], 8) == (590, 555)
    path = plots.image_samples(glow, tmp_path / "b.png", temperatures=(0.7,), rows=1, cols=3)
    assert _png_size(path) == (290, 125)


def test_interpolation(glow: Flow, digits, tmp_path: Path) -> None:
    images, _ = digits
    path = plots.interpolation(glow, images, tmp_path / "i.png", pairs=3, steps=5)
    assert _png_size(path) == plots.image_grid_size([3], 5)
    path = plots.interpolation(glow, images.numpy(), tmp_path / "j.png", method="linear")
    assert _png_size(path) == plots.image_grid_size([4], 8)
    with pytest.raises(PushforwardError, match="at least 10 images"):
        plots.interpolation(glow, images[:9], tmp_path / "k.png", pairs=5)
    with pytest.raises(PushforwardError, match="unknown method"):
        plots.interpolation(glow, images, tmp_path / "k.png", method="cubic")
    with pytest.raises(PushforwardError, match=r"expected shape \(n, 1, 8, 8\)"):
        plots.interpolation(glow, images[:, :, :4], tmp_path / "k.png")
    assert not (tmp_path / "k.png").exists()


def test_slerp_ends_and_norms() -> None:
    a, b = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.randn(3, 1, 4, 4)
    b = 2 * b.double()
    torch.testing.assert_close(_slerp(a, b, 0.0), a)
    torch.testing.assert_close(_slerp(a, b, 1.0), b)
    mid = _slerp(a, b, 0.5)
    norms = [v.flatten(1).norm(dim=1) for v in (a, b, mid)]
    torch.testing.assert_close(norms[2], (norms[0] + norms[1]) / 2)  # norm: linear in t
    torch.testing.assert_close(_slerp(a, a, 0.3), a)  # parallel: no division by sin 0


def test_reconstruction_returns_the_error(glow: Flow, digits, tmp_path: Path) -> None:
    images, _ = digits
    path, error = plots.reconstruction(glow, images, tmp_path / "r.png", n=5, levels=LEVELS)
    assert _png_size(path) == plots.image_grid_size([1, 1], 5)
    assert 0 <= error < 1e-4  # float32 round trip


def test_latent_edit(glow: Flow, digits, tmp_path: Path) -> None:
    images, labels = digits
    path = plots.latent_edit(glow, images, labels, tmp_path / "e.png", levels=LEVELS)
    assert _png_size(path) == plots.image_grid_size([4], 5)
    path = plots.latent_edit(
        glow, images, labels, tmp_path / "f.png", label_a=3, label_b=5, ts=(0, 1), rows=9
    )
    assert _png_size(path) == plots.image_grid_size([6], 2)  # only 6 images of label 5
    with pytest.raises(PushforwardError, match="no image has label 7"):
        plots.latent_edit(glow, images, labels, tmp_path / "g.png", label_a=7)
    with pytest.raises(PushforwardError, match="two labels"):
        plots.latent_edit(glow, images, np.zeros(12), tmp_path / "g.png")
    with pytest.raises(PushforwardError, match="expected 12 labels"):
        plots.latent_edit(glow, images, labels[:5], tmp_path / "g.png")


def test_latent_edit_at_zero_reconstructs(glow: Flow, digits) -> None:
    """t = 0 is f(f^-1(x)) = x; the direction is the difference of the mean latents."""
    images, labels = digits
    z = glow.latent(images.float())
    delta = z[labels == 3].mean(0) - z[labels == 5].mean(0)
    with torch.no_grad():
        back = glow.transform(z[labels == 5] + 0 * delta)[0]
    torch.testing.assert_close(back, images[labels == 5].float(), atol=1e-4, rtol=0)


def test_image_plots_reject_vector_flows(tmp_path: Path) -> None:
    vector = Flow(StandardNormal(4), ElementwiseAffine(4))
    with pytest.raises(PushforwardError, match="needs a flow on images"):
        plots.image_samples(vector, tmp_path / "x.png")
    with pytest.raises(PushforwardError, match="levels must be an integer >= 2"):
        plots.image_samples(
            flows.build("glow", (1, 4, 4), levels=1, layers=1, hidden=(4,)),
            tmp_path / "x.png",
            levels=1,
        )
    assert not (tmp_path / "x.png").exists()


def test_sample_at_temperature_scales_the_base_noise() -> None:
    flow = Flow(StandardNormal(3), ElementwiseAffine(3))
    with torch.no_grad():
        flow.transform.params.params["shift"].copy_(torch.tensor([1.0, -2.0, 0.5]))
        flow.transform.params.params["log_scale"].copy_(torch.tensor([0.3, 0.0, -1.0]))
    zero = plots.sample_at_temperature(flow, 4, 0.0)
    torch.testing.assert_close(zero, torch.tensor([[1.0, -2.0, 0.5]]).expand(4, 3))
    torch.manual_seed(3)
    full = plots.sample_at_temperature(flow, 6, 1.0)
    torch.manual_seed(3)
    half = plots.sample_at_temperature(flow, 6, 0.5)
    torch.testing.assert_close(half - zero[:1], 0.5 * (full - zero[:1]))  # affine: exact
    with pytest.raises(PushforwardError, match="temperature must be a finite number >= 0"):
        plots.sample_at_temperature(flow, 2, -1.0)


def test_temperature_needs_a_standard_normal_base() -> None:
    flow = Flow(DiagNormal(2), ElementwiseAffine(2))
    assert plots.sample_at_temperature(flow, 3, 1.0).shape == (3, 2)  # T = 1: any base
    with pytest.raises(PushforwardError, match="DiagNormal"):
        plots.sample_at_temperature(flow, 3, 0.5)


def test_temperature_with_a_context() -> None:
    flow = Flow(StandardNormal(2), ElementwiseAffine(2, context_features=3, hidden=(8,)), 3)
    x = plots.sample_at_temperature(flow, 4, 0.0, context=torch.randn(5, 3))
    assert x.shape == (4, 5, 2)
    torch.testing.assert_close(x[0], x[3])  # z = 0: the same point per context row


def test_no_global_matplotlib_state_change() -> None:
    code = """
import sys
import pushforward, pushforward.plots
assert "matplotlib" not in sys.modules, "importing pushforward imported matplotlib"
import matplotlib, tempfile, torch
from pushforward import flows, plots
before = matplotlib.rcParams.copy()
backend = matplotlib.get_backend(auto_select=False)
flow = flows.build("glow", (1, 4, 4), levels=1, layers=1, hidden=(4,))
x = torch.rand(4, 1, 4, 4)
with tempfile.TemporaryDirectory() as d:
    plots.image_samples(flow, d + "/s.png", rows=1, cols=2)
    plots.interpolation(flow, x, d + "/i.png", pairs=2, steps=3)
    plots.reconstruction(flow, x, d + "/r.png")
    plots.latent_edit(flow, x, [0, 1, 0, 1], d + "/e.png")
assert "matplotlib.pyplot" not in sys.modules, "plotting imported pyplot"
assert matplotlib.rcParams.copy() == before, "plotting changed rcParams"
assert matplotlib.get_backend(auto_select=False) == backend, "plotting changed the backend"
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
