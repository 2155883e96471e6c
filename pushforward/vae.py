r"""Variational autoencoders with amortized flow posteriors.

The encoder maps an image :math:`x` to a context vector :math:`h(x)`; the approximate posterior
:math:`q_\phi(z \mid x)` is a registered flow **conditioned on** :math:`h(x)`: its diagonal
Gaussian base takes :math:`\mu, \log\sigma` from :math:`h`, and every flow layer takes its
parameters from :math:`h` (planar :math:`u, w, b`; radial :math:`z_0, \alpha, \beta`; Sylvester
:math:`Q, R, \tilde R, b`; Householder vectors :math:`v_t`; the context input of IAF's MADE;
ccLinIAF's mixture weights and matrices), all through the one mechanism of the core contract,
:class:`~pushforward.core.Parameters` (a transform whose parameters are a network of the
context). Nothing here is specific to one family: the posterior is
``flows.build(posterior, latent, context_features=context, base="diag-normal", ...)``.

With :math:`z_0 \sim q_0(\cdot \mid x)` and :math:`z_K = f_K \circ \dots \circ f_1(z_0)`,

.. math::
    \log q_K(z_K \mid x) = \log q_0(z_0 \mid x)
        - \sum_{k=1}^K \log\Bigl|\det \frac{\partial f_k}{\partial z_{k-1}}\Bigr|,

and the evidence lower bound (ELBO), with the KL weight :math:`\beta` of the warm-up,

.. math::
    \mathcal L_\beta(x) = \mathbb E_{q_K(z \mid x)}\bigl[\log p_\theta(x \mid z)
        - \beta\,(\log q_K(z \mid x) - \log p(z))\bigr], \qquad p(z) = \mathcal N(0, I),

is estimated from reparameterised samples drawn in one forward pass
(:meth:`~pushforward.distributions.Flow.sample_and_log_prob`); the log-determinants are exact,
so the estimate has no bias beyond Monte Carlo sampling of :math:`z_0`. The decoder is a
Bernoulli over pixels, :math:`\log p_\theta(x \mid z) = \sum_i x_i \log \pi_i +
(1 - x_i) \log(1 - \pi_i)`, :math:`\pi = \sigma(\mathrm{logits}(z))`, for binary images.

The importance-weighted bound (Burda et al. 2016) with :math:`K` samples,

.. math::
    \mathcal L_K(x) = \mathbb E\Bigl[\log \frac1K \sum_{k=1}^K
        \frac{p_\theta(x \mid z_k)\, p(z_k)}{q(z_k \mid x)}\Bigr], \qquad
    \mathcal L_1 = \mathcal L \le \mathcal L_K \le \mathcal L_{K+1} \le \log p_\theta(x),

estimates :math:`\log p_\theta(x)` (:math:`K = 1000` for reports); samples are drawn in chunks so
memory stays bounded for any :math:`K`.

Training (:func:`fit_vae`) uses dynamic binarization (a fresh Bernoulli draw of the pixel
intensities in :math:`[0, 1]` for every minibatch) and a linear KL warm-up of :math:`\beta` from
0 to 1 over the first epochs (Bowman et al. 2016; Sønderby et al. 2016), with early stopping on
the validation ELBO. Models are saved as ``model.safetensors`` plus ``config.json`` with
``"kind": "vae"`` (:func:`save_vae`, :func:`load_vae`).

References:
    Kingma and Welling (2014), "Auto-Encoding Variational Bayes", arXiv:1312.6114.
    Rezende and Mohamed (2015), "Variational Inference with Normalizing Flows",
    arXiv:1505.05770.
    Burda, Grosse and Salakhutdinov (2016), "Importance Weighted Autoencoders",
    arXiv:1509.00519.
    Bowman, Vilnis, Vinyals, Dai, Jozefowicz and Bengio (2016), "Generating Sentences from a
    Continuous Space", arXiv:1511.06349 (KL annealing).
    Sønderby, Raiko, Maaløe, Sønderby and Winther (2016), "Ladder Variational Autoencoders",
    arXiv:1602.02282 (warm-up).
    Kingma, Salimans, Jozefowicz, Chen, Sutskever and Welling (2016), "Improved Variational
    Inference with Inverse Autoregressive Flow", arXiv:1606.04934.
    Tomczak and Welling (2016), "Improving Variational Auto-Encoders using Householder Flow",
    arXiv:1611.09630.
    Tomczak and Welling (2017), "Improving Variational Auto-Encoders using Convex Combination
    Linear Inverse Autoregressive Flow", arXiv:1706.02326.
    van den Berg, Hasenclever, Tomczak and Welling (2018), "Sylvester Normalizing Flows for
    Variational Inference", arXiv:1803.05649.

Example:
    >>> vae = VAE((1, 8, 8), latent=2, posterior="planar", flow_length=2, hidden=(32,),
    ...           context=16)
    >>> x = torch.bernoulli(torch.full((5, 1, 8, 8), 0.3))
    >>> vae.elbo(x).shape, vae.iw_log_likelihood(x, k=20).shape
    (torch.Size([5]), torch.Size([5]))
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import (
    Identity,
    PushforwardError,
    check_finite,
    check_positive_int,
    shape_str,
    sum_event,
)
from .distributions import DiagNormal, Flow, FlowDistribution, StandardNormal

__all__ = [
    "VAE",
    "POSTERIORS",
    "NETWORKS",
    "KIND",
    "fit_vae",
    "evaluate_vae",
    "save_vae",
    "load_vae",
    "is_vae",
    "unit_pixels",
    "plot_reconstructions",
    "plot_samples",
    "plot_latent",
]

#: the posterior families of the papers (any registered vector flow is accepted)
POSTERIORS = (
    "gaussian",
    "planar",
    "radial",
    "householder",
    "iaf",
    "cclinIAF",
    "sylvester-orthogonal",
    "sylvester-householder",
    "sylvester-triangular",
)
#: encoder/decoder architectures
NETWORKS = ("mlp", "conv")
#: the value of ``"kind"`` in the ``config.json`` of a saved VAE
KIND = "vae"

_ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}


# ---------------------------------------------------------------------------------------------
# option checks


def _shape(data_shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(data_shape, bool):
        raise PushforwardError(f"data_shape must be a tuple of positive integers, got {data_shape}")
    if isinstance(data_shape, int):
        data_shape = (data_shape,)
    try:
        shape = tuple(int(s) for s in data_shape)
    except (TypeError, ValueError):
        raise PushforwardError(
            f"data_shape must be a tuple of positive integers, got {data_shape!r}"
        ) from None
    if not 1 <= len(shape) <= 3 or any(s < 1 for s in shape) or list(shape) != list(data_shape):
        raise PushforwardError(
            f"data_shape must be 1 to 3 positive integers (features, or channels, height, "
            f"width), got {data_shape!r}"
        )
    return shape


def _widths(hidden: Sequence[int], name: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(h) for h in hidden)
    except (TypeError, ValueError):
        raise PushforwardError(
            f"{name} must be a sequence of positive integers, got {hidden!r}"
        ) from None
    if any(w < 1 for w in widths) or list(widths) != list(hidden):
        raise PushforwardError(f"{name} must be positive integers, got {hidden!r}")
    return widths


def _number(value: Any, name: str, low: float = 0.0, allow_low: bool = True) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise PushforwardError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < low or (v == low and not allow_low):
        bound = f">= {low:g}" if allow_low else f"> {low:g}"
        raise PushforwardError(f"{name} must be a finite number {bound}, got {value!r}")
    return v


# ---------------------------------------------------------------------------------------------
# networks


def _mlp(widths: Sequence[int], activation: str, last_activation: bool) -> nn.Sequential:
    act = _ACTIVATIONS[activation]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if last_activation or i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _conv_encoder(shape, channels, context, activation) -> nn.Sequential:
    act = _ACTIVATIONS[activation]
    c, h, w = shape
    layers: list[nn.Module] = []
    for ch in channels:
        layers += [nn.Conv2d(c, ch, 4, stride=2, padding=1), act()]
        c, h, w = ch, h // 2, w // 2
    layers += [nn.Flatten(), nn.Linear(c * h * w, context), act()]
    return nn.Sequential(*layers)


def _conv_decoder(shape, channels, context, latent, activation) -> nn.Sequential:
    act = _ACTIVATIONS[activation]
    c0, h, w = shape
    s = 2 ** len(channels)
    top = channels[-1]
    layers: list[nn.Module] = [
        nn.Linear(latent, context),
        act(),
        nn.Linear(context, top * (h // s) * (w // s)),
        act(),
        nn.Unflatten(1, (top, h // s, w // s)),
    ]
    outs = [*reversed(channels[:-1]), c0]
    c = top
    for i, ch in enumerate(outs):
        layers.append(nn.ConvTranspose2d(c, ch, 4, stride=2, padding=1))
        if i < len(outs) - 1:
            layers.append(act())
        c = ch
    return nn.Sequential(*layers)


def _gaussian_posterior(latent: int, context: int) -> Flow:
    """The plain amortized diagonal Gaussian: the identity over a conditional DiagNormal."""
    return Flow(DiagNormal(latent, context), Identity(), context)


def _flow_posterior(
    name: str, latent: int, context: int, flow_length: int | None, options: dict[str, Any]
) -> Flow:
    from . import flows

    recipe = flows.describe(name)
    if recipe.image:
        raise PushforwardError(
            f"posterior {name!r} is an image flow; a VAE posterior is a flow on the latent "
            f"vector: choose from {', '.join(POSTERIORS)} (or another vector flow)"
        )
    allowed = recipe.options
    opts = dict(options)
    if flow_length is not None:
        if "layers" not in allowed:
            raise PushforwardError(
                f"posterior {name!r} has no flow length (no 'layers' option); leave "
                f"flow_length unset (its options: {', '.join(allowed) or 'none'})"
            )
        if "layers" in opts:
            raise PushforwardError(
                "give the flow length once: flow_length or flow_options['layers']"
            )
        opts["layers"] = check_positive_int(flow_length, "flow_length")
    if "base" in allowed:
        opts.setdefault("base", "diag-normal")
    return flows.build(name, latent, context, **opts)


# ---------------------------------------------------------------------------------------------
# the model


class VAE(nn.Module):
    r"""A VAE with a Bernoulli decoder and an amortized flow posterior.

    .. math::
        h = \mathrm{enc}(x), \qquad z \sim q(z \mid x) = \text{flow}(\cdot\,;\ \text{context}=h),
        \qquad x \mid z \sim \mathrm{Bernoulli}\bigl(\sigma(\mathrm{dec}(z))\bigr),
        \qquad p(z) = \mathcal N(0, I).

    Encoder (``network="mlp"``): ``D -> hidden[0] -> ... -> hidden[-1] -> context``, every layer
    followed by the activation, so :math:`h` is the last hidden layer, as in the papers; the
    decoder mirrors it, ``latent -> context -> hidden[-1] -> ... -> hidden[0] -> D`` logits. With
    ``network="conv"`` the ``hidden`` entries are the channels of stride-2 4x4 convolutions
    (height and width must be divisible by :math:`2^{\text{len(hidden)}}`), then a linear
    layer to ``context``; the decoder mirrors it with transposed convolutions.

    Posterior: ``"gaussian"`` is a conditional :class:`~pushforward.distributions.DiagNormal`
    (the plain VAE; a :class:`~pushforward.distributions.Flow` with the
    :class:`~pushforward.core.Identity` transform); any other name is a registered vector flow
    built by ``flows.build(posterior, latent, context_features=context, layers=flow_length,
    base="diag-normal", **flow_options)`` (``base`` where the recipe has it; ``layers`` only
    when ``flow_length`` is given, else the recipe's default), so its base and every layer are
    networks of :math:`h`. ``flow_options`` passes recipe options such as ``hidden`` (the
    context networks' widths; the planar, radial and Householder recipes and the diagonal
    Gaussian base take none and use (64, 64)), ``columns``, ``reflections`` or
    ``components``. Many draws per example share one evaluation of those networks
    (:meth:`sample_posterior`).

    Args:
        data_shape: shape of one example, ``(C, H, W)`` for images or ``(D,)``.
        latent: dimension of :math:`z`.
        posterior: ``"gaussian"`` or a registered vector flow (see :data:`POSTERIORS`).
        flow_length: number of flow layers (the recipe's ``layers``); ``None``: its default.
        hidden: encoder widths (MLP) or channels (conv) before the context layer.
        context: size of :math:`h`, the context of the posterior.
        activation: ``"elu"``, ``"relu"``, ``"tanh"``, ``"gelu"`` or ``"silu"``.
        network: ``"mlp"`` or ``"conv"``.
        flow_options: further options of the posterior's recipe.

    Example:
        >>> vae = VAE(64, latent=2, posterior="iaf", flow_length=1, hidden=(16,), context=8,
        ...           flow_options={"hidden": (8,)})
        >>> vae.sample(3).shape
        torch.Size([3, 64])
    """

    def __init__(
        self,
        data_shape: int | Sequence[int],
        latent: int = 32,
        posterior: str = "gaussian",
        flow_length: int | None = None,
        hidden: Sequence[int] = (300,),
        context: int = 300,
        activation: str = "elu",
        network: str = "mlp",
        flow_options: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.data_shape = _shape(data_shape)
        self.latent = check_positive_int(latent, "latent")
        self.context = check_positive_int(context, "context")
        self.hidden = _widths(hidden, "hidden")
        if activation not in _ACTIVATIONS:
            raise PushforwardError(
                f"unknown activation {activation!r}; choose from: {', '.join(_ACTIVATIONS)}"
            )
        if network not in NETWORKS:
            raise PushforwardError(f"unknown network {network!r}; choose from: mlp, conv")
        if not isinstance(posterior, str):
            raise PushforwardError(f"posterior must be a name, got {posterior!r}")
        if flow_options is not None and not isinstance(flow_options, dict):
            raise PushforwardError(f"flow_options must be a dict, got {flow_options!r}")
        self.activation, self.network, self.posterior_name = activation, network, posterior
        self.flow_length = (
            None if flow_length is None else check_positive_int(flow_length, "flow_length")
        )
        self.flow_options = dict(flow_options or {})
        features = math.prod(self.data_shape)

        if network == "conv":
            if len(self.data_shape) != 3:
                raise PushforwardError(
                    f"network 'conv' needs images of shape (channels, height, width), got "
                    f"data_shape {shape_str(self.data_shape)}"
                )
            if not self.hidden:
                raise PushforwardError("network 'conv' needs at least one entry in hidden")
            s = 2 ** len(self.hidden)
            _, h, w = self.data_shape
            if h % s or w % s:
                raise PushforwardError(
                    f"network 'conv' halves height and width {len(self.hidden)} time(s): they "
                    f"must be divisible by {s}, got {h}x{w}; use fewer entries in hidden"
                )
            self.encoder = _conv_encoder(self.data_shape, self.hidden, self.context, activation)
            self.decoder = _conv_decoder(
                self.data_shape, self.hidden, self.context, self.latent, activation
            )
        else:
            widths = (features, *self.hidden, self.context)
            self.encoder = _mlp(widths, activation, last_activation=True)
            self.decoder = _mlp((self.latent, *reversed(widths)), activation, False)

        if posterior == "gaussian":
            if self.flow_length is not None or self.flow_options:
                raise PushforwardError(
                    "posterior 'gaussian' has no flow: flow_length and flow_options do not apply"
                )
            self.posterior = _gaussian_posterior(self.latent, self.context)
        else:
            self.posterior = _flow_posterior(
                posterior, self.latent, self.context, self.flow_length, self.flow_options
            )
        self.prior = StandardNormal(self.latent)

    # -- configuration ------------------------------------------------------------------------

    @property
    def options(self) -> dict[str, Any]:
        """The constructor's arguments (``VAE(**vae.options)`` builds the same architecture)."""
        return {
            "data_shape": list(self.data_shape),
            "latent": self.latent,
            "posterior": self.posterior_name,
            "flow_length": self.flow_length,
            "hidden": list(self.hidden),
            "context": self.context,
            "activation": self.activation,
            "network": self.network,
            "flow_options": {
                k: list(v) if isinstance(v, tuple) else v for k, v in self.flow_options.items()
            },
        }

    @property
    def event_shape(self) -> tuple[int, ...]:
        return self.data_shape

    def extra_repr(self) -> str:
        return (
            f"data_shape={self.data_shape}, latent={self.latent}, "
            f"posterior={self.posterior_name!r}, flow_length={self.flow_length}"
        )

    # -- checks -------------------------------------------------------------------------------

    def _check_x(self, x: Tensor, binary: bool = True) -> Tensor:
        if not isinstance(x, Tensor):
            raise PushforwardError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != len(self.data_shape) + 1 or tuple(x.shape[1:]) != self.data_shape:
            raise PushforwardError(
                f"x: expected shape {shape_str(('batch', *self.data_shape))}, "
                f"got {shape_str(x.shape)}"
            )
        check_finite(x, "x")
        if binary and not bool(((x == 0) | (x == 1)).all()):
            raise PushforwardError(
                "x must be binary (pixels 0 or 1) for the Bernoulli decoder; binarize "
                "intensities in [0, 1] first (torch.bernoulli; fit_vae does it every batch)"
            )
        anchor = next(self.parameters())
        return x.to(dtype=anchor.dtype, device=anchor.device)

    # -- networks -----------------------------------------------------------------------------

    def encode(self, x: Tensor) -> Tensor:
        """The context :math:`h(x)`, shape ``(batch, context)``."""
        return self._encode(self._check_x(x, binary=False))

    def _encode(self, x: Tensor) -> Tensor:
        return self.encoder(x.flatten(1) if self.network == "mlp" else x)

    def decode(self, z: Tensor) -> Tensor:
        """Bernoulli logits of :math:`p(x \\mid z)`, shape ``(*batch, *data_shape)``."""
        batch = z.shape[:-1]
        logits = self.decoder(z.reshape(-1, self.latent))
        return logits.reshape(*batch, *self.data_shape)

    def posterior_distribution(self, x: Tensor) -> FlowDistribution:
        """:math:`q(z \\mid x)` as a :class:`torch.distributions.Distribution` (batch shape
        ``(batch,)``, event shape ``(latent,)``)."""
        return self.posterior.distribution(context=self.encode(x))

    def _log_px(self, x: Tensor, logits: Tensor) -> Tensor:
        target = x.expand_as(logits)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return -sum_event(bce, len(self.data_shape))

    def sample_posterior(self, h: Tensor, samples: int) -> tuple[Tensor, Tensor]:
        """``samples`` draws :math:`z \\sim q(z \\mid x)` per context row ``h`` (``(batch,
        context)``) and their :math:`\\log q(z \\mid x)`: shapes ``(samples, batch, latent)``
        and ``(samples, batch)``, from one forward pass.

        For the posteriors of :data:`POSTERIORS` and more than one draw, the context enters as
        ``(1, batch, context)``: every context network (the base's :math:`\\mu, \\log\\sigma`,
        each layer's parameters, a Sylvester layer's orthogonalisation of :math:`Q`) runs once
        per example and its outputs broadcast over the draws, as the papers' encoders do,
        instead of once per draw (the same numbers, ``samples`` times less of that work: what
        makes :math:`K = 1000` importance sampling affordable). Any other flow gets the
        context expanded to every draw, through
        :meth:`~pushforward.distributions.Flow.sample_and_log_prob`.
        """
        samples = check_positive_int(samples, "samples")
        if not isinstance(h, Tensor) or h.dim() != 2 or h.shape[-1] != self.context:
            got = shape_str(h.shape) if isinstance(h, Tensor) else type(h).__name__
            raise PushforwardError(
                f"h: expected shape {shape_str(('batch', self.context))}, got {got}"
            )
        if samples > 1 and self.posterior_name in POSTERIORS:
            c = h.unsqueeze(0)
            z0 = self.posterior.base.rsample((samples, *h.shape[:-1]), c)
            log_q0 = self.posterior.base.log_prob(z0, c)
            z, ladj = self.posterior.transform(z0, c)
            return z, log_q0 - ladj
        return self.posterior.sample_and_log_prob((samples,), context=h)

    def _log_weights(self, x: Tensor, h: Tensor, samples: int) -> tuple[Tensor, Tensor]:
        """``(log p(x|z), log q(z|x) - log p(z))`` for ``samples`` draws, shape
        ``(samples, batch)``."""
        z, log_q = self.sample_posterior(h, samples)
        log_px = self._log_px(x, self.decode(z))
        return log_px, log_q - self.prior.log_prob(z)

    # -- bounds -------------------------------------------------------------------------------

    def elbo(self, x: Tensor, beta: float = 1.0, samples: int = 1) -> Tensor:
        r"""The ELBO of each example, estimated with ``samples`` reparameterised draws.

        .. math::
            \hat{\mathcal L}_\beta(x) = \frac1S \sum_{s=1}^S \log p(x \mid z_s)
                - \beta\,\bigl(\log q(z_s \mid x) - \log p(z_s)\bigr),
            \qquad z_s \sim q(\cdot \mid x).

        Args:
            x: binary images, shape ``(batch, *data_shape)``.
            beta: KL weight (1: the ELBO; below 1 during warm-up).
            samples: number of draws :math:`S` averaged per example.

        Returns:
            ``(batch,)`` nats, differentiable in every parameter.
        """
        samples = check_positive_int(samples, "samples")
        beta = _number(beta, "beta")
        x = self._check_x(x)
        log_px, kl = self._log_weights(x, self._encode(x), samples)
        return (log_px - beta * kl).mean(0)

    def bounds(self, x: Tensor, k: int = 1000, chunk: int = 100) -> tuple[Tensor, Tensor]:
        r"""The ELBO and the importance-weighted bound from the same ``k`` draws per example.

        With log-weights :math:`\log w_j = \log p(x \mid z_j) + \log p(z_j) - \log q(z_j
        \mid x)`, returns :math:`\frac1k \sum_j \log w_j` (the ELBO, averaged over :math:`k`
        draws) and :math:`\operatorname{logsumexp}_j \log w_j - \log k` (the IW estimate of
        :math:`\log p(x)`). The draws are made ``chunk`` at a time (a pass holds
        ``chunk * batch`` latent samples and decoded images); each chunk is reduced to its
        logsumexp and sum before the next, so memory does not grow with ``k``.

        Returns:
            ``(elbo, iw)``, each of shape ``(batch,)``.
        """
        k = check_positive_int(k, "k")
        chunk = check_positive_int(chunk, "chunk")
        x = self._check_x(x)
        h = self._encode(x)
        lse, total = [], None
        for start in range(0, k, chunk):
            log_px, kl = self._log_weights(x, h, min(chunk, k - start))
            log_w = log_px - kl
            lse.append(torch.logsumexp(log_w, 0))
            s = log_w.sum(0)
            total = s if total is None else total + s
        iw = torch.logsumexp(torch.stack(lse), 0) - math.log(k)
        return total / k, iw

    def iw_log_likelihood(self, x: Tensor, k: int = 1000, chunk: int = 100) -> Tensor:
        r"""The importance-weighted estimate of :math:`\log p(x)` with ``k`` samples,

        .. math::
            \log \frac1k \sum_{j=1}^k \frac{p(x \mid z_j)\, p(z_j)}{q(z_j \mid x)},
            \qquad z_j \sim q(\cdot \mid x),

        a stochastic lower bound whose expectation increases with ``k`` towards
        :math:`\log p(x)` (Burda et al. 2016). Drawn ``chunk`` samples at a time (see
        :meth:`bounds`).

        Returns:
            ``(batch,)`` nats.
        """
        return self.bounds(x, k, chunk)[1]

    def forward(self, x: Tensor) -> Tensor:
        """The single-sample ELBO of each example (see :meth:`elbo`)."""
        return self.elbo(x)

    # -- generation ---------------------------------------------------------------------------

    def sample(self, n: int, mean: bool = False) -> Tensor:
        """``n`` images :math:`x \\sim p(x \\mid z)`, :math:`z \\sim \\mathcal N(0, I)`: binary
        draws, or with ``mean=True`` the Bernoulli means :math:`\\sigma(\\mathrm{dec}(z))`."""
        n = check_positive_int(n, "n")
        with torch.no_grad():
            probs = torch.sigmoid(self.decode(self.prior.rsample((n,))))
            return probs if mean else torch.bernoulli(probs)

    def latent_sample(self, x: Tensor) -> Tensor:
        """One draw :math:`z \\sim q(z \\mid x)` per example, ``(batch, latent)``."""
        with torch.no_grad():
            return self.posterior.sample((), context=self.encode(x))

    def reconstruct(self, x: Tensor) -> Tensor:
        """The Bernoulli means :math:`\\sigma(\\mathrm{dec}(z))` at one :math:`z \\sim q(z
        \\mid x)` per example (shape of ``x``)."""
        with torch.no_grad():
            return torch.sigmoid(self.decode(self.latent_sample(x)))


# ---------------------------------------------------------------------------------------------
# data


def unit_pixels(x: Any, levels: int | None = None, name: str = "data") -> Tensor:
    """Images (or vectors) as float intensities in ``[0, 1]``, ready for binarization.

    Integer arrays hold ``levels`` intensity levels (default: 256 for ``uint8``, else
    ``max + 1``) and are divided by ``levels - 1``; floating arrays must already lie in
    ``[0, 1]`` and are returned as they are (as float32 tensors).

    Example:
        >>> unit_pixels(np.array([[0, 8, 16]]), levels=17)
        tensor([[0.0000, 0.5000, 1.0000]])
    """
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, Tensor) else x
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    if t.is_floating_point():
        check_finite(t, name)
        if t.numel() and (float(t.min()) < 0 or float(t.max()) > 1):
            raise PushforwardError(
                f"{name}: floating values must be intensities in [0, 1], got values in "
                f"[{float(t.min()):g}, {float(t.max()):g}]"
            )
        return t.float()
    if t.numel() and int(t.min()) < 0:
        raise PushforwardError(f"{name}: pixel values must be >= 0, got {int(t.min())}")
    if levels is None:
        levels = 256 if t.dtype == torch.uint8 else (int(t.max()) + 1 if t.numel() else 2)
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise PushforwardError(f"{name}: need at least 2 intensity levels, got {levels!r}")
    if t.numel() and int(t.max()) >= levels:
        raise PushforwardError(
            f"{name}: pixel value {int(t.max())} is outside 0..{levels - 1} ({levels} levels)"
        )
    return t.float() / (levels - 1)


def _rows(x: Any, model: VAE, name: str) -> Tensor:
    t = unit_pixels(x, name=name) if not isinstance(x, Tensor) or not x.is_floating_point() else x
    if t.dim() != len(model.data_shape) + 1 or tuple(t.shape[1:]) != model.data_shape:
        raise PushforwardError(
            f"{name}: expected shape {shape_str(('rows', *model.data_shape))}, "
            f"got {shape_str(t.shape)}"
        )
    if len(t) < 1:
        raise PushforwardError(f"{name} has no rows")
    check_finite(t, name)
    if float(t.min()) < 0 or float(t.max()) > 1:
        raise PushforwardError(f"{name}: values must be intensities in [0, 1]")
    return t


# ---------------------------------------------------------------------------------------------
# training


def _beta(step: int, warmup_steps: float) -> float:
    """KL weight after ``step`` (0-based) optimiser steps: :math:`\\min(1, (t + 1) / T)`."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


def _mean_elbo(model: VAE, x: Tensor, seed: int, batch_size: int = 1000) -> float:
    """Mean single-sample ELBO of binary rows ``x`` (eval mode, no grad, seeded draws)."""
    from .train import _seeded

    anchor = next(model.parameters())
    total = 0.0
    with _seeded(seed, anchor.device), torch.no_grad():
        for i in range(0, len(x), batch_size):
            total += model.elbo(x[i : i + batch_size]).double().sum().item()
    return total / len(x)


def fit_vae(
    model: VAE,
    train: Tensor | np.ndarray,
    valid: Tensor | np.ndarray | None = None,
    *,
    epochs: int = 100,
    max_time: float | None = None,
    warmup: float = 10.0,
    lr: float = 1e-3,
    batch_size: int = 100,
    patience: int = 10,
    clip: float | None = None,
    binarize: bool = True,
    valid_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    callback: Callable[[int, Any], None] | None = None,
) -> Any:
    r"""Fit a VAE by maximising the ELBO (minibatch Adam, KL warm-up, early stopping).

    Each step minimises the mean negative single-sample :math:`\hat{\mathcal L}_{\beta_t}` over
    a minibatch, with the KL weight rising linearly over the first ``warmup`` epochs,

    .. math:: \beta_t = \min\Bigl(1, \frac{t + 1}{\texttt{warmup} \cdot
        \texttt{steps\_per\_epoch}}\Bigr),

    (per step; ``warmup=0``: :math:`\beta = 1` throughout). With ``binarize=True`` (dynamic
    binarization) every minibatch is a fresh Bernoulli draw of the intensities in
    :math:`[0, 1]`; the validation rows are binarized once (seeded), so epochs compare on the
    same data. After every epoch the mean validation ELBO (:math:`\beta = 1`, one seeded draw
    per example, eval mode) is computed; the best epoch's weights are kept and restored at the
    end, and training stops after ``patience`` epochs without improvement once the warm-up is
    over. A minibatch whose loss is not finite or a spike far above the running mean is not
    stepped on (:class:`~pushforward.train.SpikeGuard`, as in
    :func:`~pushforward.train.fit`; counted in ``History.skipped``); 50 such minibatches in a
    row, or a non-finite validation ELBO, stop the run (``stopped="non-finite"``), restore the
    best weights and warn. Everything random comes from ``seed``; torch's global
    RNG state is left as it was.

    Args:
        model: the :class:`VAE` (trained in place, left in eval mode).
        train: intensities in ``[0, 1]`` (or integer images, scaled by :func:`unit_pixels`),
            shape ``(rows, *data_shape)``.
        valid: validation rows; ``None`` splits ``valid_fraction`` of ``train`` off (seeded).
        epochs: maximum number of passes.
        max_time: wall-clock budget in seconds (``None``: none).
        warmup: epochs of linear KL warm-up (may be fractional; 0: none).
        lr: Adam's learning rate (constant).
        batch_size: rows per step.
        patience: epochs without a better validation ELBO (after warm-up) before stopping.
        clip: maximum gradient norm (``None``: no clipping).
        binarize: dynamic binarization; ``False`` needs binary rows already.
        valid_fraction: fraction of ``train`` held out when ``valid`` is ``None``.
        seed: the seed of every random choice.
        progress: show a tqdm bar on stderr.
        callback: called as ``callback(epoch, history)`` after every epoch.

    Returns:
        A :class:`~pushforward.train.History`: ``train_loss`` holds the mean
        :math:`-\hat{\mathcal L}_{\beta}` per epoch, ``valid_log_likelihood`` the mean
        validation ELBO per epoch (a lower bound on the log-likelihood), ``best_epoch`` /
        ``best_valid_log_likelihood`` the epoch kept.

    Example:
        >>> vae = VAE((1, 8, 8), latent=2, hidden=(32,), context=16)
        >>> data = torch.rand(200, 1, 8, 8)
        >>> history = fit_vae(vae, data, epochs=2, warmup=1, progress=False)
        >>> history.epochs, history.stopped
        (2, 'max-epochs')
    """
    from .train import (
        CHECK_EVERY,
        History,
        SpikeGuard,
        _adam,
        _guarded,
        _progress,
        _seeded,
        _snapshot,
        _warn_non_finite,
    )

    if not isinstance(model, VAE):
        raise PushforwardError(f"fit_vae needs a VAE, got {type(model).__name__}")
    epochs = check_positive_int(epochs, "epochs")
    batch_size = check_positive_int(batch_size, "batch_size")
    patience = check_positive_int(patience, "patience")
    warmup = _number(warmup, "warmup")
    lr = _number(lr, "lr", allow_low=False)
    clip = None if clip is None else _number(clip, "clip", allow_low=False)
    max_time = None if max_time is None else _number(max_time, "max_time", allow_low=False)
    train = _rows(train, model, "train")
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = params[0]
    dtype, device = anchor.dtype, anchor.device
    start = time.perf_counter()
    history = History()
    with _seeded(int(seed), device):
        generator = torch.Generator().manual_seed(int(seed))
        if valid is None:
            fraction = _number(valid_fraction, "valid_fraction", allow_low=False)
            if fraction >= 1:
                raise PushforwardError(f"valid_fraction must be below 1, got {valid_fraction!r}")
            n_valid = max(1, round(fraction * len(train)))
            if len(train) - n_valid < 1:
                raise PushforwardError(
                    f"train has {len(train)} row(s): too few to split off a validation set"
                )
            order = torch.randperm(len(train), generator=generator)
            valid, train = train[order[:n_valid]], train[order[n_valid:]]
        else:
            valid = _rows(valid, model, "valid")
        train = train.to(device=device, dtype=dtype)
        valid = valid.to(device=device, dtype=dtype)
        if binarize:
            valid = torch.bernoulli(valid.cpu(), generator=generator).to(device)
        elif not bool(((train == 0) | (train == 1)).all() & ((valid == 0) | (valid == 1)).all()):
            raise PushforwardError("binarize=False needs binary rows (0 or 1); pass binarize=True")
        batch_size = min(batch_size, len(train))
        per_epoch = max(1, len(train) // batch_size)
        warmup_steps = warmup * per_epoch
        optimizer = _adam(params, lr)
        best_state = _snapshot(model)
        bad_epochs, stop = 0, ""
        guard = SpikeGuard()
        bar = _progress(epochs * per_epoch, "fit-vae", progress)
        postfix: dict[str, str] = {}
        try:
            for epoch in range(1, epochs + 1):
                model.train()
                order = torch.randperm(len(train), generator=generator).to(device)
                epoch_sum = torch.zeros((), dtype=torch.float64, device=device)
                window_sum = torch.zeros((), dtype=torch.float64, device=device)
                window = done = 0
                for i in range(per_epoch):
                    batch = train[order[i * batch_size : (i + 1) * batch_size]]
                    if binarize:
                        batch = torch.bernoulli(batch)
                    beta = _beta(history.steps, warmup_steps)
                    loss = -model.elbo(batch, beta).mean()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    value = loss.detach().double()
                    # a non-finite or spiking loss: no step (fit's guard)
                    take = _guarded(guard, value.item(), history, f"epoch {epoch}")
                    if take is None:
                        stop = "non-finite"
                        break
                    if take:
                        if clip is not None:
                            nn.utils.clip_grad_norm_(params, clip)
                        optimizer.step()
                        history.steps += 1
                        done += 1
                        epoch_sum += value
                        window_sum += value
                        window += 1
                    bar.update(1)
                    out_of_time = max_time is not None and time.perf_counter() - start > max_time
                    if window and (window == CHECK_EVERY or i == per_epoch - 1 or out_of_time):
                        mean = window_sum.item() / window
                        postfix["-elbo"] = f"{mean:.3f}"
                        postfix["beta"] = f"{beta:.2f}"
                        bar.set_postfix(postfix, refresh=False)
                        window_sum.zero_()
                        window = 0
                    if out_of_time:
                        stop = "max-time"
                        break
                history.epochs = epoch
                if stop == "non-finite":
                    history.train_loss.append(math.nan)
                    break
                # an epoch whose every batch was skipped has no training loss
                history.train_loss.append(epoch_sum.item() / done if done else math.nan)
                model.eval()
                value = _mean_elbo(model, valid, int(seed) + 1)
                history.valid_log_likelihood.append(value)
                if not math.isfinite(value):
                    stop = "non-finite"
                    _warn_non_finite(f"epoch {epoch} (validation ELBO {value})", history)
                    break
                best = history.best_valid_log_likelihood
                if best is None or value > best:
                    history.best_valid_log_likelihood = value
                    history.best_epoch = epoch
                    best_state = _snapshot(model)
                    bad_epochs = 0
                elif history.steps >= warmup_steps:
                    bad_epochs += 1
                postfix["valid elbo"] = f"{value:.3f}"
                bar.set_postfix(postfix, refresh=False)
                if callback is not None:
                    history.seconds = time.perf_counter() - start
                    callback(epoch, history)
                if stop:
                    break
                if bad_epochs >= patience:
                    stop = "early-stopping"
                    break
        finally:
            bar.close()
            model.load_state_dict(best_state)
            model.eval()
    history.stopped = stop or "max-epochs"
    history.seconds = time.perf_counter() - start
    return history


# ---------------------------------------------------------------------------------------------
# evaluation


def evaluate_vae(
    model: VAE,
    x: Tensor | np.ndarray,
    *,
    iw_samples: int = 1000,
    chunk: int = 100,
    batch_size: int = 100,
    binarize: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    r"""Mean ELBO and importance-weighted log-likelihood of a data set, in nats per example.

    Each example gets ``iw_samples`` draws :math:`z_j \sim q(z \mid x)`; the ELBO is the mean
    of their log-weights and the log-likelihood their log-mean-exp (:meth:`VAE.bounds`), so
    both come from one set of passes. With ``binarize=True`` the intensities in ``[0, 1]``
    are binarized once by a seeded Bernoulli draw (the fixed binarization of a test set);
    already-binary rows are unchanged by it. Runs in eval mode without gradients, batched
    (``batch_size`` examples times ``chunk`` samples per pass), seeded (torch's global RNG
    state is left as it was).

    Returns:
        ``{"elbo", "log_likelihood", "elbo_stderr", "log_likelihood_stderr", "n",
        "iw_samples"}``: the means, their standard errors over the examples, the number of
        examples and :math:`K`.

    Example:
        >>> vae = VAE((1, 8, 8), latent=2, hidden=(16,), context=8)
        >>> r = evaluate_vae(vae, torch.rand(10, 1, 8, 8), iw_samples=50)
        >>> r["log_likelihood"] >= r["elbo"], r["n"]
        (True, 10)
    """
    from .train import _progress, _seeded

    if not isinstance(model, VAE):
        raise PushforwardError(f"evaluate_vae needs a VAE, got {type(model).__name__}")
    iw_samples = check_positive_int(iw_samples, "iw_samples")
    chunk = check_positive_int(chunk, "chunk")
    batch_size = check_positive_int(batch_size, "batch_size")
    x = _rows(x, model, "data")
    anchor = next(model.parameters())
    was_training = model.training
    model.eval()
    elbos, iws = [], []
    bar = _progress(len(x), "evaluate-vae", progress)
    try:
        with _seeded(int(seed), anchor.device), torch.no_grad():
            generator = torch.Generator().manual_seed(int(seed))
            if binarize:
                x = torch.bernoulli(x.float().cpu(), generator=generator)
            for i in range(0, len(x), batch_size):
                batch = x[i : i + batch_size].to(device=anchor.device, dtype=anchor.dtype)
                elbo, iw = model.bounds(batch, iw_samples, chunk)
                elbos.append(elbo.double().cpu())
                iws.append(iw.double().cpu())
                bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    e, w = torch.cat(elbos), torch.cat(iws)
    n = len(e)

    def stderr(t: Tensor) -> float:
        return float(t.std() / math.sqrt(n)) if n > 1 else math.nan

    return {
        "elbo": float(e.mean()),
        "log_likelihood": float(w.mean()),
        "elbo_stderr": stderr(e),
        "log_likelihood_stderr": stderr(w),
        "n": n,
        "iw_samples": iw_samples,
    }


# ---------------------------------------------------------------------------------------------
# saving and loading


def is_vae(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a model saved by :func:`save_vae` (its ``config.json`` has
    ``"kind": "vae"``); ``False`` for flows and for anything unreadable."""
    from .io import CONFIG_FILE, read_json

    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        config = read_json(path)
    except PushforwardError:
        return False
    return isinstance(config, dict) and config.get("kind") == KIND


def save_vae(
    directory: str | os.PathLike,
    model: VAE,
    extras: dict[str, Any] | None = None,
    *,
    force: bool = False,
) -> Path:
    """Save a VAE as ``model.safetensors`` (its ``state_dict``) and ``config.json``.

    The config holds the library's format fields, ``"kind": "vae"``, ``"options"`` (the
    constructor's arguments, :attr:`VAE.options`), ``weights_sha256`` (checked on loading) and
    the free ``extras`` (data source, seed, metrics...). Each file is written atomically
    (temporary file and rename), weights first.

    Example:
        >>> import tempfile
        >>> vae = VAE((1, 8, 8), latent=2, posterior="householder", hidden=(8,), context=4)
        >>> folder = save_vae(tempfile.mkdtemp(), vae, {"data": "digits"})
        >>> loaded, config = load_vae(folder)
        >>> config["kind"], config["options"]["posterior"], config["data"]
        ('vae', 'householder', 'digits')
    """
    import hashlib
    import json

    from .io import (
        CONFIG_FILE,
        FORMAT,
        FORMAT_VERSION,
        MODEL_FILE,
        _library_version,
        _state,
        check_save_directory,
        safetensors_bytes,
        write_atomic,
        write_json,
    )

    if not isinstance(model, VAE):
        raise PushforwardError(f"save_vae needs a VAE, got {type(model).__name__}")
    d = check_save_directory(directory, force)
    config: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": _library_version(),
        "kind": KIND,
        "options": model.options,
    }
    for key, value in (extras or {}).items():
        if key in config:
            raise PushforwardError(f"extras may not replace the config entry {key!r}")
        config[key] = value
    try:
        json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise PushforwardError(f"cannot write the VAE config as JSON: {e}") from None
    info = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": KIND}
    blob = safetensors_bytes(_state(model), info)
    config["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    d.mkdir(parents=True, exist_ok=True)
    write_atomic(d / MODEL_FILE, blob)
    write_json(d / CONFIG_FILE, config)
    return d


def load_vae(directory: str | os.PathLike) -> tuple[VAE, dict[str, Any]]:
    """Load a VAE saved by :func:`save_vae`: rebuilt from ``config.json``, given the weights of
    ``model.safetensors`` (checksum verified, every name and shape checked), in eval mode."""
    from .io import CONFIG_FILE, FORMAT, FORMAT_VERSION, load_weights, read_json

    d = Path(directory)
    if not d.is_dir():
        raise PushforwardError(f"model directory not found: {d}")
    path = d / CONFIG_FILE
    if not path.is_file():
        raise PushforwardError(f"{d} has no {CONFIG_FILE} (is it a VAE directory?)")
    config = read_json(path)
    if not isinstance(config, dict) or config.get("format", FORMAT) != FORMAT:
        raise PushforwardError(f"{path}: not a pushforward model config")
    if config.get("kind") != KIND:
        raise PushforwardError(
            f"{path}: not a VAE (kind {config.get('kind')!r}); load flows with io.load_model"
        )
    version = config.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version > FORMAT_VERSION:
        raise PushforwardError(
            f"{path}: model format version {version!r} is not one this pushforward reads "
            f"(up to {FORMAT_VERSION})"
        )
    options = config.get("options")
    if not isinstance(options, dict):
        raise PushforwardError(f"{path}: 'options' must be an object, got {options!r}")
    options = dict(options)
    if isinstance(options.get("flow_options"), dict):
        options["flow_options"] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in options["flow_options"].items()
        }
    try:
        with torch.random.fork_rng(devices=[]):  # building must not move the caller's RNG
            model = VAE(**options)
    except PushforwardError as e:
        raise PushforwardError(f"{path}: {e}") from None
    except TypeError as e:
        raise PushforwardError(f"{path}: invalid VAE options: {e}") from None
    return load_weights(model, d, config), config


# ---------------------------------------------------------------------------------------------
# pictures (matplotlib imported lazily, through plots' Agg figure helpers; no pyplot)


def _check_images(model: VAE, what: str) -> tuple[int, int, int]:
    shape = model.data_shape
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise PushforwardError(
            f"{what} draws images: the VAE's data shape must be (1 or 3, height, width), got "
            f"{shape_str(shape)}"
        )
    return shape  # type: ignore[return-value]


def _mosaic(images: Tensor, rows: int, cols: int) -> np.ndarray:
    """``(n, C, H, W)`` values in [0, 1] as one picture with one-pixel white gaps."""
    x = images.detach().double().cpu().clamp(0, 1).numpy()
    n, c, h, w = x.shape
    out = np.ones((rows * (h + 1) - 1, cols * (w + 1) - 1, c))
    for k in range(min(n, rows * cols)):
        i, j = divmod(k, cols)
        out[i * (h + 1) : i * (h + 1) + h, j * (w + 1) : j * (w + 1) + w] = x[k].transpose(1, 2, 0)
    return out[..., 0] if c == 1 else out


def _draw(ax: Any, picture: np.ndarray, title: str) -> None:
    if picture.ndim == 2:
        ax.imshow(picture, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(picture, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize="small")


class _Quiet:
    """Eval mode and a seeded, forked RNG for drawing; the model's mode restored after."""

    def __init__(self, model: VAE, seed: int):
        self.model, self.seed = model, seed

    def __enter__(self) -> None:
        self.was = self.model.training
        self.rng = torch.random.fork_rng(devices=[])
        self.rng.__enter__()
        torch.manual_seed(self.seed)
        self.model.eval()

    def __exit__(self, *exc: Any) -> None:
        self.model.train(self.was)
        self.rng.__exit__(*exc)


def plot_reconstructions(
    model: VAE, x: Tensor | np.ndarray, path: str | os.PathLike, *, n: int = 10, seed: int = 0
) -> Path:
    """Binary images (top row) and their reconstructions :math:`\\sigma(\\mathrm{dec}(z))`,
    :math:`z \\sim q(z \\mid x)` (bottom row), as a PNG; returns its path."""
    from .plots import _figure, _save

    _check_images(model, "plot_reconstructions")
    n = check_positive_int(n, "n")
    x = _rows(x, model, "x")[:n]
    with _Quiet(model, seed):
        x = torch.bernoulli(x.float())
        anchor = next(model.parameters())
        rec = model.reconstruct(x.to(anchor.dtype))
    fig, axes = _figure(1, 2, size=max(2.0, 0.6 * len(x)))
    fig.set_size_inches(max(3.0, 0.6 * len(x)), 1.6)
    _draw(axes[0, 0], _mosaic(x, 1, len(x)), "binarized data")
    _draw(axes[1, 0], _mosaic(rec, 1, len(x)), "reconstructions (Bernoulli means)")
    return _save(fig, path)


def plot_samples(
    model: VAE, path: str | os.PathLike, *, n: int = 64, mean: bool = True, seed: int = 0
) -> Path:
    """``n`` samples of the model, :math:`z \\sim \\mathcal N(0, I)`, drawn as Bernoulli means
    (``mean=True``) or binary draws, in a square grid; returns the PNG's path."""
    from .plots import _figure, _save

    _check_images(model, "plot_samples")
    n = check_positive_int(n, "n")
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    with _Quiet(model, seed):
        images = model.sample(n, mean=mean)
    fig, axes = _figure(1, 1, size=max(2.0, 0.5 * cols))
    _draw(axes[0, 0], _mosaic(images, rows, cols), "samples" + (" (means)" if mean else ""))
    return _save(fig, path)


def plot_latent(
    model: VAE,
    x: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    path: str | os.PathLike,
    *,
    seed: int = 0,
    max_points: int = 5000,
) -> Path:
    """A scatter of one draw :math:`z \\sim q(z \\mid x)` per example, coloured by label (for
    a 2-D latent space); returns the PNG's path."""
    from .plots import _figure, _save

    if model.latent != 2:
        raise PushforwardError(f"plot_latent needs a 2-D latent space, got latent={model.latent}")
    x = _rows(x, model, "x")
    labels = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels).reshape(-1)
    if len(labels) != len(x):
        raise PushforwardError(f"labels: expected {len(x)} labels, got {len(labels)}")
    max_points = check_positive_int(max_points, "max_points")
    x, labels = x[:max_points], labels[:max_points]
    anchor = next(model.parameters())
    with _Quiet(model, seed):
        z = model.latent_sample(torch.bernoulli(x.float()).to(anchor.dtype)).double().cpu().numpy()
    fig, axes = _figure(1, 1, size=5.0)
    ax = axes[0, 0]
    for value in np.unique(labels):
        pick = labels == value
        ax.scatter(z[pick, 0], z[pick, 1], s=4, alpha=0.7, label=str(value))
    ax.legend(markerscale=3, fontsize="small", loc="best", ncols=2)
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    ax.set_title("latent codes z ~ q(z|x)", fontsize="small")
    return _save(fig, path)
