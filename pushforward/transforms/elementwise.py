r"""Elementwise flows: fixed and learnable scalar maps applied to every entry of the event.

The Jacobian of an elementwise map :math:`x_i = f(z_i)` is diagonal, so

.. math:: \log|\det \partial x / \partial z| = \sum_i \log|f'(z_i)|,

one :math:`O(1)` term per entry (:math:`O(K)` for :math:`K`-bin piecewise-linear maps).

The module holds the numerics as pure functions that other structures reuse
(:func:`piecewise_linear`, also a :class:`~pushforward.core.Transformer` for coupling and
autoregressive layers; :func:`log_sigmoid_derivative`, the stable softplus algebra of every
sigmoid-type map), and the transforms built on them: :class:`LeakyReLU`,
:class:`PiecewiseLinear`, and the sigmoid family :class:`Sigmoid`, :class:`Tanh` and
:class:`Logit`, which are one map :math:`x = (\sigma(k z) - b) / a` for three choices of
:math:`(k, a, b)`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from ..core import (
    Parameters,
    PushforwardError,
    Transform,
    Transformer,
    check_features,
    check_positive_int,
    shape_str,
    sum_event,
    vmapped,
)

__all__ = [
    "log_sigmoid_derivative",
    "piecewise_linear",
    "PiecewiseLinearTransformer",
    "PiecewiseLinear",
    "LeakyReLU",
    "Sigmoid",
    "Tanh",
    "Logit",
]


# ---------------------------------------------------------------------------------------------
# pure functions


def log_sigmoid_derivative(z: Tensor) -> Tensor:
    r"""Elementwise :math:`\log \sigma'(z)`, finite for every finite ``z``.

    .. math::
        \log \sigma'(z) = \log \sigma(z) + \log \sigma(-z)
        = -\operatorname{softplus}(-z) - \operatorname{softplus}(z)
        = -|z| - 2 \log\bigl(1 + e^{-|z|}\bigr)

    (the naive :math:`\log(\sigma(z)(1 - \sigma(z)))` is :math:`-\infty` once :math:`\sigma(z)`
    rounds to 1, from :math:`z \approx 17` in float32).

    Example:
        >>> log_sigmoid_derivative(torch.tensor([0.0, 1e4]))
        tensor([-1.3863e+00, -1.0000e+04])
    """
    a = z.abs()
    return -a - 2 * torch.log1p(torch.exp(-a))


def piecewise_linear(z: Tensor, logits: Tensor, inverse: bool = False) -> tuple[Tensor, Tensor]:
    r"""The monotone :math:`K`-bin piecewise-linear map of :math:`[0, 1]` onto itself.

    The input interval is cut into :math:`K` equal bins; output bin :math:`k` has width
    :math:`Q_k = \operatorname{softmax}(\text{logits})_k`. For :math:`z` in bin
    :math:`b = \lfloor K z \rfloor`,

    .. math::
        x = \sum_{k < b} Q_k + (K z - b)\, Q_b, \qquad
        \log \frac{\partial x}{\partial z} = \log K + \log Q_b
        = \log K + \operatorname{log\_softmax}(\text{logits})_b .

    The inverse finds the output bin by binary search on the knots
    :math:`c_b = \sum_{k < b} Q_k` (``torch.searchsorted``) and is exact:
    :math:`z = (b + (x - c_b) / Q_b) / K`. Both directions measure a bin by its two knots, so
    knots map exactly onto knots (0 and 1 are fixed points in floating point too) and the
    computed map is monotone.
    Values outside :math:`[0, 1]` pass through unchanged with log-derivative 0; since the map
    fixes 0 and 1, this extension is a continuous, increasing bijection of the real line and
    never produces NaN. Every real
    ``logits`` is valid; zero logits give the identity. Cost: :math:`O(K)` per entry in both
    directions (softmax and cumulative sum), plus :math:`O(\log K)` for the search.

    Args:
        z: inputs of shape ``(*batch, features)`` (any shape broadcasting with
            ``logits.shape[:-1]``).
        logits: unnormalised log bin widths, shape ``(*batch, features, K)``; leading
            dimensions broadcast.
        inverse: compute the inverse map instead.

    Returns:
        The output and the **elementwise** log-absolute-derivative of the direction computed,
        both of the broadcast shape.

    References:
        Müller, McWilliams, Rousselle, Gross and Novák (2019), "Neural importance sampling",
        ACM Transactions on Graphics, arXiv:1808.03856 (the piecewise-linear coupling transform).

    Example:
        >>> logits = torch.tensor([[0.0, 1.0, 2.0]])
        >>> x, lad = piecewise_linear(torch.tensor([[0.5]]), logits)
        >>> z, _ = piecewise_linear(x, logits, inverse=True)
        >>> bool(torch.allclose(z, torch.tensor([[0.5]])))
        True
    """
    bins = logits.shape[-1]
    shape = torch.broadcast_shapes(z.shape, logits.shape[:-1])
    z = z.expand(shape)
    log_q = torch.log_softmax(logits, dim=-1)  # at the parameters' shape, expanded lazily
    knots = torch.cat(  # c_0 = 0, ..., c_K = 1 exactly
        [
            torch.zeros_like(log_q[..., :1]),
            log_q[..., :-1].exp().cumsum(-1),
            torch.ones_like(log_q[..., :1]),
        ],
        dim=-1,
    )
    log_q, knots = log_q.expand(*shape, bins), knots.expand(*shape, bins + 1)
    inside = (z >= 0) & (z <= 1)
    u = torch.where(inside, z, torch.zeros_like(z))  # keeps every branch finite
    if inverse:
        b = torch.searchsorted(knots.contiguous(), u.unsqueeze(-1).contiguous(), right=True)
        b = b.squeeze(-1) - 1
    else:
        b = torch.floor(u * bins).long()
    b = b.clamp(0, bins - 1).unsqueeze(-1)
    left = knots.gather(-1, b).squeeze(-1)
    right = knots.gather(-1, b + 1).squeeze(-1)
    lad = log_q.gather(-1, b).squeeze(-1) + math.log(bins)
    b = b.squeeze(-1).to(u.dtype)
    # Both directions measure the bin by its two knots, so that knots (0 and 1 included) map
    # exactly onto knots and every rounding step is monotone; c_{b+1} - c_b equals Q_b up to
    # rounding, and the log-derivative uses the accurate log_softmax form.
    width = right - left
    if inverse:
        width = width.clamp_min(torch.finfo(u.dtype).tiny)  # underflowed: the bin has no interior
        out, lad = (b + ((u - left) / width).clamp(0.0, 1.0)) / bins, -lad
    else:
        out = (left + (u * bins - b) * width).clamp(0.0, 1.0)
    return torch.where(inside, out, z), torch.where(inside, lad, torch.zeros_like(lad))


# ---------------------------------------------------------------------------------------------
# shared helpers


def _check_rank(x: Tensor, event_dim: int, name: str = "input") -> None:
    """Raise :class:`PushforwardError` unless ``x`` has a batch and ``event_dim`` event dims."""
    if not isinstance(x, Tensor):
        raise PushforwardError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < event_dim + 1:
        if event_dim == 1:
            expected = "(batch, features)"
        else:
            expected = f"(batch, *event) with {event_dim} event dimensions"
        raise PushforwardError(f"{name}: expected shape {expected}, got {shape_str(x.shape)}")


def _check_real(value: float, name: str, low: float, high: float, closed_low: bool) -> float:
    """``value`` as a float inside ``[low, high)`` (``(low, high)`` unless ``closed_low``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise PushforwardError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    ok = math.isfinite(v) and (v >= low if closed_low else v > low) and v < high
    if not ok:
        interval = f"{'[' if closed_low else '('}{low:g}, {high:g})"
        raise PushforwardError(f"{name} must lie in {interval}, got {value!r}")
    return v


# ---------------------------------------------------------------------------------------------
# piecewise-linear


class PiecewiseLinearTransformer(Transformer):
    r"""The :math:`K`-bin piecewise-linear map of :func:`piecewise_linear` as an elementwise
    transformer for coupling and autoregressive structures.

    .. math::
        x = \sum_{k < b} Q_k + (K z - b)\, Q_b, \quad Q = \operatorname{softmax}(\theta), \qquad
        \log \frac{\partial x}{\partial z} = \log(K Q_b)

    ``params`` holds the :math:`K` logits per feature (``params_per_feature = bins``); zeros
    are the identity. It acts on :math:`[0, 1]` and is the identity outside (Müller et al. use
    it on the unit hypercube, with a uniform base). Cost: :math:`O(K)` per entry in both
    directions; the inverse is exact.

    Args:
        bins: number :math:`K` of bins.

    References:
        Müller, McWilliams, Rousselle, Gross and Novák (2019), "Neural importance sampling",
        arXiv:1808.03856.

    Example:
        >>> tr = PiecewiseLinearTransformer(bins=4)
        >>> x, lad = tr(torch.rand(5, 3), torch.randn(5, 3, 4))
        >>> x.shape, lad.shape
        (torch.Size([5, 3]), torch.Size([5, 3]))
    """

    def __init__(self, bins: int = 8):
        super().__init__()
        self.bins = check_positive_int(bins, "bins")
        self.params_per_feature = self.bins

    def _check(self, params: Tensor) -> None:
        if not isinstance(params, Tensor) or params.dim() < 2 or params.shape[-1] != self.bins:
            got = shape_str(params.shape) if isinstance(params, Tensor) else type(params).__name__
            raise PushforwardError(
                f"piecewise-linear params: expected shape (batch, features, {self.bins}), got {got}"
            )

    def forward(self, z: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        self._check(params)
        return piecewise_linear(z, params)

    def inverse(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        self._check(params)
        return piecewise_linear(x, params, inverse=True)


class PiecewiseLinear(Transform):
    r"""A learnable monotone piecewise-linear map of the unit cube onto itself, per feature.

    Each feature :math:`i` has :math:`K` equal-width input bins and learned output widths
    :math:`Q_i = \operatorname{softmax}(\theta_i)`; for :math:`z_i` in bin
    :math:`b_i = \lfloor K z_i \rfloor`,

    .. math::
        x_i = \sum_{k < b_i} Q_{ik} + (K z_i - b_i)\, Q_{i b_i}, \qquad
        \log|\det \partial x / \partial z| = \sum_i \log(K\, Q_{i b_i})

    so the density of :math:`x` under a uniform base is :math:`\prod_i 1 / (K Q_{i b_i})`.
    It starts at the identity (zero logits) and every real :math:`\theta` is valid. Entries
    outside :math:`[0, 1]` pass through unchanged with log-derivative 0 (the map fixes 0 and 1,
    so this is a continuous bijection of the real line). Cost: :math:`O(K)` per entry in both
    directions; the inverse is exact (binary search on the cumulative widths). With
    ``context_features > 0`` the logits are a network of the context.

    Args:
        features: size :math:`d` of the vectors.
        bins: number :math:`K` of bins.
        context_features: size of the conditioning vector (0: unconditional).
        hidden: hidden widths of the context network.

    References:
        Müller, McWilliams, Rousselle, Gross and Novák (2019), "Neural importance sampling",
        ACM Transactions on Graphics, arXiv:1808.03856 (the piecewise-linear coupling
        transform).

    Example:
        >>> t = PiecewiseLinear(2, bins=4)
        >>> z = torch.rand(5, 2)
        >>> x, ladj = t(z)
        >>> bool(torch.allclose(t.inverse(x)[0], z, atol=1e-6)), ladj.shape
        (True, torch.Size([5]))
    """

    def __init__(
        self,
        features: int,
        bins: int = 8,
        context_features: int = 0,
        hidden: Sequence[int] = (64, 64),
    ):
        super().__init__()
        self.features = check_positive_int(features, "features")
        self.bins = check_positive_int(bins, "bins")
        self.params = Parameters(
            {"logits": (self.features, self.bins)}, {"logits": 0.0}, context_features, hidden
        )

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_features(z, self.features)
        x, lad = piecewise_linear(z, self.params(context)["logits"])
        return x, lad.sum(-1)

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_features(x, self.features)
        z, lad = piecewise_linear(x, self.params(context)["logits"], inverse=True)
        return z, lad.sum(-1)


# ---------------------------------------------------------------------------------------------
# leaky ReLU


class LeakyReLU(Transform):
    r"""The leaky ReLU, an elementwise piecewise-linear bijection of the real line.

    .. math::
        x_i = \begin{cases} z_i & z_i \ge 0 \\ a z_i & z_i < 0 \end{cases}, \qquad
        \log|\det \partial x / \partial z| = \log a \cdot \#\{i : z_i < 0\}

    with slope :math:`a > 0` (the sign of every entry is kept, so the inverse divides the
    negative entries by :math:`a`). Fixed by default; with ``learnable=True``,
    :math:`a = e^{s}` for one learned :math:`s` (initialised at :math:`\log` of
    ``negative_slope``), so every real :math:`s` is valid, and with ``context_features > 0``
    :math:`s` is a network of the context. Both directions cost :math:`O(1)` per entry. The
    map is not differentiable at 0 (a set of measure zero; autograd uses the right slope 1).

    Args:
        negative_slope: the slope :math:`a` on the negative half-line (initial value when
            learnable).
        learnable: learn the slope.
        context_features: size of the conditioning vector (needs ``learnable=True``).
        event_dim: number of trailing event dimensions (1: vectors, 3: images).
        hidden: hidden widths of the context network.

    References:
        Prince (2023), "Understanding Deep Learning", MIT Press, chapter 16 (elementwise
        flows); Kobyzev, Prince and Brubaker (2020), "Normalizing flows: an introduction and
        review of current methods", arXiv:1908.09257.

    Example:
        >>> t = LeakyReLU(0.5)
        >>> t(torch.tensor([[-2.0, 3.0]]))
        (tensor([[-1.,  3.]]), tensor([-0.6931]))
    """

    def __init__(
        self,
        negative_slope: float = 0.01,
        learnable: bool = False,
        context_features: int = 0,
        event_dim: int = 1,
        hidden: Sequence[int] = (64, 64),
    ):
        super().__init__()
        slope = _check_real(negative_slope, "negative_slope", 0.0, math.inf, closed_low=False)
        self.event_dim = check_positive_int(event_dim, "event_dim")
        self.learnable = bool(learnable)
        if context_features and not self.learnable:
            raise PushforwardError("LeakyReLU: a conditional slope needs learnable=True")
        self.negative_slope = slope
        self.params = (
            Parameters({"log_slope": ()}, {"log_slope": math.log(slope)}, context_features, hidden)
            if self.learnable
            else None
        )

    def _log_slope(self, context: Tensor | None) -> Tensor | float:
        if self.params is None:
            return math.log(self.negative_slope)
        s = self.params(context)["log_slope"]  # () or (*batch,): one slope per sample
        return s.reshape(*s.shape, *([1] * self.event_dim))

    def _map(self, v: Tensor, context: Tensor | None, sign: float) -> tuple[Tensor, Tensor]:
        _check_rank(v, self.event_dim)
        log_a = self._log_slope(context)
        negative = v < 0
        scale = math.exp(sign * log_a) if isinstance(log_a, float) else torch.exp(sign * log_a)
        out = torch.where(negative, v * scale, v)
        return out, sign * sum_event(negative.to(v.dtype) * log_a, self.event_dim)

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._map(z, context, 1.0)

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._map(x, context, -1.0)


# ---------------------------------------------------------------------------------------------
# the sigmoid family


class _Squash(Transform):
    r"""The affine-adjusted sigmoid :math:`x = (\sigma(k z) - b) / a` and its inverse
    :math:`z = \operatorname{logit}(a x + b) / k`, with

    .. math::
        \log \frac{\partial x}{\partial z} = \log \frac{k}{a} + \log \sigma'(k z).

    :class:`Sigmoid` is :math:`(k, a, b) = (1, 1, 0)`, :class:`Tanh` is
    :math:`(2, \tfrac12, \tfrac12)` (since :math:`\tanh z = 2 \sigma(2 z) - 1`) and
    :class:`Logit` is the inverse of :math:`(1, 1 - 2\alpha, \alpha)`. Subclasses may override
    :meth:`_value` and :meth:`_preimage` with a more accurate native function of the same map.
    """

    def __init__(self, k: float, a: float, b: float, event_dim: int):
        super().__init__()
        self.k, self.a, self.b = float(k), float(a), float(b)
        self.event_dim = check_positive_int(event_dim, "event_dim")
        self.log_k_over_a = math.log(self.k / self.a)

    @property
    def interval(self) -> tuple[float, float]:
        """The closed interval that the squashing direction maps the real line into."""
        return (-self.b / self.a, (1.0 - self.b) / self.a)

    def _value(self, z: Tensor) -> Tensor:
        return (torch.sigmoid(self.k * z) - self.b) / self.a

    def _preimage(self, x: Tensor) -> Tensor:
        u = self.a * x + self.b
        finfo = torch.finfo(u.dtype)
        return torch.logit(u.clamp(finfo.tiny, 1.0 - finfo.eps / 2)) / self.k

    def _squash(self, z: Tensor) -> tuple[Tensor, Tensor]:
        _check_rank(z, self.event_dim)
        lad = self.log_k_over_a + log_sigmoid_derivative(self.k * z)
        return self._value(z), sum_event(lad, self.event_dim)

    def _unsquash(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _check_rank(x, self.event_dim)
        lo, hi = self.interval
        outside = (x < lo) | (x > hi)
        if not vmapped(x) and bool(outside.any()):  # vmap cannot branch on the data
            raise PushforwardError(
                f"{type(self).__name__}: {int(outside.sum())} input value(s) outside the "
                f"interval [{lo:g}, {hi:g}] (min {x.min().item():g}, max {x.max().item():g})"
            )
        z = self._preimage(x)
        lad = self.log_k_over_a + log_sigmoid_derivative(self.k * z)
        return z, -sum_event(lad, self.event_dim)

    def extra_repr(self) -> str:
        return f"event_dim={self.event_dim}"


class Sigmoid(_Squash):
    r"""The logistic sigmoid, a bijection from the real line onto :math:`(0, 1)`.

    .. math::
        x = \sigma(z) = \frac{1}{1 + e^{-z}}, \qquad
        \log|\det \partial x / \partial z|
        = \sum_i \log \sigma'(z_i) = -\sum_i \bigl(\operatorname{softplus}(-z_i)
        + \operatorname{softplus}(z_i)\bigr)

    The log-determinant uses the softplus form, finite for every finite :math:`z` even where
    :math:`\sigma(z)` rounds to 0 or 1. ``inverse`` (the logit) accepts :math:`[0, 1]` and
    raises :class:`~pushforward.core.PushforwardError` outside; the endpoints, which finite
    inputs reach only through rounding, are moved inside to the smallest normal number and to
    :math:`1 - \epsilon/2` (the float just below 1). Both directions cost :math:`O(1)` per entry.

    Args:
        event_dim: number of trailing event dimensions (1: vectors, 3: images).

    References:
        Dinh, Sohl-Dickstein and Bengio (2017), "Density estimation using Real NVP",
        arXiv:1605.08803, section 4.1 (the logit/sigmoid map between pixel space and the real
        line).

    Example:
        >>> x, ladj = Sigmoid()(torch.zeros(1, 2))
        >>> x, ladj
        (tensor([[0.5000, 0.5000]]), tensor([-2.7726]))
    """

    def __init__(self, event_dim: int = 1):
        super().__init__(1.0, 1.0, 0.0, event_dim)

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._squash(z)

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._unsquash(x)


class Tanh(_Squash):
    r"""The hyperbolic tangent, a bijection from the real line onto :math:`(-1, 1)`.

    It is the sigmoid up to an affine change, :math:`\tanh z = 2\sigma(2z) - 1`, and shares its
    numerics:

    .. math::
        x = \tanh z, \qquad
        \log|\det \partial x / \partial z| = \sum_i \log(1 - \tanh^2 z_i)
        = \sum_i \bigl(\log 4 + \log \sigma'(2 z_i)\bigr)

    (finite for every finite :math:`z`). Values use ``torch.tanh``/``torch.atanh``, which keep
    full relative precision near 0 where :math:`2\sigma(2z) - 1` would cancel. ``inverse``
    accepts :math:`[-1, 1]` and raises :class:`~pushforward.core.PushforwardError` outside;
    :math:`\pm 1` (reached from finite inputs only by rounding) is moved to the nearest float
    inside. Both directions cost :math:`O(1)` per entry.

    Args:
        event_dim: number of trailing event dimensions (1: vectors, 3: images).

    References:
        Kobyzev, Prince and Brubaker (2020), "Normalizing flows: an introduction and review of
        current methods", arXiv:1908.09257 (elementwise bijections).

    Example:
        >>> x, ladj = Tanh()(torch.zeros(1, 3))
        >>> x, ladj
        (tensor([[0., 0., 0.]]), tensor([0.]))
    """

    def __init__(self, event_dim: int = 1):
        super().__init__(2.0, 0.5, 0.5, event_dim)

    def _value(self, z: Tensor) -> Tensor:
        return torch.tanh(z)

    def _preimage(self, x: Tensor) -> Tensor:
        edge = 1.0 - torch.finfo(x.dtype).eps / 2
        return torch.atanh(x.clamp(-edge, edge))

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._squash(z)

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._unsquash(x)


class Logit(_Squash):
    r"""The logit with Real NVP's boundary margin :math:`\alpha`: from (a neighbourhood of)
    :math:`[0, 1]` onto the real line; the inverse direction of :class:`Sigmoid`.

    .. math::
        x = \operatorname{logit}(u), \quad u = \alpha + (1 - 2\alpha) z, \qquad
        \log|\det \partial x / \partial z|
        = \sum_i \bigl(\log(1 - 2\alpha) - \log u_i - \log(1 - u_i)\bigr)
        = \sum_i \bigl(\log(1 - 2\alpha) - \log \sigma'(x_i)\bigr)

    (computed in the last, softplus form). Its domain is
    :math:`[-\alpha / (1 - 2\alpha), (1 - \alpha) / (1 - 2\alpha)]`, which contains
    :math:`[0, 1]` with a margin when :math:`\alpha > 0`, so dequantized pixels never reach
    :math:`\pm\infty`; inputs outside raise :class:`~pushforward.core.PushforwardError`, and
    the two endpoints (:math:`u \in \{0, 1\}`) are moved inside to the smallest normal number
    and the float just below 1. ``inverse`` is :math:`z = (\sigma(x) - \alpha) / (1 - 2\alpha)`.
    ``Logit(0)`` is ``Inverse(Sigmoid())``. In the generative direction of an image flow
    (base to pixels) the preprocessing is ``Logit(alpha).inv``. Both directions cost
    :math:`O(1)` per entry.

    Args:
        alpha: the margin :math:`0 \le \alpha < 1/2` (Real NVP uses 0.05; MAF uses
            1e-6 on MNIST).
        event_dim: number of trailing event dimensions (1: vectors, 3: images).

    References:
        Dinh, Sohl-Dickstein and Bengio (2017), "Density estimation using Real NVP",
        arXiv:1605.08803, section 4.1 (the paper writes :math:`\alpha + (1 - \alpha) z`; the
        symmetric form used here, which maps :math:`[0, 1]` onto
        :math:`[\alpha, 1 - \alpha]`, is the one of its reference implementations and of
        Papamakarios, Pavlakou and Murray (2017), "Masked autoregressive flow for density
        estimation", arXiv:1705.07057).

    Example:
        >>> t = Logit(alpha=0.05)
        >>> x, ladj = t(torch.tensor([[0.0, 0.5, 1.0]]))
        >>> x
        tensor([[-2.9444,  0.0000,  2.9444]])
        >>> bool(torch.allclose(t.inverse(x)[0], torch.tensor([[0.0, 0.5, 1.0]]), atol=1e-6))
        True
    """

    def __init__(self, alpha: float = 0.0, event_dim: int = 1):
        alpha = _check_real(alpha, "alpha", 0.0, 0.5, closed_low=True)
        super().__init__(1.0, 1.0 - 2.0 * alpha, alpha, event_dim)
        self.alpha = alpha

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._unsquash(z)

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._squash(x)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, event_dim={self.event_dim}"
