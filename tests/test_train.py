"""Training loops: fit learns a Gaussian's parameters, is reproducible from its seed without
touching the global RNG, stops early and restores the best weights, honours max_time, survives
a non-finite loss with finite weights and a warning, switches train/eval modes, validates its
input; fit_target recovers a Gaussian target and -log Z; History round-trips through a dict."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import Tensor

from pushforward.core import PushforwardError, Transform
from pushforward.distributions import Flow, StandardNormal
from pushforward.train import (
    History,
    SpikeGuard,
    WeightAverage,
    _beta,
    estimate_reverse_kl,
    fit,
    fit_target,
)
from pushforward.transforms.linear import ElementwiseAffine

LOG_2PI = math.log(2 * math.pi)


def _affine_flow(features: int = 2, context_features: int = 0) -> Flow:
    t = ElementwiseAffine(features, context_features=context_features, hidden=(8,))
    return Flow(StandardNormal(features), t, context_features=context_features)


def _params(flow: Flow) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in flow.state_dict().items()}


def _gaussian(n: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.tensor([3.0, -1.0]) + torch.tensor([0.5, 2.0]) * torch.randn(n, 2, generator=g)


class Recorder(Transform):
    """ElementwiseAffine that records the mode of every call and can turn its ladj to NaN."""

    def __init__(self, nan_after: int | None = None, spike_at: int | None = None):
        super().__init__()
        self.inner = ElementwiseAffine(2)
        self.modes: list[bool] = []
        self.nan_after = nan_after
        self.spike_at = spike_at

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.inner(z, context)

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.modes.append(self.training)
        z, ladj = self.inner.inverse(x, context)
        training_calls = sum(self.modes)
        if self.nan_after is not None and self.training and training_calls > self.nan_after:
            ladj = ladj * math.nan
        if self.training and training_calls == self.spike_at:
            ladj = ladj * 1e6 - 1e8
        return z, ladj


def test_fit_learns_a_gaussian() -> None:
    data = _gaussian(4000)
    flow = _affine_flow()
    history = fit(flow, data, epochs=30, lr=0.05, batch_size=400, progress=False)
    p = flow.transform.params.params
    assert p["shift"].detach().numpy() == pytest.approx([3.0, -1.0], abs=0.1)
    assert p["log_scale"].exp().detach().numpy() == pytest.approx([0.5, 2.0], rel=0.08)
    # minus the entropy of N(mu, diag(0.25, 4)), log 2 pi e + log(0.5 * 2), within 3 standard
    # errors of a 400-row mean (the log-density has standard deviation 1)
    assert history.best_valid_log_likelihood == pytest.approx(-(LOG_2PI + 1), abs=0.15)
    assert history.stopped == "max-epochs" and history.epochs == 30
    assert history.steps == 30 * (3600 // 400)
    assert len(history.train_loss) == len(history.valid_log_likelihood) == 30
    assert not flow.training


def test_same_seed_same_numbers_and_global_rng_untouched() -> None:
    data = _gaussian(600)
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(123)
        flow = _affine_flow()
        state = torch.get_rng_state()
        history = fit(flow, data, epochs=3, batch_size=64, lr=0.01, seed=seed, progress=False)
        assert torch.equal(torch.get_rng_state(), state)
        runs.append((history.train_loss, history.valid_log_likelihood, _params(flow)))
    (loss_a, valid_a, p_a), (loss_b, valid_b, p_b), (loss_c, _, _) = runs
    assert loss_a == loss_b and valid_a == valid_b
    assert all(torch.equal(p_a[k], p_b[k]) for k in p_a)
    assert loss_a != loss_c


def test_early_stopping_restores_the_best_weights() -> None:
    # training moves the model away from the validation distribution: epoch 1 is the best
    train, valid = _gaussian(512), torch.randn(256, 2)
    flow = _affine_flow()
    history = fit(flow, train, valid, epochs=50, patience=2, lr=0.05, progress=False)
    assert history.stopped == "early-stopping"
    assert history.best_epoch == 1 and history.epochs == 3
    assert history.valid_log_likelihood[0] > max(history.valid_log_likelihood[1:])
    with torch.no_grad():
        restored = flow.log_prob(valid).double().mean().item()
    assert restored == pytest.approx(history.best_valid_log_likelihood, abs=1e-9)


def test_max_time_stops_cleanly() -> None:
    flow = _affine_flow()
    history = fit(flow, _gaussian(600), epochs=100, max_time=1e-9, progress=False)
    assert history.stopped == "max-time"
    assert history.steps == 1 and history.epochs == 1
    assert len(history.valid_log_likelihood) == 1 and history.best_epoch == 1


def test_non_finite_loss_stops_with_finite_best_weights_and_a_warning() -> None:
    torch.manual_seed(0)
    t = Recorder(nan_after=6)
    flow = Flow(StandardNormal(2), t)
    after_epoch: dict[int, dict[str, Tensor]] = {}

    def callback(epoch: int, history: History) -> None:
        after_epoch[epoch] = _params(flow)

    # 4 batches per epoch; batches 7, 8, ... are NaN: each is skipped (the weights stay as they
    # were after batch 6), and the 50th in a row (batch 56, epoch 14) stops the run
    match = "50 non-finite or exploding losses in a row at epoch 14"
    with pytest.warns(RuntimeWarning, match=match):
        history = fit(
            flow,
            _gaussian(500),
            epochs=30,
            batch_size=100,
            patience=100,
            progress=False,
            callback=callback,
        )
    assert history.stopped == "non-finite" and history.epochs == 14
    assert history.steps == 6 and history.skipped == 50 and math.isnan(history.train_loss[-1])
    assert all(torch.isfinite(p).all() for p in flow.parameters())
    state = _params(flow)
    assert all(torch.equal(state[k], after_epoch[history.best_epoch][k]) for k in state)
    for e in range(3, 14):  # skipped steps leave the weights alone
        assert all(torch.equal(after_epoch[e][k], after_epoch[2][k]) for k in state)


def test_a_loss_spike_is_skipped_and_training_goes_on() -> None:
    """Batch 150 has a loss ~1e8 above the others (and a gradient 1e6 times too large): its
    update is skipped and counted, and the run ends where the same run without the spike does,
    one step fewer."""
    data, runs = _gaussian(1000), []
    for spike_at in (150, None):
        torch.manual_seed(0)
        flow = Flow(StandardNormal(2), Recorder(spike_at=spike_at))
        runs.append(fit(flow, data, epochs=20, batch_size=50, lr=0.05, patience=99, progress=False))
    spiked, plain = runs
    assert spiked.stopped == plain.stopped == "max-epochs"
    assert (spiked.skipped, plain.skipped) == (1, 0)
    assert spiked.steps == plain.steps - 1 == 20 * 18 - 1
    assert all(math.isfinite(v) for v in spiked.train_loss)
    assert spiked.best_valid_log_likelihood == pytest.approx(-(LOG_2PI + 1), abs=0.15)
    assert spiked.best_valid_log_likelihood == pytest.approx(
        plain.best_valid_log_likelihood, abs=0.01
    )


def test_modes_train_during_steps_eval_during_validation() -> None:
    torch.manual_seed(0)
    t = Recorder()
    flow = Flow(StandardNormal(2), t)
    fit(flow, _gaussian(300), epochs=2, batch_size=90, progress=False)
    # per epoch: 3 training steps, then one validation batch
    assert t.modes == [True, True, True, False] * 2
    assert not flow.training


def test_fit_conditional_flow() -> None:
    g = torch.Generator().manual_seed(0)
    context = torch.randn(800, 1, generator=g)
    data = torch.cat([2 * context, -context], 1) + 0.3 * torch.randn(800, 2, generator=g)
    flow = _affine_flow(2, context_features=1)
    history = fit(flow, data, train_context=context, epochs=15, lr=0.01, progress=False)
    assert history.valid_log_likelihood[-1] > history.valid_log_likelihood[0] + 0.5


def test_progress_bar_shows_loss_and_valid_ll(capsys: pytest.CaptureFixture) -> None:
    fit(_affine_flow(), _gaussian(300), epochs=2, progress=True)
    err = capsys.readouterr().err
    assert "loss=" in err and "valid LL=" in err


def test_fit_validates_its_input() -> None:
    flow = _affine_flow()
    data = _gaussian(100)
    cases = [
        (dict(train=torch.zeros(10, 3)), r"train: expected shape \(rows, 2\)"),
        (dict(train=torch.zeros(4, 10, 2)), r"train: expected shape \(rows, 2\)"),
        (dict(train=torch.full((10, 2), math.nan)), "NaN"),
        (dict(train=data[:1]), "too few"),
        (dict(train=data, valid=torch.zeros(5, 1)), "valid: expected shape"),
        (dict(train=data, lr_schedule="step"), "lr_schedule"),
        (dict(train=data, epochs=0), "epochs must be a positive integer"),
        (dict(train=data, lr=-1.0), "lr must be"),
        (dict(train=data, valid_fraction=1.5), "valid_fraction"),
        (dict(train=data, train_context=torch.zeros(100, 1)), "unconditional"),
    ]
    for kwargs, message in cases:
        with pytest.raises(PushforwardError, match=message):
            fit(flow, progress=False, **kwargs)
    with pytest.raises(PushforwardError, match="conditional: train needs a train_context"):
        fit(_affine_flow(2, context_features=1), data, progress=False)


def test_fit_target_recovers_a_gaussian_and_log_z() -> None:
    m, s = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.5])
    log_p = lambda x: -0.5 * (((x - m) / s) ** 2).sum(-1)  # noqa: E731
    flow = _affine_flow()
    history = fit_target(flow, log_p, steps=600, lr=0.05, anneal_steps=100, progress=False)
    p = flow.transform.params.params
    assert p["shift"].detach().numpy() == pytest.approx(m.numpy(), abs=0.1)
    assert p["log_scale"].exp().detach().numpy() == pytest.approx(s.numpy(), rel=0.1)
    log_z = LOG_2PI + math.log(0.5 * 1.5)
    assert estimate_reverse_kl(flow, log_p, 20_000) == pytest.approx(-log_z, abs=0.02)
    assert history.stopped == "max-steps" and history.steps == 600
    assert history.loss_every == 100 and len(history.train_loss) == 6
    assert not flow.training


def test_beta_warm_up() -> None:
    assert _beta(0, 0) == _beta(5, 0) == 1.0
    assert _beta(0, 100) == pytest.approx(0.01)
    assert _beta(50, 100) == pytest.approx(0.51)
    assert _beta(99, 100) == pytest.approx(1.0) and _beta(500, 100) == 1.0


def test_fit_target_non_finite_keeps_finite_weights() -> None:
    torch.manual_seed(0)
    flow = _affine_flow()
    start = _params(flow)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        history = fit_target(flow, lambda x: x.sum(-1) * math.nan, steps=50, progress=False)
    assert history.stopped == "non-finite" and history.train_loss == []
    state = _params(flow)
    assert all(torch.equal(state[k], start[k]) for k in state)


def test_fit_target_max_time_and_errors() -> None:
    log_p = lambda x: -0.5 * (x * x).sum(-1)  # noqa: E731
    history = fit_target(_affine_flow(), log_p, steps=1000, max_time=1e-9, progress=False)
    assert history.stopped == "max-time" and history.steps == 1 and len(history.train_loss) == 1
    with pytest.raises(PushforwardError, match="anneal_steps"):
        fit_target(_affine_flow(), log_p, anneal_steps=-1, progress=False)
    with pytest.raises(PushforwardError, match="unconditional"):
        fit_target(_affine_flow(2, 1), log_p, progress=False)


def test_history_round_trips_through_json() -> None:
    history = fit(_affine_flow(), _gaussian(300), epochs=2, progress=False)
    d = json.loads(json.dumps(history.to_dict()))
    assert History.from_dict(d) == history
    assert set(d) >= {"train_loss", "valid_log_likelihood", "best_epoch", "stopped", "seconds"}


def test_spike_guard_accepts_noise_rejects_spikes_and_gives_up_on_divergence() -> None:
    gen = torch.Generator().manual_seed(0)
    losses = (100.0 - torch.arange(2000) * 0.01 + torch.randn(2000, generator=gen)).tolist()
    guard = SpikeGuard(warmup=20)
    assert all(guard.accept(v) for v in losses)  # a decreasing noisy loss is never a spike
    assert guard.skipped == 0 and guard.count == 2000
    assert guard.mean == pytest.approx(80.5, abs=0.5)
    assert not guard.accept(1e9) and not guard.accept(math.nan) and not guard.accept(math.inf)
    assert guard.accept(80.0) and guard.skipped == 3 and guard.in_a_row == 0
    state = guard.state_dict()
    copy = SpikeGuard(warmup=20)
    copy.load_state_dict(json.loads(json.dumps(state)))
    assert copy.state_dict() == state
    # the first `warmup` losses build the averages and are never rejected unless not finite
    early = SpikeGuard(warmup=3)
    assert [early.accept(v) for v in (1.0, 10.0, math.nan, 0.8, 1e6)] == [
        True,
        True,
        False,
        True,
        False,
    ]
    stuck = SpikeGuard(patience=3)
    stuck.accept(1.0)
    stuck.accept(math.nan)
    stuck.accept(math.nan)
    with pytest.raises(PushforwardError, match="3 minibatches in a row had a loss far above"):
        stuck.accept(math.nan)
    for bad in ({"threshold": 0}, {"warmup": 0}, {"decay": 1.0}, {"patience": 1.5}):
        with pytest.raises(PushforwardError, match=next(iter(bad))):
            SpikeGuard(**bad)


def test_weight_average_follows_the_weights_and_swaps_them_in_and_back() -> None:
    m = torch.nn.Linear(3, 2)
    m.bias.requires_grad_(False)  # frozen weights are not averaged
    avg = WeightAverage(decay=0.9)
    with avg.applied(m):  # nothing averaged yet: a no-op
        pass
    seen = []
    for step in range(200):
        with torch.no_grad():
            m.weight.fill_(float(step))
        avg.update(m)
        seen.append(float(step))
    # closed form of the recursion: averages start at step 0, then beta_t = min(0.9, ...)
    expect = seen[0]
    for t in range(1, 200):
        beta = min(0.9, (1 + t) / (10 + t))
        expect = beta * expect + (1 - beta) * seen[t]
    assert set(avg.averages) == {"weight"} and avg.updates == 200
    torch.testing.assert_close(avg.averages["weight"], torch.full((2, 3), expect))
    assert 185.0 < expect < 199.0  # lags the weights by about decay / (1 - decay) steps
    with avg.applied(m):
        torch.testing.assert_close(m.weight.detach(), torch.full((2, 3), expect))
    assert torch.all(m.weight == 199.0)  # the own weights came back
    with pytest.raises(RuntimeError, match="boom"), avg.applied(m):
        raise RuntimeError("boom")
    assert torch.all(m.weight == 199.0)  # ... also after an exception
    # restored from tensors in another key order (safetensors sorts them), it goes on alike
    two = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    first, second = WeightAverage(0.9), WeightAverage(0.9)
    first.update(two)
    saved = dict(reversed(list(first.tensors().items())))
    second.load_tensors(saved, first.updates)
    with torch.no_grad():
        for q in two.parameters():
            q.add_(1.0)
    first.update(two)
    second.update(two)
    for k, v in first.averages.items():
        torch.testing.assert_close(second.averages[k], v)
    copy = WeightAverage(decay=0.9)
    copy.load_tensors(avg.tensors(), avg.updates)
    torch.testing.assert_close(copy.averages["weight"], avg.averages["weight"])
    assert copy.updates == 200
    with (
        pytest.raises(PushforwardError, match="not the module that was averaged"),
        copy.applied(torch.nn.Linear(2, 2)),
    ):
        pass
    for bad in (1.0, -0.1, math.nan):
        with pytest.raises(PushforwardError, match="decay"):
            WeightAverage(bad)


def test_fit_with_a_weight_average_validates_and_keeps_the_averaged_weights() -> None:
    data = 3.0 + 0.5 * torch.randn(600, 2, generator=torch.Generator().manual_seed(0))
    valid = 3.0 + 0.5 * torch.randn(200, 2, generator=torch.Generator().manual_seed(1))
    runs = {}
    for average in (None, 0.95):
        torch.manual_seed(0)
        flow = _affine_flow()
        history = fit(flow, data, valid, epochs=4, batch_size=16, lr=0.05, patience=10,
                      progress=False, average=average)  # fmt: skip
        with torch.no_grad():
            ll = flow.log_prob(valid).mean().item()
        # what was validated (and chosen as best) is what the flow holds at the end
        assert history.best_valid_log_likelihood == pytest.approx(ll, abs=1e-6)
        runs[average] = (history, [p.detach().clone() for p in flow.parameters()])
    (plain, w_plain), (averaged, w_avg) = runs[None], runs[0.95]
    assert plain.steps == averaged.steps and plain.train_loss == averaged.train_loss
    assert any(not torch.equal(a, b) for a, b in zip(w_plain, w_avg))
    with pytest.raises(PushforwardError, match="decay"):
        fit(_affine_flow(), data, epochs=1, progress=False, average=1.0)
