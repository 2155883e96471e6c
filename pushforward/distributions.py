"""Base distributions and :class:`Flow`, the density a transform pushes a base forward to.

.. math:: \\log p(x) = \\log q(z) + \\log|\\det \\partial z / \\partial x|, \\qquad z = f^{-1}(x)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .core import (
    Parameters,
    PushforwardError,
    Transform,
    check_context,
    check_event,
    check_finite,
    check_positive_int,
    shape_str,
    sum_event,
)
from .nn.made import MADE

__all__ = [
    "Base",
    "StandardNormal",
    "DiagNormal",
    "Uniform",
    "GaussianMixture",
    "MADEMoG",
    "Flow",
    "FlowDistribution",
]

_LOG_2PI = math.log(2 * math.pi)
Shape = int | Sequence[int]


def _as_shape(shape: Shape) -> tuple[int, ...]:
    return (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)


def _batch_shape(shape: Shape, context: Tensor | None) -> tuple[int, ...]:
    """Sample batch shape: ``shape`` followed by the context's batch shape."""
    extra = tuple(context.shape[:-1]) if context is not None else ()
    return (*_as_shape(shape), *extra)


class Base(nn.Module):
    """A base density ``q(z)`` (optionally conditional) over ``event_shape``.

    Subclasses implement :meth:`log_prob` and :meth:`rsample`. A context reaching them already
    has the batch shape of the samples requested (``Flow`` broadcasts it).
    """

    def __init__(self, event_shape: Shape, context_features: int = 0):
        super().__init__()
        self.event_shape = _as_shape(event_shape)
        self.context_features = int(context_features)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @property
    def event_dim(self) -> int:
        return len(self.event_shape)

    def _like(self) -> dict:
        return {"dtype": self._anchor.dtype, "device": self._anchor.device}

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def rsample(self, shape: Sequence[int], context: Tensor | None = None) -> Tensor:
        """Samples of shape ``(*shape, *event_shape)``; ``shape`` is the full batch shape."""
        raise NotImplementedError


class StandardNormal(Base):
    """:math:`\\mathcal N(0, I)` over ``event_shape``.

    Example:
        >>> StandardNormal(2).log_prob(torch.zeros(1, 2))
        tensor([-1.8379])
    """

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        n = math.prod(self.event_shape)
        return -0.5 * sum_event(z * z, self.event_dim) - 0.5 * n * _LOG_2PI

    def rsample(self, shape: Sequence[int], context: Tensor | None = None) -> Tensor:
        return torch.randn(*shape, *self.event_shape, **self._like())


class DiagNormal(Base):
    """Learnable diagonal Gaussian :math:`\\mathcal N(\\mu, \\operatorname{diag}\\sigma^2)`; with
    ``context_features > 0``, :math:`\\mu` and :math:`\\log\\sigma` are a network of the context
    (the amortized Gaussian of a VAE encoder)."""

    def __init__(self, event_shape: Shape, context_features: int = 0, hidden=(64, 64)):
        super().__init__(event_shape, context_features)
        s = self.event_shape
        self.params = Parameters(
            {"loc": s, "log_scale": s}, {"loc": 0.0, "log_scale": 0.0}, context_features, hidden
        )

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        p = self.params(context)
        u = (z - p["loc"]) * torch.exp(-p["log_scale"])
        return sum_event(-0.5 * u * u - p["log_scale"] - 0.5 * _LOG_2PI, self.event_dim)

    def rsample(self, shape: Sequence[int], context: Tensor | None = None) -> Tensor:
        p = self.params(context)
        eps = torch.randn(*shape, *self.event_shape, **self._like())
        return p["loc"] + torch.exp(p["log_scale"]) * eps


class Uniform(Base):
    """Uniform on the box ``[low, high]`` (the base of piecewise maps on the unit interval)."""

    def __init__(self, event_shape: Shape, low: float | Tensor = 0.0, high: float | Tensor = 1.0):
        super().__init__(event_shape)
        low_t = torch.as_tensor(low, dtype=torch.get_default_dtype()).expand(self.event_shape)
        high_t = torch.as_tensor(high, dtype=torch.get_default_dtype()).expand(self.event_shape)
        if not bool((high_t > low_t).all()):
            raise PushforwardError("Uniform: every high must exceed its low")
        self.register_buffer("low", low_t.clone())
        self.register_buffer("high", high_t.clone())

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        inside = sum_event(((z >= self.low) & (z <= self.high)).to(z.dtype), self.event_dim)
        n = math.prod(self.event_shape)
        logvol = torch.log(self.high - self.low).sum()
        return torch.where(inside == n, -logvol, torch.full_like(inside, -math.inf))

    def rsample(self, shape: Sequence[int], context: Tensor | None = None) -> Tensor:
        u = torch.rand(*shape, *self.event_shape, **self._like())
        return self.low + (self.high - self.low) * u


class GaussianMixture(Base):
    """Learnable mixture of ``components`` diagonal Gaussians (vector events).

    .. math:: q(z) = \\sum_k \\pi_k \\mathcal N(z; \\mu_k, \\operatorname{diag}\\sigma_k^2)

    ``rsample`` is reparameterised within the chosen component; the component choice itself is
    discrete, so no gradient reaches the weights through samples (they learn through log_prob).
    """

    def __init__(
        self, features: int, components: int = 8, context_features: int = 0, hidden=(64, 64)
    ):
        super().__init__(features, context_features)
        if len(self.event_shape) != 1:
            raise PushforwardError("GaussianMixture is defined on vectors (batch, features)")
        k, d = int(components), self.event_shape[0]
        self.components = k
        self.params = Parameters(
            {"logits": (k,), "loc": (k, d), "log_scale": (k, d)},
            {"logits": 0.0, "loc": torch.randn(k, d), "log_scale": 0.0},
            context_features,
            hidden,
        )

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        p = self.params(context)
        u = (z.unsqueeze(-2) - p["loc"]) * torch.exp(-p["log_scale"])
        comp = (-0.5 * u * u - p["log_scale"] - 0.5 * _LOG_2PI).sum(-1)
        return torch.logsumexp(torch.log_softmax(p["logits"], -1) + comp, dim=-1)

    def rsample(self, shape: Sequence[int], context: Tensor | None = None) -> Tensor:
        p = self.params(context)
        logits = p["logits"].expand(*shape, self.components)
        idx = torch.distributions.Categorical(logits=logits).sample()
        d = self.event_shape[0]
        gather = idx[..., None, None].expand(*shape, 1, d)
        loc = p["loc"].expand(*shape, self.components, d).gather(-2, gather).squeeze(-2)
        ls = p["log_scale"].expand(*shape, self.components, d).gather(-2, gather).squeeze(-2)
        return loc + torch.exp(ls) * torch.randn(*shape, d, **self._like())


class MADEMoG(Base):
    r"""MADE with a mixture of Gaussians per conditional (MADE-MoG): an autoregressive density.

    .. math::
        q(z) = \prod_{i=1}^d \sum_{k=1}^K \pi_{ik}\,
        \mathcal N\bigl(z_i;\ \mu_{ik}, \sigma_{ik}^2\bigr), \qquad
        (\operatorname{logit}\pi_{i\cdot}, \mu_{i\cdot}, \log\sigma_{i\cdot})
        = \mathrm{MADE}(z_{<i}, c)

    A density model on its own (the MADE MoG baseline of Papamakarios et al. 2017) and the
    base of MAF MoG (a MAF whose base is a MADE MoG). :math:`\log\sigma` is softly bounded,
    :math:`\log\sigma = b\tanh(\tilde s / b)` with :math:`b = 7`, so no parameter value
    makes a component degenerate. Cost: :meth:`log_prob` is one pass of the MADE;
    :meth:`rsample` is sequential in :math:`d` through
    :meth:`MADE.autoregress <pushforward.nn.made.MADE.autoregress>` (about one pass of work).
    Samples are reparameterised within the chosen component only (the choice is discrete).

    Args:
        features: dimension :math:`d`.
        components: mixture components :math:`K` per conditional (10 in the MAF paper).
        context_features: size of the conditioning vector (0: unconditional).
        hidden: hidden widths of the MADE.
        order: autoregressive order, as for :class:`~pushforward.nn.made.MADE`.

    References:
        Germain, Gregor, Murray and Larochelle (2015), "MADE: Masked autoencoder for
        distribution estimation", arXiv:1502.03509.
        Papamakarios, Pavlakou and Murray (2017), "Masked autoregressive flow for density
        estimation", arXiv:1705.07057 (MADE MoG, MAF MoG).

    Example:
        >>> base = MADEMoG(3, components=4, hidden=(16, 16))
        >>> z = base.rsample((5,))
        >>> base.log_prob(z).shape
        torch.Size([5])
    """

    log_scale_bound = 7.0

    def __init__(
        self,
        features: int,
        components: int = 10,
        context_features: int = 0,
        hidden: Sequence[int] = (512, 512),
        order: str | Tensor = "natural",
        seed: int = 0,
    ):
        super().__init__(features, context_features)
        self.components = k = check_positive_int(components, "components")
        self.made = MADE(
            self.event_shape[0], hidden, 3 * k, context_features, order=order, seed=seed
        )
        with torch.no_grad():  # small weights; components spread over [-1, 1] to break symmetry
            self.made.output.weight.mul_(1e-2)
            bias = self.made.output.bias.view(-1, 3, k)
            bias[:, 0].zero_()
            bias[:, 1].copy_(torch.linspace(-1.0, 1.0, k) if k > 1 else torch.zeros(1))
            bias[:, 2].fill_(math.log(0.5) if k > 1 else 0.0)

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        k, b = self.components, self.log_scale_bound
        logits, loc, raw = params.unflatten(-1, (3, k)).unbind(-2)
        return torch.log_softmax(logits, -1), loc, b * torch.tanh(raw / b)

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        log_pi, loc, log_s = self._split(self.made(z, context))
        u = (z.unsqueeze(-1) - loc) * torch.exp(-log_s)
        comp = -0.5 * u * u - log_s - 0.5 * _LOG_2PI
        return torch.logsumexp(log_pi + comp, -1).sum(-1)

    def rsample(self, shape: Sequence[int], context: Tensor | None = None) -> Tensor:
        shape = tuple(shape)
        n, d = math.prod(shape), self.event_shape[0]
        c = None if context is None else context.reshape(n, -1)
        eps = torch.randn(n, d, **self._like())
        pick = torch.rand(n, d, **self._like())
        x = self.made.in_row_chunks(self._autoregress, eps, pick, c)
        return x.reshape(*shape, d)

    def _autoregress(self, eps: Tensor, pick: Tensor, c: Tensor | None) -> Tensor:
        def step(i: int, params: Tensor) -> Tensor:
            log_pi, loc, log_s = self._split(params)
            # inverse-CDF choice of the component from a uniform (no generator calls per step)
            cdf = torch.cumsum(log_pi.exp(), -1)
            idx = torch.searchsorted(cdf, pick[:, i : i + 1].contiguous()).clamp_max(
                self.components - 1
            )
            mu = loc.gather(-1, idx).squeeze(-1)
            sigma = log_s.gather(-1, idx).squeeze(-1).exp()
            return mu + sigma * eps[:, i]

        return self.made.autoregress(step, eps.shape[0], c)


class Flow(nn.Module):
    """The density of ``x = f(z)``, ``z ~ base``: a normalizing flow.

    Args:
        base: the base density (its ``event_shape`` is the flow's).
        transform: the map ``f`` from base space to data space.
        context_features: size of the conditioning vector (0: unconditional).

    Example:
        >>> from pushforward.transforms.linear import ElementwiseAffine
        >>> flow = Flow(StandardNormal(2), ElementwiseAffine(2))
        >>> flow.log_prob(torch.zeros(4, 2)).shape, flow.sample(3).shape
        (torch.Size([4]), torch.Size([3, 2]))
    """

    def __init__(self, base: Base, transform: Transform, context_features: int | None = None):
        super().__init__()
        self.base = base
        self.transform = transform
        if context_features is None:
            context_features = base.context_features
        self.context_features = int(context_features)

    @property
    def event_shape(self) -> tuple[int, ...]:
        return self.base.event_shape

    @property
    def features(self) -> int:
        return math.prod(self.event_shape)

    def _check_x(self, x: Tensor, context: Tensor | None, name: str = "x"):
        check_event(x, self.event_shape, name)
        check_finite(x, name)
        batch = tuple(x.shape[: x.dim() - len(self.event_shape)])
        return batch, check_context(context, self.context_features, batch)

    def _sample_context(self, shape: Shape, context: Tensor | None):
        if context is not None and (context.dim() < 1):
            raise PushforwardError(
                f"context: expected shape {shape_str(('batch', self.context_features))}, "
                f"got {shape_str(context.shape)}"
            )
        batch = _batch_shape(shape, context)
        return batch, check_context(context, self.context_features, batch)

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``log p(x)``, shape = batch shape of ``x``."""
        _, c = self._check_x(x, context)
        z, ladj = self.transform.inverse(x, c)
        return self.base.log_prob(z, c) + ladj

    def latent(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """The latent code ``z = f^{-1}(x)`` (contiguous, whatever layout the last transform
        gave)."""
        _, c = self._check_x(x, context)
        return self.transform.inverse(x, c)[0].contiguous()

    def rsample(self, shape: Shape = (), context: Tensor | None = None) -> Tensor:
        """Reparameterised samples of shape ``(*shape, *context_batch, *event_shape)``."""
        batch, c = self._sample_context(shape, context)
        if not batch:  # transforms need one batch dimension: draw one and drop it
            return self.rsample((1,))[0]
        z = self.base.rsample(batch, c)
        return self.transform(z, c)[0].contiguous()

    def sample(self, shape: Shape = (), context: Tensor | None = None) -> Tensor:
        """Samples without gradient; see :meth:`rsample`."""
        with torch.no_grad():
            return self.rsample(shape, context)

    def sample_and_log_prob(
        self, shape: Shape = (), context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Samples and their log-density from one forward pass (the fast path of an IAF)."""
        batch, c = self._sample_context(shape, context)
        if not batch:
            x, log_p = self.sample_and_log_prob((1,))
            return x[0], log_p[0]
        z = self.base.rsample(batch, c)
        log_q = self.base.log_prob(z, c)
        x, ladj = self.transform(z, c)
        return x.contiguous(), log_q - ladj

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.log_prob(x, context)

    def distribution(self, context: Tensor | None = None) -> FlowDistribution:
        """A genuine :class:`torch.distributions.Distribution` view of this flow."""
        return FlowDistribution(self, context)


class FlowDistribution(torch.distributions.Distribution):
    """``torch.distributions`` view of a :class:`Flow` (batch shape = the context's batch)."""

    has_rsample = True
    arg_constraints: dict = {}

    def __init__(self, flow: Flow, context: Tensor | None = None):
        self.flow = flow
        self.context = context
        batch = tuple(context.shape[:-1]) if context is not None else ()
        super().__init__(torch.Size(batch), torch.Size(flow.event_shape), validate_args=False)

    @property
    def support(self):
        return torch.distributions.constraints.real_vector

    def log_prob(self, value: Tensor) -> Tensor:
        return self.flow.log_prob(value, self.context)

    def rsample(self, sample_shape: Sequence[int] = ()) -> Tensor:
        return self.flow.rsample(tuple(sample_shape), self.context)

    def sample(self, sample_shape: Sequence[int] = ()) -> Tensor:
        return self.flow.sample(tuple(sample_shape), self.context)
