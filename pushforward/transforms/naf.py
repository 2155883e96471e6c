r"""Deep sigmoidal flows (Huang et al., 2018): the transformer of neural autoregressive flows.

Each entry is mapped by a one-hidden-layer monotone network,

.. math::
    y = \sigma^{-1}\Bigl(\sum_{j=1}^{H} w_j\, \sigma(a_j x + b_j)\Bigr), \qquad
    a_j > 0, \quad w = \operatorname{softmax}(\omega),

a strictly increasing bijection of the real line (the logit of a convex combination of
sigmoids with positive slopes). Everything is evaluated in log space with :math:`u_j = a_j x +
b_j`, :math:`\log \sigma(u) = -\operatorname{softplus}(-u)` and
:math:`\log(1 - \sigma(u)) = \log \sigma(-u)`:

.. math::
    \log S = \operatorname{LSE}_j(\log w_j + \log\sigma(u_j)), \quad
    \log(1 - S) = \operatorname{LSE}_j(\log w_j + \log\sigma(-u_j)), \quad
    y = \log S - \log(1 - S),

.. math::
    \log \frac{dy}{dx} = \operatorname{LSE}_j\bigl(\log w_j + \log a_j + \log\sigma(u_j)
        + \log\sigma(-u_j)\bigr) - \log S - \log(1 - S),

so that neither :math:`S` nor :math:`1 - S` is ever formed (they round to 0 or 1 in float32
from :math:`|u| \approx 17`). This is the log-domain algebra of the authors' code (its
``log_sum_exp`` and ``logsigmoid``), without their :math:`(1 - \delta) S + \delta/2` clipping,
which the log domain makes unnecessary.

The inverse has no closed form; it is solved per entry by bracketed safeguarded Newton
(:func:`pushforward.numerics.monotone_solve`) inside the exact bracket
:math:`\min_j (y - b_j)/a_j \le x \le \max_j (y - b_j)/a_j` (where every
:math:`\sigma(a_j x + b_j)` is below, respectively above, :math:`\sigma(y)`), then two Newton steps
with autograd attached give the exact derivatives (implicit function theorem).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import PushforwardError, Transformer, check_positive_int, shape_str
from ..numerics import monotone_solve

__all__ = ["deep_sigmoid_flow", "DeepSigmoidTransformer"]


def _check_min_slope(min_slope: float) -> float:
    if isinstance(min_slope, bool) or not isinstance(min_slope, numbers.Real):
        raise PushforwardError(f"min_slope must be a number in (0, 1), got {min_slope!r}")
    if not 0 < min_slope < 1:
        raise PushforwardError(f"min_slope must lie in (0, 1), got {min_slope!r}")
    return float(min_slope)


def _components(
    params: Tensor, min_slope: float, batch: torch.Size
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(a, log a, b, log w)``, each ``(H, *batch)`` and contiguous (component-major: every
    sum over the components is then a vectorised pass over the batch), from the unconstrained
    ``(*batch, 3H)`` parameters (slopes, shifts, weight logits; zero slopes give a = 1)."""
    hidden = params.shape[-1] // 3
    major = params.expand(*batch, 3 * hidden).movedim(-1, 0).contiguous()
    a = F.softplus(major[:hidden] + math.log(math.expm1(1.0 - min_slope))) + min_slope
    log_w = torch.log_softmax(major[2 * hidden :], dim=0)
    return a, torch.log(a), major[hidden : 2 * hidden], log_w


def _run(
    x: Tensor, params: Tensor, inverse: bool, min_slope: float, tol: float | None
) -> tuple[Tensor, Tensor]:
    """Broadcast ``x`` ``(*b)`` against ``params`` ``(*b, 3H)`` and apply the map."""
    batch = torch.broadcast_shapes(x.shape, params.shape[:-1])
    a, log_a, b, log_w = _components(params, min_slope, batch)
    x = x.expand(batch)
    if not inverse:
        return _dsf(x, a, log_a, b, log_w)
    return _inverse(x, a, log_a, b, log_w, tol)


def _dsf(x: Tensor, a: Tensor, log_a: Tensor, b: Tensor, log_w: Tensor) -> tuple[Tensor, Tensor]:
    """The map and its log-derivative at ``x`` ``(*batch)``; components ``(H, *batch)``."""
    u = torch.addcmul(b, a, x)
    log_sig = F.logsigmoid(u)  # log sigma(u)
    log_sig_neg = log_sig - u  # log sigma(-u) = log sigma(u) - u, exact for every u
    pos = log_w + log_sig
    log_s = torch.logsumexp(pos, 0)
    log_1ms = torch.logsumexp(log_w + log_sig_neg, 0)
    log_num = torch.logsumexp(pos + log_sig_neg + log_a, 0)
    return log_s - log_1ms, log_num - log_s - log_1ms


def deep_sigmoid_flow(
    x: Tensor,
    unnormalized_slopes: Tensor,
    shifts: Tensor,
    unnormalized_weights: Tensor,
    *,
    inverse: bool = False,
    min_slope: float = 1e-3,
    tol: float | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The deep sigmoidal flow map :math:`y = \sigma^{-1}(\sum_j w_j \sigma(a_j x + b_j))`.

    .. math::
        a_j = m + \operatorname{softplus}(\alpha_j + \log(e^{1 - m} - 1)), \quad
        w = \operatorname{softmax}(\omega), \qquad
        \log\frac{dy}{dx} = \log \sum_j w_j a_j \sigma(u_j)\sigma(-u_j) - \log S - \log(1 - S)

    with :math:`u_j = a_j x + b_j` and :math:`S = \sum_j w_j \sigma(u_j)`, all in log space
    (see the module docstring). Zero slopes and shifts give :math:`a_j = 1, b_j = 0`, hence
    :math:`S = \sigma(x)` and the identity, whatever the weights. Every real parameter value is
    valid: the map is a strictly increasing bijection of :math:`\mathbb{R}` with slopes at
    least :math:`\min_j a_j \ge m` far out.

    The inverse is numerical: bracketed safeguarded Newton
    (:func:`~pushforward.numerics.monotone_solve`) to a relative tolerance ``tol`` (default
    ``1e-12`` in float64, ``1e-6`` in float32) inside the exact bracket
    :math:`[\min_j (y - b_j)/a_j, \max_j (y - b_j)/a_j]`, which cannot fail, then two Newton
    steps carrying autograd, whose error is of the order of the square of the last one (in
    float64 the round trip is at rounding level, about ``1e-15 (1 + |x|)`` where the map is
    well conditioned). Derivatives of the inverse are exact up to the third order (implicit
    function theorem; see :func:`~pushforward.numerics.implicit_step`).

    Cost: :math:`O(H)` per entry forward; the inverse costs one evaluation per Newton or
    bisection iteration (typically 3 to 15, at most 100), plus three for the final steps.

    Args:
        x: inputs ``(*batch)``.
        unnormalized_slopes: :math:`\alpha`, ``(*batch, H)`` (leading dimensions broadcast).
        shifts: :math:`b`, ``(*batch, H)``.
        unnormalized_weights: :math:`\omega`, ``(*batch, H)``.
        inverse: compute the inverse map.
        min_slope: :math:`m`, the lower bound of the slopes :math:`a_j`, in ``(0, 1)``.
        tol: relative tolerance of the inverse's root finder (``None``: the dtype's default).

    Returns:
        The output and the elementwise log-derivative of the direction computed, both of the
        broadcast batch shape.

    References:
        Huang, Krueger, Lacoste and Courville (2018), "Neural Autoregressive Flows",
        arXiv:1804.00779 (section 3.1, deep sigmoidal flows).

    Example:
        >>> x = torch.tensor([-3.0, 0.0, 2.5], dtype=torch.float64)
        >>> alpha, b, omega = torch.randn(3, 3, 4, dtype=torch.float64)
        >>> y, lad = deep_sigmoid_flow(x, alpha, b, omega)
        >>> x2, lad2 = deep_sigmoid_flow(y, alpha, b, omega, inverse=True)
        >>> bool(torch.allclose(x2, x, atol=1e-12)), bool(torch.allclose(lad + lad2, 0 * x))
        (True, True)
    """
    names = ("x", "unnormalized_slopes", "shifts", "unnormalized_weights")
    tensors = (x, unnormalized_slopes, shifts, unnormalized_weights)
    for name, t in zip(names, tensors):
        if not isinstance(t, Tensor):
            raise PushforwardError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    params = tensors[1:]
    hidden = params[0].shape[-1] if params[0].dim() else 0
    if hidden < 1 or any(p.dim() == 0 or p.shape[-1] != hidden for p in params):
        raise PushforwardError(
            "deep_sigmoid_flow: expected slopes, shifts and weights of shape (..., H) with the "
            f"same H >= 1, got {', '.join(shape_str(p.shape) for p in params)}"
        )
    try:
        batch = torch.broadcast_shapes(x.shape, *(p.shape[:-1] for p in params))
    except RuntimeError:
        raise PushforwardError(
            f"deep_sigmoid_flow: input {shape_str(x.shape)} and parameters "
            f"{', '.join(shape_str(p.shape) for p in params)} do not broadcast"
        ) from None
    joint = torch.cat([p.expand(*batch, hidden) for p in params], -1)
    return _run(x, joint, inverse, _check_min_slope(min_slope), tol)


def _inverse(
    y: Tensor, a: Tensor, log_a: Tensor, b: Tensor, log_w: Tensor, tol: float | None
) -> tuple[Tensor, Tensor]:
    """Solve ``_dsf(x) = y`` in the exact bracket, then attach the implicit gradient."""
    with torch.no_grad():
        ad, la, bd, lw = (v.detach() for v in (a, log_a, b, log_w))
        # sigma(a_j x + b_j) <= sigma(y) for every j when x <= min_j (y - b_j) / a_j, so the
        # convex combination S is too, and x <= solution; likewise above the maximum
        ends = (y.detach() - bd) / ad
        lo, hi = ends.amin(0), ends.amax(0)
        cache: dict[str, Tensor] = {}

        def f(v: Tensor) -> Tensor:
            out, lad = _dsf(v, ad, la, bd, lw)
            cache["v"], cache["lad"] = v, lad
            return out

        def df(v: Tensor) -> Tensor:
            lad = cache["lad"] if cache.get("v") is v else _dsf(v, ad, la, bd, lw)[1]
            return torch.exp(lad)

        root = monotone_solve(f, y.detach(), lo, hi, tol=tol, df=df)
    # two Newton steps with autograd (pushforward.numerics.implicit_step's scheme, with full
    # Newton steps: each evaluation gives the slope too): the value of the root and, by the
    # implicit function theorem, its exact derivatives with respect to y and the parameters
    # up to the third order: dx/dy = 1 / f'(x), dx/dtheta = -(df/dtheta) / f'(x), and theirs
    # (a single step would make every second derivative 0)
    x = root
    value, lad = _dsf(x, a, log_a, b, log_w)
    big = math.log(torch.finfo(lad.dtype).max) - 1  # 1/slope stays finite (0 * inf is NaN)
    for _ in range(2):
        x = x - (value - y) * torch.exp((-lad).clamp(max=big))
        value, lad = _dsf(x, a, log_a, b, log_w)
    return x, -lad


class DeepSigmoidTransformer(Transformer):
    r"""The deep sigmoidal flow of :func:`deep_sigmoid_flow` as an elementwise transformer for
    autoregressive and coupling structures (NAF = masked autoregressive + this transformer).

    .. math::
        x = \sigma^{-1}\Bigl(\sum_{j=1}^{H} w_j \sigma(a_j z + b_j)\Bigr), \qquad
        \log\frac{dx}{dz} = \log\sum_j w_j a_j \sigma(u_j)\sigma(-u_j) - \log S - \log(1 - S)

    ``params`` has shape ``(*batch, features, 3H)``: the :math:`H` unnormalised slopes
    :math:`\alpha` (zero means :math:`a = 1`), the :math:`H` shifts :math:`b`, then the
    :math:`H` weight logits :math:`\omega`.

    :meth:`identity_params` is :math:`\alpha = 0, b = 0` and weight logits spread evenly over
    :math:`[-1, 1]`: every component is :math:`\sigma(z)`, so :math:`S = \sigma(z)` and the map
    is the identity exactly (to rounding: :math:`|x - z| \le` a few ulp of
    :math:`\max(1, |z|)`, log-derivative within a few ulp of 0). The unequal weights make the
    components' gradients differ (the gradient of component :math:`j`'s slope and shift is
    proportional to :math:`w_j`), so training separates them from the first step instead of
    keeping identical components identical.

    Cost: forward :math:`O(H)` per entry; the inverse is numerical (bracketed Newton, exact
    bracket, tolerance ``1e-12`` relative in float64 and ``1e-6`` in float32, then two Newton
    steps), typically 3 to 15 evaluations.

    Direction: Huang et al. apply the DSF from data to noise. In this library a transformer's
    ``inverse`` is the data-to-noise direction of a structure (the density pass of
    :class:`~pushforward.transforms.autoregressive.MaskedAutoregressive`), so NAF as in the
    paper is ``invert=True``: ``inverse`` is then the closed-form DSF (density in one pass) and
    ``forward`` its numerical inverse (sampling). ``invert=False`` (the default) is the mirror
    image: closed-form sampling, numerical density.

    Args:
        hidden: number :math:`H` of sigmoid components.
        min_slope: lower bound of the slopes :math:`a_j`.
        invert: use the map's inverse as the transformer (the NAF direction, see above).

    References:
        Huang, Krueger, Lacoste and Courville (2018), "Neural Autoregressive Flows",
        arXiv:1804.00779.

    Example:
        >>> tr = DeepSigmoidTransformer(hidden=8)
        >>> params = torch.randn(5, 3, tr.params_per_feature)
        >>> x, lad = tr(torch.randn(5, 3), params)
        >>> z, lad_inv = tr.inverse(x, params)
        >>> x.shape, lad.shape
        (torch.Size([5, 3]), torch.Size([5, 3]))
        >>> z = torch.randn(5, 3)
        >>> ident = tr.identity_params().expand(5, 3, -1)
        >>> bool(torch.allclose(tr(z, ident)[0], z, atol=1e-6))
        True
    """

    def __init__(self, hidden: int = 8, *, min_slope: float = 1e-3, invert: bool = False):
        super().__init__()
        self.hidden = check_positive_int(hidden, "hidden")
        self.min_slope = _check_min_slope(min_slope)
        if not isinstance(invert, bool):
            raise PushforwardError(f"invert must be True or False, got {invert!r}")
        self.invert = invert
        self.params_per_feature = 3 * self.hidden

    def identity_params(self) -> Tensor:
        """Slopes 1, shifts 0, weight logits evenly spread over ``[-1, 1]``: the identity."""
        out = torch.zeros(self.params_per_feature)
        if self.hidden > 1:
            out[2 * self.hidden :] = torch.linspace(-1.0, 1.0, self.hidden)
        return out

    def _map(self, v: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        expected = f"(batch, features, {self.params_per_feature})"
        if not isinstance(params, Tensor) or params.dim() < 2:
            got = shape_str(params.shape) if isinstance(params, Tensor) else type(params).__name__
            raise PushforwardError(f"deep sigmoid params: expected shape {expected}, got {got}")
        if params.shape[-1] != self.params_per_feature:
            raise PushforwardError(
                f"deep sigmoid params: expected shape {expected}, got {shape_str(params.shape)}"
            )
        try:
            torch.broadcast_shapes(v.shape, params.shape[:-1])
        except RuntimeError:
            raise PushforwardError(
                f"deep sigmoid: input {shape_str(v.shape)} does not match params "
                f"{shape_str(params.shape)}"
            ) from None
        return _run(v, params, inverse != self.invert, self.min_slope, None)

    def forward(self, z: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return self._map(z, params, inverse=False)

    def inverse(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return self._map(x, params, inverse=True)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}" + (", invert=True" if self.invert else "")
