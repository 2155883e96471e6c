"""fit's preprocess hook (fresh uniform dequantization every step, reproducible from the seed, a
fixed validation set) and quiet progress bars when stderr is not a terminal."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from torch import Tensor

from pushforward import flows
from pushforward.core import PushforwardError
from pushforward.data.images import dequantize_uniform
from pushforward.distributions import Flow, StandardNormal
from pushforward.train import LOG_REFRESH_SECONDS, _progress, fit
from pushforward.transforms.linear import ElementwiseAffine

LEVELS = 4


def _images(n: int = 64) -> Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, LEVELS, (n, 1, 4, 4), generator=g).float()


def _glow() -> Flow:
    torch.manual_seed(0)
    return flows.build("glow", (1, 4, 4), levels=1, layers=1, hidden=(4,))


class Recording:
    """Uniform dequantization that keeps every batch it returns."""

    def __init__(self) -> None:
        self.batches: list[Tensor] = []

    def __call__(self, x: Tensor) -> Tensor:
        y = dequantize_uniform(x, LEVELS, dtype=x.dtype)
        self.batches.append(y.clone())
        return y


def test_preprocess_draws_fresh_noise_every_step_and_is_reproducible() -> None:
    x = _images()
    valid = dequantize_uniform(x[:8], LEVELS, generator=torch.Generator().manual_seed(1))
    runs = []
    for _ in range(2):
        flow, rec = _glow(), Recording()
        state = torch.random.get_rng_state()
        history = fit(flow, x, valid, epochs=3, batch_size=16, progress=False, preprocess=rec)
        assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
        assert len(rec.batches) == history.steps == 12
        runs.append((rec.batches, flow.state_dict(), history.valid_log_likelihood))
    (first, state_a, ll_a), (second, state_b, ll_b) = runs
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)  # the same noise from the same seed
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a) and ll_a == ll_b
    # every step dequantizes anew: the fractional parts differ between epochs
    batches = torch.cat(first)
    assert bool(((batches * LEVELS).floor() < LEVELS).all()) and bool((batches >= 0).all())
    noise = [(b * LEVELS).frac() for b in first]
    assert not any(torch.equal(noise[i], noise[j]) for i in range(12) for j in range(i))


def test_a_given_valid_is_used_as_it_is() -> None:
    x = _images()
    valid = dequantize_uniform(x[:8], LEVELS, generator=torch.Generator().manual_seed(1))
    flow = _glow()
    history = fit(flow, x, valid, epochs=1, batch_size=16, progress=False, preprocess=Recording())
    with torch.no_grad():
        expected = flow.log_prob(valid).double().mean().item()
    assert history.valid_log_likelihood[-1] == pytest.approx(expected, rel=1e-6)


def test_a_split_off_valid_is_preprocessed_once() -> None:
    """Without valid, fit dequantizes its validation rows once: the same points every epoch."""
    x = _images()
    calls: list[int] = []

    def shifted(batch: Tensor) -> Tensor:
        calls.append(len(batch))
        return (batch + 0.5) / LEVELS  # deterministic, so the validation set can be rebuilt

    flow = _glow()
    history = fit(flow, x, epochs=2, batch_size=16, progress=False, preprocess=shifted)
    n_valid = round(0.1 * len(x))
    assert calls[0] == n_valid and calls[1:] == [16] * history.steps  # once, then per step
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    valid = (x[order[:n_valid]] + 0.5) / LEVELS
    with torch.no_grad():
        expected = flow.log_prob(valid).double().mean().item()
    assert history.valid_log_likelihood[-1] == pytest.approx(expected, rel=1e-6)


def test_without_preprocess_nothing_changes() -> None:
    data = 3.0 + torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    results = []
    for preprocess in (None, lambda b: b):
        torch.manual_seed(0)
        flow = Flow(StandardNormal(2), ElementwiseAffine(2))
        history = fit(flow, data, epochs=2, progress=False, preprocess=preprocess)
        results.append((history.valid_log_likelihood, flow.state_dict()))
    (ll_a, state_a), (ll_b, state_b) = results
    assert ll_a == ll_b and all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_bad_preprocess() -> None:
    x = _images(16)
    with pytest.raises(PushforwardError, match="preprocess must be a function"):
        fit(_glow(), x, epochs=1, progress=False, preprocess=3)
    with pytest.raises(PushforwardError, match=r"preprocess returned \(2, 1, 4, 4\)"):
        fit(_glow(), x, epochs=1, progress=False, preprocess=lambda b: b[:2])


def test_progress_is_quiet_when_stderr_is_not_a_terminal() -> None:
    with contextlib.redirect_stderr(io.StringIO()) as err:
        bar = _progress(1000, "fit", True)
        for _ in range(1000):
            bar.update(1)
        bar.close()
    assert bar.mininterval == LOG_REFRESH_SECONDS >= 10
    assert err.getvalue().count("\r") <= 3  # the first draw and the final one, not 1000
