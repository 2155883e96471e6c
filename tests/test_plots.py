"""Plots: every function writes a non-empty PNG (creating folders) and returns its path; the
lecture example z ~ U(0, 2), x = z^2 has p_x(x) = 1 / (4 sqrt x) through Flow.log_prob; and
importing pushforward (and plotting) leaves matplotlib's global state alone."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

from pushforward import plots
from pushforward.core import PushforwardError, Transform
from pushforward.data.potentials import potential
from pushforward.distributions import Flow, StandardNormal, Uniform
from pushforward.train import History
from pushforward.transforms.linear import ElementwiseAffine

PNG = b"\x89PNG\r\n\x1a\n"


class Square(Transform):
    """x = z^2 on z > 0 (the lecture notes' example): dx/dz = 2z."""

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z * z, torch.log(2 * z).sum(-1)

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z = torch.sqrt(x)
        return z, -torch.log(2 * z).sum(-1)


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG


def _flow2d() -> Flow:
    torch.manual_seed(0)
    t = ElementwiseAffine(2)
    with torch.no_grad():
        t.params.params["shift"].copy_(torch.tensor([0.5, -0.5]))
        t.params.params["log_scale"].copy_(torch.tensor([0.3, -0.2]))
    return Flow(StandardNormal(2), t)


def test_square_of_uniform_has_the_lecture_density() -> None:
    flow = Flow(Uniform(1, 0.0, 2.0), Square()).double()
    x = torch.linspace(0.01, 3.99, 200, dtype=torch.float64).reshape(-1, 1)
    expected = -torch.log(4 * torch.sqrt(x[:, 0]))
    torch.testing.assert_close(flow.log_prob(x), expected)
    # it is a density on (0, 4): integral of 1 / (4 sqrt x) from 0 to 4 is 1
    n = 100_000
    midpoints = (torch.arange(n, dtype=torch.float64) + 0.5).reshape(-1, 1) * (4 / n)
    mass = flow.log_prob(midpoints).exp().sum() * (4 / n)
    assert mass.item() == pytest.approx(1.0, abs=2e-3)
    assert flow.log_prob(torch.tensor([[4.5]], dtype=torch.float64)).item() == -math.inf


def test_change_of_variables_1d(tmp_path: Path) -> None:
    flow = Flow(Uniform(1, 0.0, 2.0), Square())
    path = plots.change_of_variables_1d(flow, tmp_path / "a" / "b" / "cov.png")
    assert path == tmp_path / "a" / "b" / "cov.png" and _is_png(path)
    # a Gaussian base takes its range from samples
    affine = Flow(StandardNormal(1), ElementwiseAffine(1))
    assert _is_png(plots.change_of_variables_1d(affine, tmp_path / "gauss.png", x_range=(-5, 5)))


def test_density_2d(tmp_path: Path) -> None:
    data = torch.randn(3000, 2)
    assert _is_png(plots.density_2d(_flow2d(), data, tmp_path / "d.png", grid=40, samples=500))
    path = plots.density_2d(_flow2d(), data.numpy(), str(tmp_path / "e.png"), bounds=(-3, 3))
    assert _is_png(path)


def test_pairs(tmp_path: Path) -> None:
    data, samples = torch.randn(400, 7), torch.randn(300, 7)
    assert _is_png(plots.pairs(data, samples, tmp_path / "p.png"))
    assert _is_png(plots.pairs(data, samples, tmp_path / "q.png", dims=[0, 6]))
    with pytest.raises(PushforwardError, match="dims"):
        plots.pairs(data, samples, tmp_path / "r.png", dims=[9])
    with pytest.raises(PushforwardError, match=r"samples: expected shape \(rows, 7\)"):
        plots.pairs(data, samples[:, :3], tmp_path / "s.png")


def test_training_curves(tmp_path: Path) -> None:
    history = History([3.0, 2.5, 2.2], [-2.9, -2.6, -2.7], 2, -2.6, 3, 30, 1.0, "max-epochs")
    assert _is_png(plots.training_curves(history, tmp_path / "h.png"))
    assert _is_png(plots.training_curves(history.to_dict(), tmp_path / "i.png"))
    target = History([1.0, 0.5, 0.2], loss_every=100, stopped="max-steps")
    assert _is_png(plots.training_curves(target, tmp_path / "j.png"))


def test_target_vs_flow(tmp_path: Path) -> None:
    path = plots.target_vs_flow(_flow2d(), potential("U1"), tmp_path / "t.png", grid=50)
    assert _is_png(path)


def test_plots_reject_mismatched_flows(tmp_path: Path) -> None:
    with pytest.raises(PushforwardError, match="2 feature"):
        plots.density_2d(Flow(StandardNormal(3), ElementwiseAffine(3)), torch.zeros(5, 3), "x")
    with pytest.raises(PushforwardError, match="1 feature"):
        plots.change_of_variables_1d(_flow2d(), tmp_path / "x.png")
    with pytest.raises(PushforwardError, match="bounds"):
        plots.target_vs_flow(_flow2d(), potential("U1"), tmp_path / "y.png", bounds=(1, -1))


def test_no_global_matplotlib_state_change() -> None:
    code = """
import sys
import pushforward, pushforward.plots, pushforward.train, pushforward.losses
assert "matplotlib" not in sys.modules, "importing pushforward imported matplotlib"
import matplotlib, tempfile, torch
before = matplotlib.rcParams.copy()
backend = matplotlib.get_backend(auto_select=False)
flow = pushforward.Flow(pushforward.StandardNormal(2), pushforward.Compose(
    __import__("pushforward.transforms.linear", fromlist=["x"]).ElementwiseAffine(2)))
with tempfile.TemporaryDirectory() as d:
    pushforward.plots.density_2d(flow, torch.randn(100, 2), d + "/x.png", grid=10, samples=10)
assert "matplotlib.pyplot" not in sys.modules, "plotting imported pyplot"
assert matplotlib.rcParams.copy() == before, "plotting changed rcParams"
assert matplotlib.get_backend(auto_select=False) == backend, "plotting changed the backend"
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
