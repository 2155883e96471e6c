"""Density distillation: both objectives (KL(student || teacher) and the MSE on the teacher's
(x, z) pairs) distil a MAF teacher into an IAF student on a small 2-D problem; the losses equal
their formulas on hand-made cases; conditional distillation; the teacher is frozen, in eval
mode and given back as it was; runs are reproducible; bad inputs are clear errors."""

from __future__ import annotations

import copy
import doctest
import math

import pytest
import torch
from torch import Tensor

from pushforward import flows, losses, train
from pushforward.core import PushforwardError, Transform
from pushforward.distributions import DiagNormal, Flow, StandardNormal
from pushforward.losses import _kl_and_mse, distillation_kl, distillation_mse
from pushforward.train import distill, estimate_reverse_kl
from pushforward.transforms.autoregressive import MaskedAutoregressive
from pushforward.transforms.linear import ElementwiseAffine


def _teacher(context_features: int = 0, seed: int = 0) -> Flow:
    """A small MAF with non-trivial random weights (far from the identity)."""
    torch.manual_seed(seed)
    flow = flows.build("maf", 2, context_features, layers=2, hidden=(16, 16))
    with torch.no_grad():
        for m in flow.modules():
            if isinstance(m, MaskedAutoregressive):
                m.made.output.weight.normal_(0.0, 0.7)
                m.made.output.bias.normal_(0.0, 0.3)
    return flow.eval()


def _student(context_features: int = 0, seed: int = 1) -> Flow:
    torch.manual_seed(seed)
    return flows.build("iaf", 2, context_features, layers=2, hidden=(16, 16))


def _affine(shift: list[float], log_scale: list[float]) -> Flow:
    t = ElementwiseAffine(len(shift))
    with torch.no_grad():
        t.params.params["shift"].copy_(torch.tensor(shift))
        t.params.params["log_scale"].copy_(torch.tensor(log_scale))
    return Flow(StandardNormal(len(shift)), t).double()


def _state(flow: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in flow.state_dict().items()}


@pytest.mark.parametrize("objective", ["kl", "mse", "both"])
def test_distilling_a_maf_teacher_into_an_iaf_student(objective: str) -> None:
    teacher, student = _teacher(), _student()
    before = estimate_reverse_kl(student, teacher.log_prob, 2000)
    history = distill(student, teacher, objective=objective, steps=120, lr=1e-2, progress=False)
    after = estimate_reverse_kl(student, teacher.log_prob, 2000)
    assert history.stopped == "max-steps" and history.steps == 120
    assert history.train_loss[-1] < history.train_loss[0]
    assert before > 0.5 and after < 0.03 * before, (before, after)
    torch.manual_seed(0)
    x = teacher.sample(500)
    with torch.no_grad():  # the student's (sequential) density tracks the teacher's
        gap = (student.log_prob(x) - teacher.log_prob(x)).abs().mean()
    assert gap < 0.15, float(gap)
    assert not student.training


def test_mse_equals_the_formula_on_affine_maps() -> None:
    teacher = _affine([1.0, -2.0], [0.5, -0.3])
    student = _affine([0.2, 0.1], [-0.1, 0.4])
    torch.manual_seed(3)
    loss = distillation_mse(student, teacher, 7)
    torch.manual_seed(3)
    z = torch.randn(7, 2, dtype=torch.float64)  # the same base draws
    a_t, b_t = torch.tensor([0.5, -0.3]).exp().double(), torch.tensor([1.0, -2.0]).double()
    a_s, b_s = torch.tensor([-0.1, 0.4]).exp().double(), torch.tensor([0.2, 0.1]).double()
    x, x_student = a_t * z + b_t, a_s * z + b_s  # teacher's pair (z, x); the student's x'
    z_teacher = (x_student - b_t) / a_t  # z' = f_t^{-1}(x')
    expected = (((x - x_student) ** 2).sum(-1) + ((z - z_teacher) ** 2).sum(-1)).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()  # the gradient reaches the student
    assert all(p.grad is not None for p in student.parameters())
    # objective "both" takes KL(student || teacher) from the same passes, at x' = f_s(z)
    torch.manual_seed(3)
    kl, mse = _kl_and_mse(student, teacher, 7)
    torch.testing.assert_close(mse, expected)
    with torch.no_grad():
        torch.testing.assert_close(
            kl, (student.log_prob(x_student) - teacher.log_prob(x_student)).mean()
        )


def test_mse_is_zero_for_equal_maps_and_kl_is_the_mean_log_ratio() -> None:
    teacher = _affine([1.0, -2.0], [0.5, -0.3])
    assert distillation_mse(copy.deepcopy(teacher), teacher, 5).item() == pytest.approx(0.0)
    student = _affine([0.2, 0.1], [-0.1, 0.4])
    torch.manual_seed(1)
    kl = distillation_kl(student, teacher, 9)
    torch.manual_seed(1)
    x, log_s = student.sample_and_log_prob(9)
    torch.testing.assert_close(kl, (log_s - teacher.log_prob(x)).mean())
    # Gaussians: the estimate averages to the closed-form KL between the two diagonal normals
    torch.manual_seed(2)
    big = distillation_kl(student, teacher, 200_000).item()
    var_s, var_t = torch.tensor([-0.2, 0.8]).exp(), torch.tensor([1.0, -0.6]).exp()
    dmu = torch.tensor([0.2 - 1.0, 0.1 + 2.0])
    closed = 0.5 * (var_s / var_t + dmu**2 / var_t - 1 + var_t.log() - var_s.log()).sum()
    assert big == pytest.approx(float(closed), abs=0.02)


def test_conditional_distillation() -> None:
    teacher, student = _teacher(context_features=1), _student(context_features=1)
    c = torch.randn(5, 1)
    assert distillation_kl(student, teacher, 3, c).shape == ()
    assert distillation_mse(student, teacher, 3, c).shape == ()
    pool = torch.linspace(-2, 2, 64).unsqueeze(-1)

    def kl() -> float:
        torch.manual_seed(0)
        with torch.no_grad():
            return distillation_kl(student, teacher, 64, pool).item()

    before = kl()
    history = distill(student, teacher, context=pool, steps=120, lr=5e-3, progress=False)
    assert history.stopped == "max-steps"
    assert kl() < 0.2 * before, (before, kl())
    history = distill(student, teacher, objective="mse", context=pool, steps=5, progress=False)
    assert math.isfinite(history.train_loss[-1])


class ModeSpy(Transform):
    """ElementwiseAffine that records the training flag of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = ElementwiseAffine(2)
        self.modes: list[bool] = []

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.modes.append(self.training)
        return self.inner(z, context)

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.modes.append(self.training)
        return self.inner.inverse(x, context)


def test_teacher_is_frozen_in_eval_mode_and_given_back_and_runs_are_reproducible() -> None:
    spy = ModeSpy()
    with torch.no_grad():
        spy.inner.params.params["shift"].fill_(1.5)
    teacher = Flow(StandardNormal(2), spy).train()
    frozen = spy.inner.params.params["log_scale"]
    frozen.requires_grad_(False)  # a flag the caller set is given back as it was
    teacher_state = _state(teacher)
    students = [_student(), _student()]
    rng = torch.get_rng_state()
    histories = [
        distill(s, teacher, objective="both", steps=15, seed=4, progress=False) for s in students
    ]
    assert torch.equal(torch.get_rng_state(), rng)
    assert spy.modes and not any(spy.modes)  # every teacher pass in eval mode
    assert teacher.training  # ... and its mode given back
    assert spy.inner.params.params["shift"].requires_grad and not frozen.requires_grad
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, _state(teacher)[k]) for k, v in teacher_state.items())
    a, b = (_state(s) for s in students)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert histories[0].train_loss == histories[1].train_loss


def test_mse_needs_the_teachers_base_and_kl_does_not() -> None:
    teacher = Flow(DiagNormal(2), ElementwiseAffine(2))
    with torch.no_grad():
        teacher.base.params.params["loc"].fill_(1.0)
    student = Flow(DiagNormal(2), ElementwiseAffine(2))
    with pytest.raises(PushforwardError, match="base must be the teacher's"):
        distill(student, teacher, objective="mse", steps=1, progress=False)
    with pytest.raises(PushforwardError, match="base must be the teacher's"):
        distill(Flow(StandardNormal(2), ElementwiseAffine(2)), teacher, objective="both")
    distill(student, teacher, objective="kl", steps=2, progress=False)
    student.base.load_state_dict(teacher.base.state_dict())
    distill(student, teacher, objective="mse", steps=2, progress=False)


class NaNBase(StandardNormal):
    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return super().log_prob(z, context) * math.nan


def test_non_finite_objective_stops_and_keeps_the_last_good_weights() -> None:
    teacher = Flow(NaNBase(2), ElementwiseAffine(2))
    student = _student()
    start = _state(student)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        history = distill(student, teacher, objective="kl", steps=20, progress=False)
    assert history.stopped == "non-finite" and history.train_loss == []
    assert all(torch.equal(v, _state(student)[k]) for k, v in start.items())


def test_errors_name_the_problem() -> None:
    teacher, student = _teacher(), _student()

    def fails(match: str, *args, **kwargs) -> None:
        with pytest.raises(PushforwardError, match=match):
            distill(*args, progress=False, **kwargs)

    fails("unknown objective 'l2'", student, teacher, objective="l2")
    fails("event shape", flows.build("iaf", 3, hidden=(8,)), teacher)
    fails("context_features", _student(context_features=1), teacher)
    fails("same flow", teacher, teacher)
    fails("must be a Flow", student, teacher.transform)
    fails("steps must be a positive integer", student, teacher, steps=0)
    fails("lr must be", student, teacher, lr=-1.0)
    fails("unconditional: distill takes no context", student, teacher, context=torch.ones(4, 1))
    cond_t, cond_s = _teacher(context_features=1), _student(context_features=1)
    fails(r"pool of context rows of shape \(rows, 1\)", cond_s, cond_t)
    fails(
        r"expected a pool of rows of shape \(rows, 1\), got \(4,\)",
        cond_s,
        cond_t,
        context=torch.ones(4),
    )
    fails(
        r"context: expected shape \(4, 1\), got \(4, 2\)", cond_s, cond_t, context=torch.ones(4, 2)
    )
    fails("dtype", student.double(), teacher)
    with pytest.raises(PushforwardError, match="n must be a positive integer"):
        distillation_mse(_student(), teacher, 0)
    with pytest.raises(PushforwardError, match="event shape"):
        distillation_kl(flows.build("iaf", 3, hidden=(8,)), teacher, 4)
    assert teacher.training is False and all(p.requires_grad for p in teacher.parameters())


def test_docstring_examples() -> None:
    for fn in (losses.distillation_kl, losses.distillation_mse, train.distill):
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        for test in doctest.DocTestFinder().find(fn, globs={"torch": torch, **vars(losses)}):
            test.globs.update(vars(train))
            runner.run(test)
        assert runner.summarize(verbose=False).failed == 0, fn.__name__
