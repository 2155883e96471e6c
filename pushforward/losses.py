r"""Training objectives: forward KL to data (maximum likelihood) and reverse KL to an
unnormalised target density.

Both are pure functions of a :class:`~pushforward.distributions.Flow` and return a scalar
tensor to minimise.

* :func:`nll` -- the forward KL :math:`\mathrm{KL}(p_\text{data} \,\|\, q)` up to the (unknown)
  data entropy, estimated by the mean negative log-likelihood of a minibatch. It needs
  ``flow.log_prob``, i.e. the transform's ``inverse`` (cheap for MAF, coupling flows).
* :func:`reverse_kl` -- :math:`\mathrm{KL}(q \,\|\, p) - \log Z` for a target known up to its
  normaliser, :math:`p = \tilde p / Z`, estimated from reparameterised samples of the flow. It
  needs only the ``forward`` direction (cheap for IAF, planar, radial), through
  ``flow.sample_and_log_prob``.

References:
    Papamakarios, Nalisnick, Rezende, Mohamed and Lakshminarayanan (2021), "Normalizing Flows
    for Probabilistic Modeling and Inference", arXiv:1912.02762 (section 2.3).
    Rezende and Mohamed (2015), "Variational Inference with Normalizing Flows",
    arXiv:1505.05770 (section 6.1: the annealed reverse KL).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .core import PushforwardError, check_positive_int
from .distributions import Flow

__all__ = ["nll", "reverse_kl"]


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
