r"""Training objectives: forward KL to data (maximum likelihood), reverse KL to an
unnormalised target density, and density distillation of a student flow from a teacher.

All are pure functions of a :class:`~pushforward.distributions.Flow` and return a scalar
tensor to minimise.

* :func:`nll` -- the forward KL :math:`\mathrm{KL}(p_\text{data} \,\|\, q)` up to the (unknown)
  data entropy, estimated by the mean negative log-likelihood of a minibatch. It needs
  ``flow.log_prob``, i.e. the transform's ``inverse`` (cheap for MAF, coupling flows).
* :func:`reverse_kl` -- :math:`\mathrm{KL}(q \,\|\, p) - \log Z` for a target known up to its
  normaliser, :math:`p = \tilde p / Z`, estimated from reparameterised samples of the flow. It
  needs only the ``forward`` direction (cheap for IAF, planar, radial), through
  ``flow.sample_and_log_prob``.
* :func:`distillation_kl` -- probability density distillation,
  :math:`\mathrm{KL}(s \,\|\, t)` from a student :math:`s` to a teacher :math:`t`: the reverse
  KL with the teacher's (normalised) density as the target.
* :func:`distillation_mse` -- the teacher-student regression of the lecture notes,
  :math:`\|x - x'\|^2 + \|z - z'\|^2` on pairs :math:`(z, x)` of the teacher.

Both distillation losses use only the fast directions when the teacher is a MAF and the student
an IAF (the teacher's density pass and the student's sampling pass), except for drawing the
teacher's own samples in :func:`distillation_mse` (no gradient; sequential for a MAF).

References:
    Papamakarios, Nalisnick, Rezende, Mohamed and Lakshminarayanan (2021), "Normalizing Flows
    for Probabilistic Modeling and Inference", arXiv:1912.02762 (section 2.3).
    Rezende and Mohamed (2015), "Variational Inference with Normalizing Flows",
    arXiv:1505.05770 (section 6.1: the annealed reverse KL).
    van den Oord et al. (2018), "Parallel WaveNet: Fast High-Fidelity Speech Synthesis",
    arXiv:1711.10433 (probability density distillation).
    Krause and Shih (2021), "CaloFlow II: Even Faster and Still Accurate Generation of
    Calorimeter Showers with Normalizing Flows", arXiv:2110.11377 (an IAF student regressed
    on a MAF teacher in data and latent space).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .core import PushforwardError, check_context, check_positive_int, shape_str, sum_event
from .distributions import Flow

__all__ = ["nll", "reverse_kl", "distillation_kl", "distillation_mse"]


def nll(flow: Flow, x: Tensor, context: Tensor | None = None) -> Tensor:
    r"""Mean negative log-likelihood of ``x`` under the flow (the maximum-likelihood loss).

    .. math::
        \mathcal L(\theta) = -\frac1N \sum_{n=1}^N \log q_\theta(x_n)
        = \mathrm{KL}(\hat p_\text{data} \,\|\, q_\theta) + H(\hat p_\text{data}),

    so minimising it minimises the forward KL from the (empirical) data distribution.

    Args:
        flow: the model :math:`q_\theta`.
        x: data of shape ``(*batch, *flow.event_shape)``.
        context: conditioning of shape ``(*batch, context_features)`` for a conditional flow.

    Returns:
        A scalar tensor, differentiable in the flow's parameters.

    Example:
        >>> import torch
        >>> from pushforward.distributions import Flow, StandardNormal
        >>> from pushforward.transforms.linear import ElementwiseAffine
        >>> flow = Flow(StandardNormal(2), ElementwiseAffine(2))
        >>> nll(flow, torch.zeros(4, 2))  # identity start: -log N(0; 0, I) = log(2 pi)
        tensor(1.8379, grad_fn=<NegBackward0>)
    """
    return -flow.log_prob(x, context).mean()


def reverse_kl(
    flow: Flow,
    log_density: Callable[..., Tensor],
    n: int,
    context: Tensor | None = None,
    beta: float = 1.0,
) -> Tensor:
    r"""Monte Carlo reverse KL from the flow to an unnormalised target :math:`\tilde p`.

    .. math::
        \mathcal F_\beta(\theta) = \mathbb E_{x \sim q_\theta}
            \bigl[\log q_\theta(x) - \beta \log \tilde p(x)\bigr]
        \approx \frac1n \sum_{i=1}^n \bigl[\log q_\theta(x_i) - \beta \log \tilde p(x_i)\bigr],

    with :math:`x_i = f_\theta(z_i)`, :math:`z_i \sim q_0` drawn reparameterised by one
    ``flow.sample_and_log_prob`` pass, so the gradient flows through the samples. At
    :math:`\beta = 1` this is :math:`\mathrm{KL}(q_\theta \,\|\, p) - \log Z` where
    :math:`p = \tilde p / Z`: it is bounded below by :math:`-\log Z` and equals it exactly when
    :math:`q_\theta = p`. An inverse temperature :math:`\beta < 1` flattens the target (the
    annealing of Rezende and Mohamed, 2015).

    Args:
        flow: the model :math:`q_\theta`.
        log_density: :math:`\log \tilde p`, mapping samples ``(*batch, *event)`` to ``batch``
            (e.g. :func:`pushforward.data.potentials.potential`). For a conditional flow it is
            called as ``log_density(x, context)`` with the context broadcast to ``x``'s batch.
        n: number of Monte Carlo samples (per context row, for a conditional flow).
        context: conditioning of shape ``(*batch, context_features)``; samples then have shape
            ``(n, *batch, *event)``.
        beta: inverse temperature of the target, usually in ``(0, 1]``.

    Returns:
        A scalar tensor, differentiable in the flow's parameters.

    References:
        Rezende and Mohamed (2015), "Variational Inference with Normalizing Flows",
        arXiv:1505.05770 (equation 15, section 6.1).

    Example:
        >>> from pushforward.distributions import Flow, StandardNormal
        >>> from pushforward.transforms.linear import ElementwiseAffine
        >>> flow = Flow(StandardNormal(2), ElementwiseAffine(2))
        >>> log_p = lambda x: -0.5 * (x * x).sum(-1)  # N(0, I) up to log Z = log(2 pi)
        >>> round(reverse_kl(flow, log_p, 1000).item(), 4)  # q = p: exactly -log Z
        -1.8379
    """
    n = check_positive_int(n, "n")
    beta = float(beta)
    if not beta >= 0.0:
        raise PushforwardError(f"beta must be a non-negative number, got {beta!r}")
    x, log_q = flow.sample_and_log_prob((n,), context)
    if context is None:
        log_p = log_density(x)
    else:
        event = len(flow.event_shape)
        log_p = log_density(x, context.expand(*x.shape[: x.dim() - event], context.shape[-1]))
    if not isinstance(log_p, Tensor) or log_p.shape != log_q.shape:
        got = tuple(log_p.shape) if isinstance(log_p, Tensor) else type(log_p).__name__
        raise PushforwardError(
            f"log_density must return one value per sample, shape {tuple(log_q.shape)}; got {got}"
        )
    return (log_q - beta * log_p).mean()


def _check_pair(student: Flow, teacher: Flow) -> None:
    """Raise :class:`PushforwardError` unless ``student`` and ``teacher`` are flows over the same
    event shape with the same context size."""
    for name, f in (("student", student), ("teacher", teacher)):
        if not isinstance(f, Flow):
            raise PushforwardError(f"the {name} must be a Flow, got {type(f).__name__}")
    if tuple(student.event_shape) != tuple(teacher.event_shape):
        raise PushforwardError(
            f"student and teacher differ in event shape: {shape_str(student.event_shape)} vs. "
            f"{shape_str(teacher.event_shape)}"
        )
    if student.context_features != teacher.context_features:
        raise PushforwardError(
            f"student and teacher differ in context_features: {student.context_features} vs. "
            f"{teacher.context_features}"
        )


def distillation_kl(student: Flow, teacher: Flow, n: int, context: Tensor | None = None) -> Tensor:
    r"""Probability density distillation: Monte Carlo :math:`\mathrm{KL}(s \,\|\, t)` from the
    student to the teacher, from reparameterised student samples.

    .. math::
        \mathrm{KL}(s_\phi \,\|\, t) = \mathbb E_{x \sim s_\phi}
            \bigl[\log s_\phi(x) - \log t(x)\bigr]
        \approx \frac1n \sum_{i=1}^n \bigl[\log s_\phi(x_i) - \log t(x_i)\bigr],
        \qquad x_i = f_\phi(z_i),\ z_i \sim q_0.

    This is :func:`reverse_kl` with the teacher's log-density as the target; the teacher is
    normalised (:math:`\log Z = 0`), so the value estimates the KL itself: it is zero in
    expectation exactly when the student equals the teacher, and positive otherwise.

    Cost: one ``student.sample_and_log_prob`` (for an IAF student, one parallel pass giving
    both the sample and its density) and one ``teacher.log_prob`` (for a MAF teacher, one
    parallel pass). The gradient reaches the student through the samples and through
    :math:`\log s_\phi`; it also reaches the teacher's parameters unless they are frozen
    (:func:`~pushforward.train.distill` freezes them).

    Args:
        student: the flow :math:`s_\phi` being trained.
        teacher: the fixed flow :math:`t`, same event shape and context size.
        n: number of Monte Carlo samples (per context row, for conditional flows).
        context: conditioning of shape ``(*batch, context_features)``; samples then have shape
            ``(n, *batch, *event)`` and the teacher sees each sample's own context.

    Returns:
        A scalar tensor (nats), differentiable in the student's parameters.

    References:
        van den Oord et al. (2018), "Parallel WaveNet: Fast High-Fidelity Speech Synthesis",
        arXiv:1711.10433 (section 3: probability density distillation).

    Example:
        >>> from pushforward.distributions import Flow, StandardNormal
        >>> from pushforward.transforms.linear import ElementwiseAffine
        >>> teacher = Flow(StandardNormal(2), ElementwiseAffine(2))
        >>> student = Flow(StandardNormal(2), ElementwiseAffine(2))
        >>> distillation_kl(student, teacher, 100).abs().item() < 1e-6  # equal flows: KL = 0
        True
    """
    _check_pair(student, teacher)

    def teacher_log_prob(x: Tensor, c: Tensor | None = None) -> Tensor:
        # Flow.log_prob without its input check: a non-finite student sample gives a
        # non-finite loss (which a training loop stops on), not an exception
        z, ladj = teacher.transform.inverse(x, c)
        return teacher.base.log_prob(z, c) + ladj

    return reverse_kl(student, teacher_log_prob, n, context)


def distillation_mse(student: Flow, teacher: Flow, n: int, context: Tensor | None = None) -> Tensor:
    r"""The teacher-student loss of the lecture notes: squared errors of the student's map on
    the teacher's pairs :math:`(z, x)`, in data space and in latent space.

    .. math::
        \mathcal L(\phi) = \frac1n \sum_{i=1}^n
            \|x_i - x'_i\|^2 + \|z_i - z'_i\|^2, \qquad
        z_i \sim q_0,\quad x_i = f_t(z_i),\quad x'_i = f_\phi(z_i),\quad
        z'_i = f_t^{-1}(x'_i),

    with :math:`f_t` the teacher's map and :math:`f_\phi` the student's (both base to data) and
    :math:`\|\cdot\|^2` summed over the event. :math:`(z_i, x_i)` is the teacher's pair;
    :math:`x'` is where the student sends the same :math:`z`, and :math:`z'` is the latent the
    teacher gives the student's output. Both terms vanish exactly when
    :math:`f_\phi = f_t` on the samples; the data term measures the error in data units, the
    latent term in the teacher's latent units (so it weighs the regions where the teacher
    contracts).

    Cost of each term (MAF teacher, IAF student): the pairs take one ``teacher.transform``
    forward (sequential in :math:`d` for a MAF, run without gradient) and a base draw;
    :math:`x'` is one student forward (one parallel pass for an IAF, with gradient) and
    serves both terms; :math:`z'` is one teacher inverse (one parallel pass for a MAF, the
    gradient flowing through it to :math:`x'`). No term needs the student's sequential
    inverse: the alternative :math:`z' = f_\phi^{-1}(x)` would backpropagate through
    :math:`d` sequential passes of the IAF. The teacher's parameters also get gradients
    unless they are frozen (:func:`~pushforward.train.distill` freezes them).

    The loss matches maps, not densities, so it distils the teacher's density only when the
    student's base is the teacher's: :math:`z` is drawn from ``teacher.base`` and the
    student's base is not used (see :func:`~pushforward.train.distill`, which checks it).

    Args:
        student: the flow being trained (its ``transform`` is :math:`f_\phi`).
        teacher: the fixed flow (its ``transform`` is :math:`f_t`), same event shape and
            context size.
        n: number of pairs (per context row, for conditional flows).
        context: conditioning of shape ``(*batch, context_features)``; pairs then have shape
            ``(n, *batch, *event)``, each with its own context row.

    Returns:
        A scalar tensor, differentiable in the student's parameters.

    References:
        Krause and Shih (2021), "CaloFlow II: Even Faster and Still Accurate Generation of
        Calorimeter Showers with Normalizing Flows", arXiv:2110.11377 (the teacher-student
        training of an IAF from a MAF).

    Example:
        >>> from pushforward.distributions import Flow, StandardNormal
        >>> from pushforward.transforms.linear import ElementwiseAffine
        >>> teacher = Flow(StandardNormal(2), ElementwiseAffine(2))
        >>> _ = teacher.transform.params.params["shift"].data.fill_(1.0)  # x = z + 1
        >>> student = Flow(StandardNormal(2), ElementwiseAffine(2))  # x' = z
        >>> distillation_mse(student, teacher, 10).item()  # |x - x'|^2 + |z - z'|^2 = 2 + 2
        4.0
    """
    _check_pair(student, teacher)
    return _kl_and_mse(student, teacher, n, context)[1]


def _kl_and_mse(
    student: Flow, teacher: Flow, n: int, context: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    r""":func:`distillation_kl` and :func:`distillation_mse` from the same passes: one teacher
    pair :math:`(z, x)`, one student forward :math:`x' = f_\phi(z)` and one teacher inverse
    :math:`z' = f_t^{-1}(x')`, whose log-determinants also give
    :math:`\log s_\phi(x') - \log t(x')`. :math:`z` comes from the teacher's base, so the KL
    part estimates :math:`\mathrm{KL}(s_\phi \| t)` only when the student's base is the
    teacher's (the precondition of the MSE anyway)."""
    n = check_positive_int(n, "n")
    if context is not None and (not isinstance(context, Tensor) or context.dim() < 1):
        got = shape_str(context.shape) if isinstance(context, Tensor) else type(context).__name__
        raise PushforwardError(
            f"context: expected shape {shape_str(('batch', teacher.context_features))}, got {got}"
        )
    batch = (n, *(() if context is None else context.shape[:-1]))
    c = check_context(context, teacher.context_features, batch)
    event = len(teacher.event_shape)
    with torch.no_grad():
        z = teacher.base.rsample(batch, c)
        x = teacher.transform(z, c)[0]
    x_student, ladj_student = student.transform(z, c)
    z_teacher, ladj_teacher = teacher.transform.inverse(x_student, c)
    log_s = student.base.log_prob(z, c) - ladj_student
    log_t = teacher.base.log_prob(z_teacher, c) + ladj_teacher
    data_term = sum_event((x - x_student) ** 2, event)
    latent_term = sum_event((z - z_teacher) ** 2, event)
    return (log_s - log_t).mean(), (data_term + latent_term).mean()
