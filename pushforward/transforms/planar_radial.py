r"""Planar and radial flows (Rezende and Mohamed, 2015): one-dimensional bottleneck maps.

Each map moves a point along one direction (planar: a fixed vector :math:`\hat u`; radial: the
ray from a centre :math:`z_0`) by an amount that depends on one scalar of the input, so its
Jacobian is the identity plus a rank-one term (determinant by the matrix determinant lemma) and
its inverse reduces to one scalar equation per sample: solved exactly here, in closed form
(radial) or by bracketed Newton to float precision (planar). Both are cheap enough to stack by
the dozen as amortized VAE posteriors, where the context drives their parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import (
    Parameters,
    PushforwardError,
    Transform,
    check_event,
    check_finite,
    check_positive_int,
)
from ..numerics import implicit_step, monotone_solve, safe_norm

__all__ = ["Planar", "Radial"]


def _positive(raw: Tensor) -> Tensor:
    """``softplus(raw)``, floored at the smallest normal float so it never underflows to 0."""
    return F.softplus(raw).clamp_min(torch.finfo(raw.dtype).tiny)


def _sech2(a: Tensor) -> Tensor:
    r""":math:`\operatorname{sech}^2 a = 1 - \tanh^2 a`, accurate and overflow-free."""
    e = torch.exp(-2 * a.abs())
    return 4 * e / (1 + e) ** 2


class _Activation(NamedTuple):
    r"""A planar activation: increasing, :math:`h(0) = 0`, :math:`0 < h' \le 1`."""

    h: Callable[[Tensor], Tensor]
    dh: Callable[[Tensor], Tensor]
    #: :math:`1 - h'`, computed without cancellation
    co_dh: Callable[[Tensor], Tensor]
    #: whether :math:`|h| \le 1` (tightens the bracket of the inverse)
    bounded: bool


_LEAKY_SLOPE = 0.01

_ACTIVATIONS = {
    "tanh": _Activation(torch.tanh, _sech2, lambda a: torch.tanh(a) ** 2, True),
    "leaky_relu": _Activation(
        lambda a: F.leaky_relu(a, _LEAKY_SLOPE),
        lambda a: torch.where(a > 0, 1.0, _LEAKY_SLOPE).to(a.dtype),
        lambda a: torch.where(a > 0, 0.0, 1 - _LEAKY_SLOPE).to(a.dtype),
        False,
    ),
}


class Planar(Transform):
    r"""Planar flow: a point moves along :math:`\hat u` by a squashed projection on :math:`w`.

    .. math::
        x = z + \hat u\, h(a), \quad a = w^\top z + b, \qquad
        \log|\det \partial x / \partial z| = \log\bigl(1 + h'(a)\, w^\top \hat u\bigr),

    by the matrix determinant lemma, :math:`\det(I + h'(a)\, \hat u w^\top) = 1 + h'(a)\,
    w^\top \hat u`. The map is invertible when :math:`w^\top \hat u \ge -1` (as
    :math:`0 < h' \le 1`); every real :math:`u` is made valid by the paper's reparameterisation

    .. math::
        \hat u = u + \bigl(m(w^\top u) - w^\top u\bigr) \frac{w}{\|w\|^2}, \quad
        m(s) = -1 + \log(1 + e^s), \quad\text{so}\quad w^\top \hat u = m(w^\top u) > -1,

    and the log-determinant is evaluated as
    :math:`\log\bigl((1 - h'(a)) + h'(a) \log(1 + e^{w^\top u})\bigr)`, a sum of two
    non-negative terms that stays accurate next to the boundary :math:`w^\top \hat u = -1`.

    Inverse: projecting :math:`x` on :math:`w` gives one scalar equation,
    :math:`y = w^\top x + b = a + (w^\top \hat u)\, h(a)`, increasing in :math:`a`. Since
    :math:`h(0) = 0` and :math:`0 \le h(a)/a \le 1`, the root lies between :math:`y` and
    :math:`y / (1 + w^\top \hat u)`, and (``tanh``, :math:`|h| \le 1`) within
    :math:`|w^\top \hat u|` of :math:`y`; :func:`~pushforward.numerics.monotone_solve` finds it
    by safeguarded Newton to relative tolerance ``1e-12`` (float64; ``1e-6`` in float32), then
    :math:`z = x - \hat u\, h(a)`. Derivatives of the inverse are exact up to the second
    order (implicit function theorem, :func:`~pushforward.numerics.implicit_step`).

    Cost: ``forward`` :math:`O(d)` per sample; ``inverse`` :math:`O(d)` plus a few (typically
    under 10, at most 100) scalar Newton/bisection steps per sample, batched.

    Args:
        features: size :math:`d` of the vectors.
        context_features: size of the conditioning vector (0: unconditional); otherwise
            :math:`u, w, b` are a network of the context (amortized posteriors).
        activation: :math:`h`: ``"tanh"`` (the paper's) or ``"leaky_relu"`` (negative slope
            0.01).
        hidden: hidden widths of the context network.

    References:
        Rezende and Mohamed (2015), "Variational Inference with Normalizing Flows",
        arXiv:1505.05770 (section 4.1; the reparameterisation of :math:`u` in appendix A.1).

    Example:
        >>> t = Planar(3)
        >>> z = torch.randn(5, 3)
        >>> x, ladj = t(z)
        >>> z2, ladj2 = t.inverse(x)
        >>> torch.allclose(z2, z, atol=1e-5), torch.allclose(ladj, -ladj2, atol=1e-5)
        (True, True)
    """

    def __init__(
        self,
        features: int,
        context_features: int = 0,
        activation: str = "tanh",
        hidden: Sequence[int] = (64, 64),
    ):
        super().__init__()
        self.features = check_positive_int(features, "features")
        if activation not in _ACTIVATIONS:
            raise PushforwardError(
                f"unknown activation {activation!r}; choose from {', '.join(_ACTIVATIONS)}"
            )
        self.activation = activation
        d = self.features
        self.params = Parameters(
            {"u": (d,), "w": (d,), "b": ()}, {"b": 0.0}, context_features, hidden
        )

    def coefficients(self, context: Tensor | None = None) -> dict[str, Tensor]:
        """The constrained parameters: ``u_hat`` (:math:`\\hat u`), ``w``, ``b``, ``wu_hat``
        (:math:`w^\\top \\hat u > -1`) and ``softplus_wu`` (:math:`1 + w^\\top \\hat u`, kept
        separately for accuracy near the boundary). With a context they have its batch shape."""
        p = self.params(context)
        u, w, b = p["u"], p["w"], p["b"]
        wu = (w * u).sum(-1)
        sp = _positive(wu)
        wu_hat = sp - 1
        w2 = (w * w).sum(-1).clamp_min(torch.finfo(w.dtype).tiny)
        u_hat = u + ((wu_hat - wu) / w2).unsqueeze(-1) * w
        return {"u_hat": u_hat, "w": w, "b": b, "wu_hat": wu_hat, "softplus_wu": sp}

    def _slope(self, a: Tensor, sp: Tensor) -> Tensor:
        """:math:`1 + h'(a)\\, w^\\top \\hat u`, evaluated as :math:`(1 - h') + h' \\cdot sp`."""
        act = _ACTIVATIONS[self.activation]
        return act.co_dh(a) + act.dh(a) * sp

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_event(z, (self.features,))
        c = self.coefficients(context)
        a = (c["w"] * z).sum(-1) + c["b"]
        x = z + c["u_hat"] * _ACTIVATIONS[self.activation].h(a).unsqueeze(-1)
        return x, torch.log(self._slope(a, c["softplus_wu"]))

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_event(x, (self.features,))
        check_finite(x)
        c = self.coefficients(context)
        act = _ACTIVATIONS[self.activation]
        k, sp = c["wu_hat"], c["softplus_wu"]
        y = (c["w"] * x).sum(-1) + c["b"]

        def g(a: Tensor) -> Tensor:
            return a + k * act.h(a)

        def dg(a: Tensor) -> Tensor:
            return self._slope(a, sp)

        with torch.no_grad():
            big = torch.finfo(y.dtype).max
            far = torch.nan_to_num(y / sp, posinf=big, neginf=-big)
            lo, hi = torch.minimum(y, far), torch.maximum(y, far)
            if act.bounded:
                lo, hi = torch.maximum(lo, y - k.abs()), torch.minimum(hi, y + k.abs())
                hi = torch.maximum(hi, lo)  # an empty intersection can only come from rounding
        a = monotone_solve(g, y, lo, hi, df=dg)
        a = implicit_step(g, y, a, dg)
        z = x - c["u_hat"] * act.h(a).unsqueeze(-1)
        return z, -torch.log(self._slope(a, sp))

    def extra_repr(self) -> str:
        return f"features={self.features}, activation={self.activation!r}"


class Radial(Transform):
    r"""Radial flow: points contract towards or expand away from a centre :math:`z_0`.

    .. math::
        x = z + \beta h(r) (z - z_0), \quad r = \|z - z_0\|, \quad h(r) = \frac{1}{\alpha + r},

    .. math::
        \log|\det \partial x / \partial z| = (d - 1) \log(1 + \beta h(r))
            + \log\bigl(1 + \beta h(r) + \beta h'(r)\, r\bigr),

    with :math:`\alpha = \log(1 + e^{\tilde\alpha}) > 0` and
    :math:`\beta = -\alpha + \log(1 + e^{\tilde\beta}) > -\alpha` (invertible for every real
    :math:`\tilde\alpha, \tilde\beta`). Writing :math:`s = \alpha + \beta > 0` and
    :math:`q = \alpha + r`, both factors are sums of non-negative terms, evaluated as such
    (no cancellation or overflow for any :math:`r`):

    .. math::
        1 + \beta h = \frac{r + s}{q}, \qquad
        1 + \beta h + \beta h' r = \frac{r}{q}\Bigl(1 + \frac{\alpha}{q}\Bigr)
            + \frac{\alpha}{q}\frac{s}{q}.

    Inverse, exact in closed form: :math:`x - z_0` is :math:`z - z_0` scaled by
    :math:`(r + s)/q > 0`, so :math:`r_x = \|x - z_0\| = r (r + s)/(\alpha + r)`, i.e.
    :math:`r^2 + (s - r_x) r - \alpha r_x = 0`, whose one non-negative root is (with
    :math:`p = r_x - s`, :math:`D = \sqrt{p^2 + 4 \alpha r_x}`) :math:`r = (p + D)/2` for
    :math:`p \ge 0` and :math:`r = 2 \alpha r_x / (D - p)` otherwise (no cancellation); then
    :math:`z = z_0 + (x - z_0)\, q / (r + s)`, which is :math:`z_0` at :math:`x = z_0`.

    Cost: both directions :math:`O(d)` per sample, closed form.

    Args:
        features: size :math:`d` of the vectors.
        context_features: size of the conditioning vector (0: unconditional); otherwise
            :math:`z_0, \tilde\alpha, \tilde\beta` are a network of the context.
        hidden: hidden widths of the context network.

    References:
        Rezende and Mohamed (2015), "Variational Inference with Normalizing Flows",
        arXiv:1505.05770 (section 4.1; the constraint on :math:`\beta` in appendix A.2).

    Example:
        >>> t = Radial(3)
        >>> z = torch.randn(5, 3)
        >>> x, ladj = t(z)
        >>> z2, ladj2 = t.inverse(x)
        >>> torch.allclose(z2, z, atol=1e-5), torch.allclose(ladj, -ladj2, atol=1e-5)
        (True, True)
    """

    def __init__(self, features: int, context_features: int = 0, hidden: Sequence[int] = (64, 64)):
        super().__init__()
        self.features = check_positive_int(features, "features")
        d = self.features
        self.params = Parameters(
            {"z0": (d,), "alpha_raw": (), "beta_raw": ()}, None, context_features, hidden
        )

    def coefficients(self, context: Tensor | None = None) -> dict[str, Tensor]:
        """The constrained parameters: ``z0``, ``alpha`` (:math:`> 0`), ``beta``
        (:math:`> -\\alpha`) and ``alpha_plus_beta`` (:math:`s`, kept separately for accuracy).
        With a context they have its batch shape."""
        p = self.params(context)
        alpha, s = _positive(p["alpha_raw"]), _positive(p["beta_raw"])
        return {"z0": p["z0"], "alpha": alpha, "beta": s - alpha, "alpha_plus_beta": s}

    def _scale_and_ladj(self, r: Tensor, alpha: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """The radial scale factor :math:`1 + \\beta h(r)` and the forward ladj at radius r."""
        q = alpha + r
        t, ra, sq = r / q, alpha / q, s / q
        scale = t + sq
        ladj = (self.features - 1) * torch.log(scale) + torch.log(t * (1 + ra) + ra * sq)
        return scale, ladj

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_event(z, (self.features,))
        c = self.coefficients(context)
        v = z - c["z0"]
        scale, ladj = self._scale_and_ladj(safe_norm(v), c["alpha"], c["alpha_plus_beta"])
        return c["z0"] + v * scale.unsqueeze(-1), ladj

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_event(x, (self.features,))
        c = self.coefficients(context)
        alpha, s = c["alpha"], c["alpha_plus_beta"]
        v = x - c["z0"]
        rx = safe_norm(v)
        p = rx - s
        # D = sqrt(p^2 + 4 alpha rx), scaled by a constant to avoid overflow (homogeneous in m)
        m = (p.abs() + rx + alpha).detach()
        d = m * torch.sqrt((p / m) ** 2 + 4 * (alpha / m) * (rx / m))
        neg = p < 0
        r = torch.where(neg, 2 * alpha * rx / torch.where(neg, d - p, 1.0), (p + d) / 2)
        scale, ladj = self._scale_and_ladj(r, alpha, s)
        return c["z0"] + v / scale.unsqueeze(-1), -ladj

    def extra_repr(self) -> str:
        return f"features={self.features}"
