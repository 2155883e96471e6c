"""The losses: nll is the mean negative log-likelihood; reverse_kl is an unbiased,
reparameterised estimate of KL(q||p) - log Z (checked against the closed form for Gaussians,
value and gradient), with the inverse temperature, the conditional call and clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from pushforward.core import PushforwardError
from pushforward.distributions import Flow, StandardNormal
from pushforward.losses import nll, reverse_kl
from pushforward.transforms.linear import ElementwiseAffine

LOG_2PI = math.log(2 * math.pi)


def _flow(shift: list[float], log_scale: list[float]) -> Flow:
    t = ElementwiseAffine(len(shift)).double()
    with torch.no_grad():
        t.params.params["shift"].copy_(torch.tensor(shift))
        t.params.params["log_scale"].copy_(torch.tensor(log_scale))
    return Flow(StandardNormal(len(shift)), t).double()


def test_nll_is_mean_negative_log_prob() -> None:
    flow = _flow([0.5, -1.0], [0.2, -0.3])
    x = torch.randn(17, 2, dtype=torch.float64)
    loss = nll(flow, x)
    assert loss.shape == ()
    torch.testing.assert_close(loss, -flow.log_prob(x).mean())
    loss.backward()
    assert all(p.grad is not None for p in flow.parameters())


def test_reverse_kl_is_minus_log_z_when_q_equals_p() -> None:
    flow = _flow([0.0, 0.0], [0.0, 0.0])
    log_p = lambda x: -0.5 * (x * x).sum(-1)  # noqa: E731  N(0, I) times Z = 2 pi
    # log q - log p~ = -log Z for every sample: zero variance
    torch.testing.assert_close(
        reverse_kl(flow, log_p, 64).detach(), torch.tensor(-LOG_2PI).double()
    )
    # beta scales the target: E_q[log q - beta log p~] = -log 2 pi - (1 - beta) E|x|^2 / 2
    torch.manual_seed(0)
    value = reverse_kl(flow, log_p, 200_000, beta=0.3).item()
    assert value == pytest.approx(-LOG_2PI - 0.7, abs=0.01)


def test_reverse_kl_matches_gaussian_closed_form_and_gradient() -> None:
    mu, log_sigma = [0.5, -0.2], [0.3, -0.4]
    m, s = torch.tensor([1.0, 2.0]).double(), torch.tensor([0.7, 1.5]).double()
    flow = _flow(mu, log_sigma)
    log_p = lambda x: -0.5 * (((x - m) / s) ** 2).sum(-1)  # noqa: E731
    log_z = (torch.log(s).sum() + LOG_2PI).item()
    mu_t, sig_t = torch.tensor(mu).double(), torch.tensor(log_sigma).double().exp()
    kl = (torch.log(s / sig_t) + (sig_t**2 + (mu_t - m) ** 2) / (2 * s**2) - 0.5).sum().item()
    torch.manual_seed(0)
    loss = reverse_kl(flow, log_p, 200_000)
    assert loss.item() == pytest.approx(kl - log_z, abs=0.01)
    loss.backward()
    # d KL / d mu = (mu - m) / s^2: the estimate is reparameterised, not score-function
    expected = ((mu_t - m) / s**2).numpy()
    grad = flow.transform.params.params["shift"].grad.numpy()
    assert grad == pytest.approx(expected, abs=0.02)


def test_reverse_kl_with_context_calls_log_density_with_context() -> None:
    torch.manual_seed(0)
    flow = Flow(StandardNormal(2), ElementwiseAffine(2, context_features=3), context_features=3)
    context = torch.randn(4, 3)
    seen = {}

    def log_p(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        seen["x"], seen["c"] = x.shape, c.shape
        return -0.5 * (x * x).sum(-1) + c.sum(-1)

    loss = reverse_kl(flow, log_p, 5, context=context)
    assert loss.shape == ()
    assert seen == {"x": (5, 4, 2), "c": (5, 4, 3)}


def test_reverse_kl_errors() -> None:
    flow = _flow([0.0, 0.0], [0.0, 0.0])
    with pytest.raises(PushforwardError, match="one value per sample"):
        reverse_kl(flow, lambda x: x, 8)
    with pytest.raises(PushforwardError, match="n must be a positive integer"):
        reverse_kl(flow, lambda x: x.sum(-1), 0)
    with pytest.raises(PushforwardError, match="beta"):
        reverse_kl(flow, lambda x: x.sum(-1), 8, beta=-1.0)
