r"""Monotone rational-quadratic splines (Durkan et al., 2019): the transformer of neural spline
flows.

On :math:`[-B, B]` the map is a :math:`K`-bin monotone rational-quadratic spline through the
knots :math:`(x_k, y_k)_{k=0}^{K}` with positive knot derivatives :math:`\delta_k`; outside it
is the identity (*linear tails*). The boundary derivatives are fixed,
:math:`\delta_0 = \delta_K = 1`, so the map is a :math:`C^1` increasing bijection of the real
line. In bin :math:`k`, with :math:`w_k = x_{k+1} - x_k`, :math:`h_k = y_{k+1} - y_k`,
:math:`s_k = h_k / w_k` and :math:`\xi = (x - x_k) / w_k \in [0, 1]`,

.. math::
    y = y_k + \frac{h_k \left[s_k \xi^2 + \delta_k \xi (1 - \xi)\right]}
                   {s_k + (\delta_{k+1} + \delta_k - 2 s_k)\, \xi (1 - \xi)},

.. math::
    \frac{dy}{dx} = \frac{s_k^2 \left[\delta_{k+1} \xi^2 + 2 s_k \xi (1 - \xi)
                    + \delta_k (1 - \xi)^2\right]}
                   {\left[s_k + (\delta_{k+1} + \delta_k - 2 s_k)\, \xi (1 - \xi)\right]^2}.

The inverse is exact: :math:`\xi` is the root in :math:`[0, 1]` of a quadratic, taken in a
cancellation-free form (the paper's appendix A.3 where :math:`b \ge 0`, the conjugate form
where :math:`b < 0`), with the coefficients scaled so that nothing overflows.

Parameterisation (every real value is valid): bin widths
:math:`w = 2B\,[m_w + (1 - K m_w)\operatorname{softmax}(\theta^w)]`, heights likewise with
:math:`m_h`, interior derivatives :math:`\delta = m_\delta + \operatorname{softplus}(\theta^\delta)`
(:math:`K - 1` of them), as in the reference implementation (nflows).

Implementation (speed): the bins are processed bin-major, ``(K, *batch)``, so that every
reduction over the bins is a vectorised pass over the batch rather than a reduction over a
short last dimension (the first pass over the logits writes this layout, whatever the layout
of ``params``; no separate transposition). The normalisation, the bin search (a comparison
with all knots, no ``searchsorted``), and the gathering of the bin's knots and derivatives run
in one autograd function with a hand-written backward: a handful of passes over the
parameters instead of the dozens that autograd records for softmax, cumulative sums, gathers,
padding and masks; only the two knot derivatives in play go through ``softplus``. Tails are
selected with ``where`` (the spline is evaluated on the clamped input), never by boolean
indexing. For ``(512, 43)`` entries and 8 bins, forward plus backward is about 5 ms on one CPU
core, a quarter of a direct (nflows-style) implementation.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from ..core import PushforwardError, Transformer, check_positive_int, shape_str

__all__ = ["rational_quadratic_spline", "RQSplineTransformer"]


def _check_settings(bins: int, bound: float, min_w: float, min_h: float, min_d: float) -> None:
    if isinstance(bound, bool) or not isinstance(bound, numbers.Real) or not bound > 0:
        raise PushforwardError(f"bound must be a positive number, got {bound!r}")
    if not math.isfinite(bound):
        raise PushforwardError(f"bound must be finite, got {bound!r}")
    for name, value in (("min_bin_width", min_w), ("min_bin_height", min_h)):
        if not 0 <= value or not value * bins < 1:
            raise PushforwardError(
                f"{name} must lie in [0, 1/bins) = [0, {1 / bins:g}), got {value!r}"
            )
    if not min_d >= 0 or not math.isfinite(min_d):
        raise PushforwardError(f"min_derivative must be a non-negative number, got {min_d!r}")


class _Bins(torch.autograd.Function):
    """Normalise the widths and heights, find each entry's bin and gather its knots.

    ``u``: ``(3K - 1, *batch)`` unnormalised parameters, any strides (rows: widths, heights,
    interior derivatives; the gradient is returned in the same layout), ``xi``: ``(*batch)``
    inputs mapped to the unit interval, ``row``: 0 to search the input knots (forward map), 1
    the output knots (inverse), ``peak``: a common upper bound of the logits or ``None``.
    Returns ``(6, *batch)``: left input knot, left output knot, bin width, bin height (unit
    coordinates), left and right knot derivative. The backward is the exact gradient with
    respect to ``u``; the bin index is piecewise constant, so ``xi`` gets none.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        u: Tensor,
        xi: Tensor,
        row: int,
        min_w: float,
        min_h: float,
        min_d: float,
        shift: float,
        peak: float | None,
    ) -> Tensor:
        bins = (u.shape[0] + 1) // 3
        batch = xi.shape
        ones = (1,) * len(batch)
        # unnormalised bin sizes e = exp(theta - max) (contiguous, whatever the layout of u)
        # and their exclusive cumulative sums; ``peak``, when given, is a common maximum of
        # every logit, close enough to each row's own maximum that no e underflows
        theta = u[: 2 * bins].unflatten(0, (2, bins))
        e = torch.empty((2, bins, *batch), dtype=u.dtype, device=u.device)
        torch.sub(theta, theta.amax(1, keepdim=True) if peak is None else peak, out=e)
        e.exp_()
        cum = torch.empty_like(e)
        cum[:, 0] = 0
        for k in range(1, bins):
            torch.add(cum[:, k - 1], e[:, k - 1], out=cum[:, k])
        total = cum[:, -1] + e[:, -1]  # (2, *batch), >= 1
        mins = torch.tensor([min_w, min_h], dtype=u.dtype, device=u.device).view(2, *ones)
        scale = (1 - bins * mins) / total  # knot_k = min * k + scale * cum_k
        # bin index: the number of interior knots at or below xi
        steps = torch.arange(1, bins, dtype=u.dtype, device=u.device).view(bins - 1, *ones)
        knots = torch.addcmul(steps * mins[row], cum[row, 1:], scale[row])
        # below[j] = [j < index], as numbers (the backward needs them); the last row stays 0
        below = torch.zeros((bins, *batch), dtype=u.dtype, device=u.device)
        torch.le(knots, xi, out=below[:-1])
        index8 = below.sum(0).to(torch.uint8)
        index = index8.long()
        select = index.expand(2, 1, *batch)
        e_bin = e.gather(1, select).squeeze(1)
        cum_bin = cum.gather(1, select).squeeze(1)
        left = torch.addcmul(mins * index8.to(u.dtype), cum_bin, scale)
        size = torch.addcmul(mins, e_bin, scale)
        # knot derivatives: softplus of the two interior ones in play, 1 at the boundaries
        if bins > 1:
            pair = torch.stack([(index - 1).clamp_(min=0), index.clamp(max=bins - 2)])
            theta_d = u[2 * bins :].gather(0, pair)
            if shift:
                theta_d = theta_d + shift
            # interior: 0 where the knot is a boundary knot (its derivative is fixed to 1)
            interior = torch.stack([index8 != 0, index8 != bins - 1]).to(u.dtype)
            deriv = torch.addcmul(1 - interior, F.softplus(theta_d).add_(min_d), interior)
        else:
            pair = theta_d = interior = torch.empty(0, device=u.device)
            deriv = torch.ones(2, *batch, dtype=u.dtype, device=u.device)
        ctx.save_for_backward(
            u, e, below, index, total, cum_bin, e_bin, scale, theta_d, pair, interior
        )
        return torch.cat([left, size, deriv])

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None, None
        u, e, below, index, total, cum_bin, e_bin, scale, theta_d, pair, interior = (
            ctx.saved_tensors
        )
        bins, batch = e.shape[1], index.shape
        # left = m k + c L / Z, size = m + c e_b / Z with L = sum_{j<k} e_j, Z = sum_j e_j:
        # d/dtheta_j = e_j (a [j < k] + b [j = k] - (a L + b e_b) / Z), a = c g_left / Z, ...
        a = grad[0:2] * scale
        b = grad[2:4] * scale
        centre = (a * cum_bin + b * e_bin) / total
        out = torch.empty_like(u)  # the layout of u: the gradient needs no transposition
        g_theta = out[: 2 * bins].unflatten(0, (2, bins))
        torch.mul(torch.addcmul(-centre.unsqueeze(1), below, a.unsqueeze(1)), e, out=g_theta)
        g_theta.scatter_add_(1, index.expand(2, 1, *batch), (b * e_bin).unsqueeze(1))
        if bins > 1:
            g_d = grad[4:6] * torch.sigmoid(theta_d) * interior
            out[2 * bins :].zero_().scatter_add_(0, pair, g_d)
        return out, None, None, None, None, None, None, None


def _spline(
    x: Tensor,
    u: Tensor,
    inverse: bool,
    bound: float,
    min_w: float,
    min_h: float,
    min_d: float,
    shift: float = 0.0,
    peak: float | None = None,
) -> tuple[Tensor, Tensor]:
    """The spline on inputs ``x`` ``(*batch)`` with parameter-major parameters ``u``
    ``(3K - 1, *batch)`` (any strides)."""
    xi = (x.clamp(-bound, bound) + bound) * (0.5 / bound)
    x0, y0, w, h, d0, d1 = _Bins.apply(
        u, xi, int(inverse), min_w, min_h, min_d, shift, peak
    ).unbind(0)
    s = h / w
    dd = d0 + d1
    c2 = torch.add(dd, s, alpha=-2)
    if inverse:
        # a t^2 + b t + c = 0 (Durkan et al., appendix A.3), every coefficient divided by
        # d0 + d1 + s so that b^2 cannot overflow however steep the knots (same root)
        norm = torch.reciprocal(dd + s)
        dy = (xi - y0) * norm
        hn = h * norm
        q = dy * c2
        a = torch.addcmul(q, hn, s - d0)
        b = torch.addcmul(-q, hn, d0)
        sd = s * dy  # = -c >= 0
        root = torch.addcmul(b * b, a, sd, value=4).clamp_min(0).sqrt()
        # the root in [0, 1] without cancellation: 2 sd / (b + root) where b >= 0, and
        # (root - b) / (2a) where b < 0 (then a > 0); the denominator is floored so that
        # neither branch can divide by zero, and the clamp only acts where rounding has erased
        # the equation (near-staircase knots)
        positive = b >= 0
        den = torch.where(positive, b + root, 2 * a).clamp_min(torch.finfo(b.dtype).tiny)
        t = (torch.where(positive, 2 * sd, root - b) / den).clamp(0.0, 1.0)
    else:
        t = (xi - x0) / w
    omt = 1 - t
    t1 = t * omt
    tt = t * t
    den = torch.addcmul(s, c2, t1)
    numer = torch.addcmul(torch.addcmul(d1 * tt, s, t1, value=2), d0, omt * omt)
    lad = torch.add(torch.log(numer), torch.log(s) - torch.log(den), alpha=2)
    if inverse:
        out, lad = torch.addcmul(x0, t, w), -lad
    else:
        out = torch.addcdiv(y0, h * torch.addcmul(s * tt, d0, t1), den)
    inside = (x > -bound) & (x < bound)
    y = torch.where(inside, out * (2 * bound) - bound, x)
    return y, torch.where(inside, lad, 0.0)


def _unconstrained(
    x: Tensor,
    u: Tensor,
    inverse: bool,
    bound: float,
    min_w: float,
    min_h: float,
    min_d: float,
    shift: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Broadcast ``x`` ``(*b)`` against ``u`` ``(*b, 3K - 1)`` and run the spline on a
    parameter-major view of ``u`` (no copy: the first pass over the logits writes contiguous
    storage, the backward writes the gradient in the layout of ``u``)."""
    shape = torch.broadcast_shapes(x.shape, u.shape[:-1])
    peak = None
    if u.device.type == "cpu" and u.numel():
        # one cheap pass over all the parameters instead of a max per row over strided logits:
        # if every logit lies within 0.4 of the exponent range of 0, the constant shift 0
        # serves every row (no overflow or underflow), and, being the same for every batch,
        # keeps each row's result independent of the rest of the batch
        lo, hi = torch.aminmax(u.detach())
        safe = -0.4 * math.log(torch.finfo(u.dtype).tiny)
        if -safe < float(lo) and float(hi) < safe:
            peak = 0.0
    u = u.expand(*shape, u.shape[-1]).movedim(-1, 0)
    return _spline(x.expand(shape), u, inverse, bound, min_w, min_h, min_d, shift, peak)


def rational_quadratic_spline(
    x: Tensor,
    unnormalized_widths: Tensor,
    unnormalized_heights: Tensor,
    unnormalized_derivatives: Tensor,
    *,
    inverse: bool = False,
    bound: float = 5.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    r"""The monotone rational-quadratic spline on :math:`[-B, B]` with identity tails.

    With :math:`K` bins, knots :math:`x_k = -B + \sum_{j<k} w_j`, :math:`y_k = -B +
    \sum_{j<k} h_j`, and, for :math:`x_k \le x < x_{k+1}`, :math:`\xi = (x - x_k)/w_k`,
    :math:`s_k = h_k / w_k`:

    .. math::
        y = y_k + \frac{h_k [s_k \xi^2 + \delta_k \xi(1-\xi)]}
                       {s_k + (\delta_{k+1} + \delta_k - 2 s_k)\xi(1-\xi)}, \qquad
        \log\frac{dy}{dx} = \log\frac{s_k^2 [\delta_{k+1}\xi^2 + 2 s_k \xi(1-\xi)
                                      + \delta_k (1-\xi)^2]}
                                     {[s_k + (\delta_{k+1} + \delta_k - 2 s_k)\xi(1-\xi)]^2},

    where :math:`w = 2B[m_w + (1 - K m_w)\operatorname{softmax}(\text{widths})]`,
    :math:`h` likewise, :math:`\delta_0 = \delta_K = 1` and
    :math:`\delta_k = m_\delta + \operatorname{softplus}(\text{derivatives}_{k-1})`. Outside
    :math:`(-B, B)` the map is the identity with log-derivative 0; with the boundary
    derivatives equal to 1 the whole map is :math:`C^1`. The inverse solves
    :math:`a\xi^2 + b\xi + c = 0` exactly, as :math:`\xi = 2c / (-b - \sqrt{b^2 - 4ac})`
    (Durkan et al., appendix A.3; no cancellation). Every real parameter value is valid and
    gives finite outputs and gradients, for inputs of any finite size (the spline is evaluated
    on the clamped input and the tails selected afterwards).

    Cost: :math:`O(K)` per entry in both directions (the bin is found by comparison with all
    knots, which is vectorised); both directions are exact and equally fast. Gradients are
    first-order only (the backward is hand-written; a double backward raises an error).

    Args:
        x: inputs, shape ``(*batch)``.
        unnormalized_widths: ``(*batch, K)``, leading dimensions broadcasting with ``x``.
        unnormalized_heights: ``(*batch, K)``.
        unnormalized_derivatives: ``(*batch, K - 1)``, the interior knot derivatives.
        inverse: compute the inverse map.
        bound: half-width :math:`B` of the spline's interval.
        min_bin_width: minimal bin width, as a fraction of :math:`2B` (``< 1/K``).
        min_bin_height: minimal bin height, as a fraction of :math:`2B` (``< 1/K``).
        min_derivative: minimal interior knot derivative.

    Returns:
        The output and the elementwise log-absolute-derivative of the direction computed,
        both of the broadcast batch shape.

    References:
        Durkan, Bekasov, Murray and Papamakarios (2019), "Neural Spline Flows",
        arXiv:1906.04304 (section 3.1; appendix A.3 for the inverse).
        Gregory and Delbourgo (1982), "Piecewise rational quadratic interpolation to monotonic
        data", IMA Journal of Numerical Analysis 2(2).

    Example:
        >>> x = torch.tensor([-7.0, -1.0, 0.5, 2.0], dtype=torch.float64)
        >>> w, h = torch.randn(2, 4, 8, dtype=torch.float64)
        >>> d = torch.randn(4, 7, dtype=torch.float64)
        >>> y, lad = rational_quadratic_spline(x, w, h, d)
        >>> x2, lad2 = rational_quadratic_spline(y, w, h, d, inverse=True)
        >>> bool(torch.allclose(x2, x, atol=1e-9)), bool(torch.allclose(lad, -lad2, atol=1e-9))
        (True, True)
        >>> y[0].item(), lad[0].item()  # identity tail
        (-7.0, 0.0)
    """
    for name, t in (
        ("x", x),
        ("unnormalized_widths", unnormalized_widths),
        ("unnormalized_heights", unnormalized_heights),
        ("unnormalized_derivatives", unnormalized_derivatives),
    ):
        if not isinstance(t, Tensor):
            raise PushforwardError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    widths, heights, derivs = unnormalized_widths, unnormalized_heights, unnormalized_derivatives
    bins = widths.shape[-1] if widths.dim() else 0
    if (
        widths.dim() == 0
        or bins < 1
        or heights.dim() == 0
        or heights.shape[-1] != bins
        or derivs.dim() == 0
        or derivs.shape[-1] != bins - 1
    ):
        raise PushforwardError(
            "rational_quadratic_spline: expected widths (..., K), heights (..., K) and "
            f"derivatives (..., K - 1) with K >= 1, got {shape_str(widths.shape)}, "
            f"{shape_str(heights.shape)} and {shape_str(derivs.shape)}"
        )
    _check_settings(bins, bound, min_bin_width, min_bin_height, min_derivative)
    try:
        batch = torch.broadcast_shapes(
            x.shape, widths.shape[:-1], heights.shape[:-1], derivs.shape[:-1]
        )
    except RuntimeError:
        raise PushforwardError(
            f"rational_quadratic_spline: input {shape_str(x.shape)} and parameters "
            f"{shape_str(widths.shape)}, {shape_str(heights.shape)}, {shape_str(derivs.shape)} "
            "do not broadcast"
        ) from None
    u = torch.cat([t.expand(*batch, t.shape[-1]) for t in (widths, heights, derivs)], -1)
    return _unconstrained(
        x, u, inverse, float(bound), min_bin_width, min_bin_height, min_derivative
    )


class RQSplineTransformer(Transformer):
    r"""The monotone rational-quadratic spline of :func:`rational_quadratic_spline` as an
    elementwise transformer for coupling and autoregressive structures (neural spline flows).

    .. math::
        x = \mathrm{RQS}_{\theta}(z) \text{ on } [-B, B], \quad x = z \text{ outside}, \qquad
        \log\frac{dx}{dz} = \log\frac{s_k^2 [\delta_{k+1}\xi^2 + 2 s_k \xi(1-\xi)
                                     + \delta_k (1-\xi)^2]}
                                    {[s_k + (\delta_{k+1} + \delta_k - 2 s_k)\xi(1-\xi)]^2}

    ``params`` has shape ``(*batch, features, 3K - 1)``: the :math:`K` unnormalised widths, the
    :math:`K` unnormalised heights, then the :math:`K - 1` unnormalised interior derivatives,
    which enter shifted so that zero means slope 1:
    :math:`\delta = m_\delta + \operatorname{softplus}(\theta^\delta + c)`,
    :math:`c = \log(e^{1 - m_\delta} - 1)`. So :meth:`identity_params` is all zeros (exact in
    every dtype): equal bins and unit derivatives, the identity map to rounding (:math:`|x - z|`
    of a few ulp of :math:`B`).

    Cost: :math:`O(K)` per entry in both directions, both exact and equally fast (about 5 ms
    forward plus backward for ``(512, 43)`` entries and 8 bins on one CPU core; see the module
    docstring). ``params`` may have any layout (feature-major, as a MADE gives them, or a
    transposed view); the gradient comes back in that layout.

    Args:
        bins: number :math:`K` of bins.
        bound: half-width :math:`B` of the interval where the spline acts.
        min_bin_width: minimal bin width (fraction of :math:`2B`).
        min_bin_height: minimal bin height (fraction of :math:`2B`).
        min_derivative: minimal interior knot derivative.

    References:
        Durkan, Bekasov, Murray and Papamakarios (2019), "Neural Spline Flows",
        arXiv:1906.04304.

    Example:
        >>> tr = RQSplineTransformer(bins=8)
        >>> params = torch.randn(5, 3, tr.params_per_feature)
        >>> x, lad = tr(torch.randn(5, 3), params)
        >>> z, lad_inv = tr.inverse(x, params)
        >>> x.shape, lad.shape
        (torch.Size([5, 3]), torch.Size([5, 3]))
        >>> ident = tr.identity_params().expand(5, 3, -1)
        >>> z = torch.randn(5, 3)
        >>> bool(torch.allclose(tr(z, ident)[0], z, atol=1e-5))
        True
    """

    def __init__(
        self,
        bins: int = 8,
        bound: float = 5.0,
        *,
        min_bin_width: float = 1e-3,
        min_bin_height: float = 1e-3,
        min_derivative: float = 1e-3,
    ):
        super().__init__()
        self.bins = check_positive_int(bins, "bins")
        _check_settings(self.bins, bound, min_bin_width, min_bin_height, min_derivative)
        if not min_derivative < 1:
            raise PushforwardError(
                f"min_derivative must be below 1 (the identity has slope 1), got {min_derivative!r}"
            )
        self.bound = float(bound)
        self.min_bin_width = float(min_bin_width)
        self.min_bin_height = float(min_bin_height)
        self.min_derivative = float(min_derivative)
        self.params_per_feature = 3 * self.bins - 1
        # derivative parameters are shifted so that 0 gives slope 1 (softplus(shift) = 1 - m)
        self._shift = math.log(math.expm1(1.0 - self.min_derivative))

    def identity_params(self) -> Tensor:
        """All zeros: equal widths and heights, interior derivatives 1 (the identity map)."""
        return torch.zeros(self.params_per_feature)

    def _check(self, v: Tensor, params: Tensor) -> None:
        if not isinstance(params, Tensor) or params.dim() < 2:
            got = shape_str(params.shape) if isinstance(params, Tensor) else type(params).__name__
            raise PushforwardError(
                f"spline params: expected shape (batch, features, {self.params_per_feature}), "
                f"got {got}"
            )
        if params.shape[-1] != self.params_per_feature:
            raise PushforwardError(
                f"spline params: expected shape (batch, features, {self.params_per_feature}), "
                f"got {shape_str(params.shape)}"
            )

    def _map(self, v: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        self._check(v, params)
        try:
            return _unconstrained(
                v,
                params,
                inverse,
                self.bound,
                self.min_bin_width,
                self.min_bin_height,
                self.min_derivative,
                self._shift,
            )
        except RuntimeError as err:
            if "broadcast" not in str(err) and "shape" not in str(err):
                raise
            raise PushforwardError(
                f"spline: input {shape_str(v.shape)} does not match params "
                f"{shape_str(params.shape)}"
            ) from None

    def forward(self, z: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return self._map(z, params, inverse=False)

    def inverse(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return self._map(x, params, inverse=True)

    def extra_repr(self) -> str:
        return f"bins={self.bins}, bound={self.bound:g}"
