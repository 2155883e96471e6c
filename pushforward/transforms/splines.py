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

Implementation (speed): the whole spline is one autograd function with a hand-written
backward. The forward runs without autograd: the parameters are moved once to a bin-major,
contiguous layout ``(K, 2, *batch)`` (where they come as a transposed contiguous matrix, as a
network gives them, by one row selection from its transpose, faster than a strided copy;
laid out feature-major, as a MADE's transposed output, they are read in place, the batch taken
in that order), so that every step of the cumulative sums is one contiguous pass; the bin is
found by comparison with all knots (no ``searchsorted``); only the selected bin's knots, sizes
and two knot derivatives are gathered, and the rational-quadratic arithmetic runs on those
``(*batch)`` tensors alone. The backward is the chain rule written out per entry (the inverse
by implicit differentiation of the forward map at the root), then the softmax, cumulative-sum
and gather steps in two passes over the parameters, and the move back to their layout: a few
dozen operations where autograd would record well over a hundred. Tails are selected with
``where`` (the spline is evaluated on the clamped input), never by boolean indexing. On 3,072
entries each operation costs about as much as its arithmetic, so the scalars of the arithmetic
are cached 0-dim tensors (an operation with a Python number wraps and converts it first) and
the backward reuses the forward's per-entry products.

Compiled path (the CPU, float32 and float64): everything between the exponentials of the bin
logits, the softplus of the derivative logits and the final logarithms (which stay vectorised
PyTorch calls) runs as one compiled pass per direction, ``pushforward/csrc/rqspline.cpp``
(built on first use, see :mod:`pushforward.native`): the same formulas, vectorised over
blocks of entries, the bin selected by comparisons and blends. Its backward recomputes the
per-entry quantities instead of saving them. One deliberate difference: the inverse's
quadratic coefficients and discriminant take their products exactly (fused multiply-adds),
which is at least as accurate. The PyTorch path above is the reference (and the path on other
devices, without a compiler, or with ``PUSHFORWARD_NATIVE=0``); the tests run every spline
test on both.
"""

from __future__ import annotations

import ctypes
import functools
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx

from .. import native
from ..core import PushforwardError, Transformer, check_positive_int, shape_str
from ..numerics import under_functorch

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


def _native(u: Tensor) -> Tensor | None:
    """``u`` ``(P, *batch)`` as the contiguous matrix ``(prod(batch), P)`` whose transpose it
    is, where it is one (and not empty), else ``None``."""
    if not u.numel():
        return None
    native = u.movedim(0, -1)
    return native.view(-1, u.shape[0]) if native.is_contiguous() else None


def _exact_products(u: Tensor) -> bool:
    """Whether matrix products of ``u``'s dtype on its device are exact IEEE products (then a
    product with the identity moves values without rounding): the CPU, float32 or float64,
    and no reduced-precision float32 products (bf16, tf32) allowed."""
    if u.device.type != "cpu" or u.dtype not in (torch.float32, torch.float64):
        return False
    if u.dtype == torch.float32:
        onednn = getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", "none")
        return torch.get_float32_matmul_precision() == "highest" and onednn in ("none", "ieee")
    return True


class _Constants(NamedTuple):
    mins: Tensor  # (2,): the minimal bin width and height, as fractions of the interval
    free: Tensor  # (2,): 1 - K * mins, the share of the interval the softmaxes distribute
    steps: Tensor  # (2, K - 1): mins * k for the interior knots k = 1..K-1
    pair: Tensor  # (2,) int64: -1, 0 (bin k uses the interior derivatives k - 1 and k)
    # (3K - 1,) int64: the rows of u in bin-major order, (width, height) of bin 0, of bin 1,
    # ..., then the derivatives
    order: Tensor
    identity: Tensor  # (3K - 1, 3K - 1): the backward's transposition as a product
    rows: Tensor  # (3K - 1,) int64: the rows of u in their own order
    # (11,): the compiled kernel's settings: B, 2B, 1 / (2B), the minimal width and height,
    # their free shares, the minimal derivative, the smallest normal number, and the range
    # (exp(-safe), exp(safe)) where the normalisers must lie for the shared shift 0
    settings: Tensor
    # 0-dim tensors of the dtype for the scalars of the arithmetic: an operation with a Python
    # number first wraps it in a tensor and converts that (a second allocation and copy)
    zero: Tensor
    one: Tensor
    two: Tensor
    bound: Tensor  # B
    width: Tensor  # 2 B
    unit: Tensor  # 1 / (2 B)
    min_d: Tensor
    shift: Tensor
    tiny: Tensor  # the smallest normal number


@functools.cache
def _constants(*key: Any) -> _Constants:
    """Per-setting constant tensors, made once (never written to), for
    ``(bins, bound, min_w, min_h, min_d, shift, dtype, device)``. Made outside inference mode
    (inference tensors could not be saved by the differentiable path's autograd); under a
    ``torch.func`` transform, where every new tensor is wrapped for that call only, use
    :func:`_make_constants` instead."""
    with torch.inference_mode(False):
        return _make_constants(*key)


def _make_constants(
    bins: int,
    bound: float,
    min_w: float,
    min_h: float,
    min_d: float,
    shift: float,
    dtype: torch.dtype,
    device: torch.device,
) -> _Constants:
    """The constant tensors of :func:`_constants`, made afresh."""
    mins = torch.tensor([min_w, min_h], dtype=dtype, device=device)
    steps = torch.arange(1, bins, dtype=dtype, device=device)
    order = torch.cat(
        [torch.arange(2 * bins).view(2, bins).t().flatten(), torch.arange(2 * bins, 3 * bins - 1)]
    ).to(device)

    def scalar(value: float) -> Tensor:
        return torch.tensor(value, dtype=dtype, device=device)

    free = 1 - bins * mins
    scalars = [scalar(v) for v in (0.0, 1.0, 2.0, bound, 2 * bound, 0.5 / bound, min_d, shift)]
    scalars.append(scalar(torch.finfo(dtype).tiny))
    safe = _safe_exponent(dtype)
    extra = torch.tensor([math.exp(-safe), math.exp(safe)], dtype=dtype, device=device)
    settings = torch.cat(
        [torch.stack([*scalars[3:6], *mins, *free, scalars[6], scalars[8]]), extra]
    )
    return _Constants(
        mins,
        free,
        mins[:, None] * steps,
        torch.tensor([-1, 0], device=device),
        order,
        torch.eye(3 * bins - 1, dtype=dtype, device=device),
        torch.arange(3 * bins - 1, device=device),
        settings,
        *scalars,
    )


def _safe_exponent(dtype: torch.dtype) -> float:
    """The shared shift 0 serves a row whose normaliser lies in ``(exp(-safe), exp(safe))``."""
    return 0.4 * -math.log(torch.finfo(dtype).tiny)


#: the compiled forward (returns the number of rows the shared shift 0 does not serve) and
#: backward
_Kernels = tuple[Callable[..., int], Callable[..., None]]
_KERNEL_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


@functools.cache
def _bind(lib: ctypes.CDLL, dtype: torch.dtype) -> _Kernels:
    """The compiled forward and backward of ``lib`` for ``dtype``, with their signatures."""
    suffix = _KERNEL_SUFFIX[dtype]
    n, ptr, flag = ctypes.c_long, ctypes.c_void_p, ctypes.c_int
    fwd = getattr(lib, f"rqspline_forward_{suffix}")
    fwd.argtypes = [n, n, ptr, ptr, ptr, ptr, ptr, flag, ptr]
    fwd.restype = n
    bwd = getattr(lib, f"rqspline_backward_{suffix}")
    bwd.argtypes = [n, n, ptr, ptr, ptr, ptr, ptr, ptr, ptr, flag, ptr]
    bwd.restype = None
    return fwd, bwd


def _pointers(*tensors: Tensor) -> list[int]:
    """The data pointers of contiguous tensors, for the compiled kernel (which reads and writes
    them as dense row-major arrays: any other layout would be read out of bounds)."""
    for t in tensors:
        if not t.is_contiguous():
            raise RuntimeError("internal error: the spline kernel needs contiguous tensors")
    return [t.data_ptr() for t in tensors]


def _kernels(u: Tensor, x: Tensor) -> _Kernels | None:
    """The compiled kernel pair for ``u``'s dtype, where it can run (``u`` and ``x`` on the
    CPU, of one dtype, float32 or float64, not empty, a compiler found; see
    :mod:`pushforward.native`), else ``None``."""
    if (
        u.device.type != "cpu"
        or x.device != u.device
        or u.dtype not in _KERNEL_SUFFIX
        or x.dtype != u.dtype
        or not x.numel()
    ):
        return None
    lib = native.library("rqspline")
    return None if lib is None else _bind(lib, u.dtype)


class _Entry(NamedTuple):
    """Per-entry quantities of the selected bin (unit coordinates) that the backward needs."""

    w: Tensor
    h: Tensor
    d0: Tensor
    d1: Tensor
    s: Tensor  # h / w
    c2: Tensor  # d0 + d1 - 2 s
    t: Tensor  # the position in the bin, in [0, 1]
    omt: Tensor  # 1 - t
    t1: Tensor  # t (1 - t)
    tt: Tensor  # t^2
    den: Tensor  # s + c2 t (1 - t)
    numer: Tensor  # d1 t^2 + 2 s t (1 - t) + d0 (1 - t)^2
    shape_a: Tensor  # s t^2 + d0 t (1 - t)
    inside: Tensor  # |x| < B


def _rq_forward(
    x: Tensor,
    xi: Tensor,
    x0: Tensor,
    y0: Tensor,
    w: Tensor,
    h: Tensor,
    d0: Tensor,
    d1: Tensor,
    inverse: bool,
    c: _Constants,
) -> tuple[Tensor, Tensor, _Entry]:
    """The rational-quadratic map of the selected bin, in unit coordinates: ``(y, lad)`` and
    what the backward needs."""
    s = h / w
    dd = d0 + d1
    c2 = torch.add(dd, s, alpha=-2)
    if inverse:
        # a t^2 + b t + c = 0 (Durkan et al., appendix A.3), every coefficient divided by
        # d0 + d1 + s so that b^2 cannot overflow however steep the knots (same root)
        norm = torch.reciprocal(dd + s)
        dy = (xi - y0).mul_(norm)
        hn = h * norm
        q = dy * c2
        a = torch.addcmul(q, hn, s - d0)
        b = torch.addcmul(-q, hn, d0)
        sd = s * dy  # = -c >= 0
        root = torch.addcmul(b * b, a, sd, value=4).clamp_min_(0).sqrt_()
        # the root in [0, 1] without cancellation: 2 sd / (b + root) where b >= 0, and
        # (root - b) / (2a) where b < 0 (then a > 0); the denominator is floored so that
        # neither branch can divide by zero, and the clamp only acts where rounding has
        # erased the equation (near-staircase knots)
        positive = b >= 0
        den = torch.where(positive, b + root, a + a).clamp_min_(c.tiny)
        t = (torch.where(positive, sd + sd, root - b) / den).clamp_(0.0, 1.0)
    else:
        # clamped like the root: where rounding puts xi a hair outside the bin found for
        # it, t outside [0, 1] would make den negative next to steep knots (NaN)
        t = ((xi - x0) / w).clamp_(0.0, 1.0)
    omt = c.one - t
    t1 = t * omt
    tt = t * t
    den = torch.addcmul(s, c2, t1)
    numer = torch.addcmul(torch.addcmul(d1 * tt, s, t1, value=2), d0, omt * omt)
    # log(s^2 numer / den^2) with two logarithms: den >= s (1 - 2 t (1 - t)) >= s / 2, so the
    # ratio s / den lies in (0, 2]; the product of all three could underflow where the knot
    # derivatives dwarf the bin's slope s, s numer / den stays near min(s, d0, d1) or above
    ratio = s / den
    lad = torch.log(numer * ratio).add_(torch.log(ratio))
    shape_a = torch.addcmul(s * tt, d0, t1)  # y = y0 + h A / den
    if inverse:
        out = torch.addcmul(x0, t, w)
        lad.neg_()
    else:
        out = torch.addcdiv(y0, h * shape_a, den)
    inside = x.abs() < c.bound
    y = torch.where(inside, out.mul_(c.width).sub_(c.bound), x)
    lad = torch.where(inside, lad, c.zero)
    return y, lad, _Entry(w, h, d0, d1, s, c2, t, omt, t1, tt, den, numer, shape_a, inside)


def _rq_backward(
    grad_y: Tensor,
    grad_lad: Tensor,
    q: _Entry,
    inverse: bool,
    c: _Constants,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The per-entry chain rule of :func:`_rq_forward`: the gradients ``a`` with respect to
    the bin's left knots ``(x0, y0)`` and ``b`` to its sizes ``(w, h)``, ``(2, *batch)`` each,
    to its knot derivatives ``(d0, d1)``, and to the unit input ``xi`` (inside the interval)."""
    w, h, d0, d1, s, c2, t, omt, t1, tt, den, numer, shape_a, inside = q
    go = torch.where(inside, grad_y, c.zero).mul_(c.width)  # with respect to the unit output
    # with respect to the forward map's log-derivative
    gl = torch.where(inside, grad_lad.neg() if inverse else grad_lad, c.zero)
    # partial derivatives of y_unit = y0 + h A / den and of l = log s^2 numer / den^2 at
    # fixed t, in the bin's own quantities (those of d0 and d1 stacked)
    rd = torch.reciprocal(den)
    rn = torch.reciprocal(numer)
    hr = h * rd
    ya = shape_a * rd  # A / den = dy/dh
    v1 = torch.add(c.one, t1, alpha=-2)  # d den / d s
    y_s = hr * torch.addcmul(tt, ya, v1, value=-1)
    hrt1 = hr * t1
    y_d = torch.stack([hrt1 - hrt1 * ya, -hrt1 * ya])
    y_t = hr * rd * s * numer  # > 0: w times the slope
    l_s = torch.reciprocal(s).mul_(c.two).add_(rn * t1, alpha=2).sub_(v1 * rd, alpha=2)
    l_d = torch.stack([omt * omt, tt]).mul_(rn).sub_(t1 * rd, alpha=2)
    u1 = torch.add(c.one, t, alpha=-2)
    l_t = (d1 * t + s * u1 - d0 * omt).mul_(rn).sub_(c2 * u1 * rd).mul_(c.two)
    if inverse:
        # t is the root of y_unit(t) = xi: dt = (dxi - dy0 - y_v dv) / y_t
        g_xi = torch.addcmul(gl * l_t, go, w).div_(y_t)
        p = -g_xi  # the weight of the partial derivatives of y_unit
    else:
        p = go
        g_t = torch.addcmul(go * y_t, gl, l_t)  # t = (xi - x0) / w
        g_xi = g_t / w
    g_s = torch.addcmul(p * y_s, gl, l_s)
    g_d = torch.addcmul(p * y_d, gl, l_d)
    # a = (g_x0, g_y0), b = (g_w, g_h)
    g_sw = g_s * s / w
    if inverse:
        a = torch.stack([go, p])
        b = torch.stack([torch.addcmul(-g_sw, go, t), torch.addcmul(g_s / w, p, ya)])
    else:
        a = torch.stack([-g_xi, go])
        b = torch.stack([torch.addcmul(-g_sw, g_xi, t, value=-1), torch.addcmul(g_s / w, p, ya)])
    return a, b, g_d, g_xi


class _Spline(torch.autograd.Function):
    """The whole spline, ``(u, x) -> (y, lad)``, with a hand-written backward.

    ``u``: ``(3K - 1, *batch)`` unnormalised parameters, any strides (rows: widths, heights,
    interior derivatives; the gradient is returned in the same layout), ``x``: ``(*batch)``.
    ``shared``: try the common shift 0 for every logit (kept if every row's normaliser lies
    well inside the exponent range, else each row is shifted by its own maximum). The forward
    runs without autograd (a handful of passes over the parameters, then arithmetic on the
    selected bin only); the backward is the exact first-order gradient: the per-entry chain
    rule written out (the inverse by implicit differentiation of the forward map at the root),
    then the softmax, cumulative-sum and gather steps in one pass over the parameters. The
    bin index is piecewise constant and gets no gradient. On the CPU the compiled kernel does
    the same (:meth:`compiled_forward`, :meth:`compiled_backward`) where it is available.
    Under ``create_graph`` the backward is autograd's through :func:`_differentiable_spline`
    (:meth:`differentiable_backward`), so that higher derivatives are exact.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        u: Tensor,
        x: Tensor,
        inverse: bool,
        bound: float,
        min_w: float,
        min_h: float,
        min_d: float,
        shift: float,
        shared: bool,
    ) -> tuple[Tensor, Tensor]:
        bins = (u.shape[0] + 1) // 3
        batch = x.shape
        ones = (1,) * len(batch)
        dtype, device = u.dtype, u.device
        c = _constants(bins, bound, min_w, min_h, min_d, shift, dtype, device)
        kernels = _kernels(u, x)
        if kernels is not None:
            return _Spline.compiled_forward(ctx, kernels, u, x, inverse, shift, c)
        ctx.kernels = None
        xi = x.clamp(-bound, bound).add_(c.bound).mul_(c.unit)
        # unnormalised bin sizes e = exp(theta - shift) and their exclusive cumulative sums,
        # contiguous and bin-major, (bin, width or height, *batch), whatever the layout of u,
        # so that each step of the cumulative sum is one contiguous pass
        theta = u[: 2 * bins].unflatten(0, (2, bins)).transpose(0, 1)
        # where u is a transposed contiguous matrix (the parameters as a network gives them),
        # the transposition and the reordering to bin-major rows are one row selection from
        # its transpose, faster than a strided copy
        native = _native(u)
        if native is not None:
            moved = native.t().index_select(0, c.order)
            e = moved[: 2 * bins].view(bins, 2, *batch)
            logits_d = moved[2 * bins :].view(bins - 1, *batch)
        else:
            e = torch.empty((bins, 2, *batch), dtype=dtype, device=device)
            logits_d = u[2 * bins :]
        cum = torch.empty_like(e)

        def normalise(per_row: bool) -> Tensor:
            if per_row:
                torch.sub(theta, theta.amax(0, keepdim=True), out=e).exp_()
            elif native is None:
                torch.exp(theta, out=e)
            else:
                e.exp_()
            cums, es = cum.unbind(0), e.unbind(0)
            cums[0].zero_()
            for k in range(1, bins):
                torch.add(cums[k - 1], es[k - 1], out=cums[k])
            return cums[-1] + es[-1]  # (2, *batch)

        total = normalise(not shared)
        if shared and total.numel():
            # the shift 0 serves every row if every normaliser sum(exp(theta)) lies well
            # inside the exponent range (no overflow; what underflows is negligible against
            # the sum); one decision for the whole batch, on a condition that, being met
            # by each row, keeps each row's result independent of the rest of the batch
            lo, hi = torch.aminmax(total)
            safe = _safe_exponent(dtype)
            if not (math.exp(-safe) < float(lo) and float(hi) < math.exp(safe)):
                total = normalise(True)
        mins = c.mins.view(2, *ones)
        scale = c.free.view(2, *ones) / total  # knot_k = min * k + scale * cum_k
        # bin index: the number of interior knots at or below xi (searched on the input
        # knots for the forward map, on the output knots for the inverse)
        row = int(inverse)
        # below[j] = [j < index], as numbers (the backward needs them); the last row stays 0;
        # the knots are written where the comparisons then go
        below = torch.empty((bins, *batch), dtype=dtype, device=device)
        below[-1].zero_()
        steps = c.steps[row].view(bins - 1, *ones)
        knots = torch.addcmul(steps, cum[1:, row], scale[row], out=below[:-1])
        torch.le(knots, xi, out=knots)
        index_f = below.sum(0)
        index = index_f.long()
        select = index.expand(1, 2, *batch)
        e_bin = e.gather(0, select).squeeze(0)
        cum_bin = cum.gather(0, select).squeeze(0)
        x0, y0 = torch.addcmul(mins * index_f, cum_bin, scale).unbind(0)
        w, h = torch.addcmul(mins, e_bin, scale).unbind(0)
        # knot derivatives: softplus of the two interior ones in play, 1 at the boundaries
        if bins > 1:
            # interior derivatives k - 1 and k; interior: whether each is one (the boundary
            # knots' derivatives are fixed to 1)
            wanted = index + c.pair.view(2, *ones)
            pair = wanted.clamp(0, bins - 2)
            interior = pair == wanted
            theta_d = logits_d.gather(0, pair)
            if shift:
                theta_d += c.shift
            d0, d1 = torch.where(interior, F.softplus(theta_d).add_(c.min_d), c.one)
        else:
            pair = theta_d = interior = torch.empty(0, device=device)
            d0 = d1 = torch.ones(batch, dtype=dtype, device=device)
        y, lad, entry = _rq_forward(x, xi, x0, y0, w, h, d0, d1, inverse, c)
        # all through save_for_backward (saved-tensor hooks, such as checkpointing or
        # offloading, then see them; on ctx they would save 3 µs a call)
        ctx.save_for_backward(
            u, x, e, below, index, total, cum_bin, e_bin, scale, theta_d, pair, interior, *entry
        )
        ctx.inverse, ctx.constants, ctx.native = inverse, c, native is not None
        return y, lad

    @staticmethod
    def compiled_forward(
        ctx: FunctionCtx,
        kernels: _Kernels,
        u: Tensor,
        x: Tensor,
        inverse: bool,
        shift: float,
        c: _Constants,
    ) -> tuple[Tensor, Tensor]:
        """The forward by the compiled kernel (``pushforward/csrc/rqspline.cpp``): the same
        arithmetic in one pass over contiguous parameter rows; the exponentials, softplus and
        logarithms stay vectorised PyTorch calls."""
        bins, batch, n = (u.shape[0] + 1) // 3, x.shape, x.numel()
        native_u = _native(u)
        dtype, device = u.dtype, u.device
        if native_u is not None:
            # the parameters as a network gives them: one row selection from the transpose
            # (see the reference path), a copy that is ours to overwrite
            rows = native_u.t().index_select(0, c.rows)
            e = rows[: 2 * bins].exp_()
            theta_d = rows[2 * bins :]
        else:
            # any other layout (a MADE's transposed output is (features, P, rows) in memory):
            # the exponentials read it in place and write contiguous rows
            e = torch.empty((2 * bins, *batch), dtype=dtype, device=device)
            torch.exp(u[: 2 * bins], out=e)
            e = e.view(2 * bins, n)
            theta_d = u[2 * bins :]
        if shift:
            theta_d = torch.add(
                theta_d,
                c.shift,
                out=torch.empty_like(theta_d, memory_format=torch.contiguous_format),
            )
        theta_d = theta_d.reshape(bins - 1, n).contiguous()
        sp = F.softplus(theta_d)
        xc = x.contiguous()
        y, logs = torch.empty((3, n), dtype=dtype, device=device).split([1, 2])

        def run(e: Tensor) -> int:
            pointers = _pointers(e, sp, xc, y, logs)
            return kernels[0](n, bins, *pointers, int(inverse), c.settings.data_ptr())

        # the shift 0 serves every row if every normaliser lies well inside the exponent
        # range (see the reference path; the kernel counts those that do not); else each row
        # is shifted by its own maximum
        if run(e):
            theta = u[: 2 * bins].unflatten(0, (2, bins))
            e = torch.empty((2, bins, *batch), dtype=dtype, device=device)
            torch.sub(theta, theta.amax(1, keepdim=True), out=e).exp_()
            e = e.view(2 * bins, n)
            run(e)
        lg = logs.log_()
        lad = torch.add(lg[0], lg[1])
        if inverse:
            lad.neg_()
        ctx.save_for_backward(u, x, e, sp, theta_d, xc)
        ctx.kernels, ctx.inverse, ctx.constants = kernels, inverse, c
        ctx.native = native_u is not None
        return y.view(batch), lad.view(batch)

    @staticmethod
    def compiled_backward(
        ctx: FunctionCtx, grad_y: Tensor | None, grad_lad: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        """The backward by the compiled kernel: it recomputes the bin and the per-entry
        quantities from the exponentiated logits instead of saving them."""
        u, _, e, sp, theta_d, xc = ctx.saved_tensors
        c, n = ctx.constants, xc.numel()
        bins = (u.shape[0] + 1) // 3
        gy = xc.new_zeros(n) if grad_y is None else grad_y.reshape(n).contiguous()
        gl = xc.new_zeros(n) if grad_lad is None else grad_lad.reshape(n).contiguous()
        grad = torch.empty((u.shape[0], n), dtype=u.dtype, device=u.device)
        grad_x = torch.empty_like(xc)
        pointers = _pointers(e, sp, xc, gy, gl, grad, grad_x)
        ctx.kernels[1](n, bins, *pointers, int(ctx.inverse), c.settings.data_ptr())
        if bins > 1:
            grad[2 * bins :].mul_(torch.sigmoid(theta_d))
        grad_x = grad_x.view(xc.shape) if ctx.needs_input_grad[1] else None
        grad_u = _to_layout(grad, u, ctx.native, c) if ctx.needs_input_grad[0] else None
        return (grad_u, grad_x, *(None,) * 7)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad_y: Tensor | None, grad_lad: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():
            # create_graph (a Hessian, a gradient penalty): the hand-written gradient would be
            # a constant to autograd, and every higher derivative through it silently 0
            return _Spline.differentiable_backward(ctx, grad_y, grad_lad)
        if ctx.kernels is not None:
            return _Spline.compiled_backward(ctx, grad_y, grad_lad)
        u, _, e, below, index, total, cum_bin, e_bin, scale, theta_d, pair, interior, *rest = (
            ctx.saved_tensors
        )
        entry = _Entry(*rest)
        inverse, c = ctx.inverse, ctx.constants
        nones = (None,) * 7
        if grad_y is None:
            grad_y = torch.zeros_like(entry.t)
        if grad_lad is None:
            grad_lad = torch.zeros_like(entry.t)
        a, b, g_d, g_xi = _rq_backward(grad_y, grad_lad, entry, inverse, c)
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = torch.where(entry.inside, g_xi * c.unit, grad_y)
        if not ctx.needs_input_grad[0]:
            return (None, grad_x, *nones)
        bins, batch = e.shape[0], index.shape
        # left = m k + c L / Z, size = m + c e_b / Z with L = sum_{j<k} e_j, Z = sum_j e_j:
        # d/dtheta_j = e_j (a [j < k] + b [j = k] - (a L + b e_b) / Z), a = c g_left / Z, ...
        a.mul_(scale)
        b.mul_(scale)
        centre = (a * cum_bin + b * e_bin) / total
        # computed parameter-major and contiguous (the rows of u), then copied once into the
        # layout of u
        grad = torch.empty((3 * bins - 1, *batch), dtype=e.dtype, device=e.device)
        g_theta = grad[: 2 * bins].view(2, bins, *batch).transpose(0, 1)  # indexed as e
        torch.addcmul(-centre, below.unsqueeze(1), a, out=g_theta)
        g_theta.mul_(e)
        g_theta.scatter_add_(0, index.expand(1, 2, *batch), (b * e_bin).unsqueeze(0))
        if bins > 1:
            g_d.mul_(torch.sigmoid(theta_d)).mul_(interior)
            grad[2 * bins :].zero_().scatter_add_(0, pair, g_d)
        return (_to_layout(grad, u, ctx.native, c), grad_x, *nones)

    @staticmethod
    def differentiable_backward(
        ctx: FunctionCtx, grad_y: Tensor | None, grad_lad: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        """The backward under ``create_graph``: the spline evaluated again by differentiable
        operations (:func:`_differentiable_spline`) from the saved inputs, and its gradient
        taken with a graph, so that derivatives of every order are exact."""
        u, x = ctx.saved_tensors[:2]
        needs = ctx.needs_input_grad[:2]
        with torch.enable_grad():
            y, lad = _differentiable_spline(u, x, ctx.inverse, ctx.constants)
            given = [(o, g) for o, g in ((y, grad_y), (lad, grad_lad)) if g is not None]
            wanted = [t for t, need in zip((u, x), needs) if need]
            found = torch.autograd.grad(
                [o for o, _ in given],
                wanted,
                [g for _, g in given],
                create_graph=True,
                allow_unused=True,
            )
        # zeros, not None, for an input nothing depends on (every entry in the tails)
        grads = iter(torch.zeros_like(t) if g is None else g for g, t in zip(found, wanted))
        return (*(next(grads) if need else None for need in needs), *(None,) * 7)


def _differentiable_spline(
    u: Tensor, x: Tensor, inverse: bool, c: _Constants
) -> tuple[Tensor, Tensor]:
    """The spline of :class:`_Spline` (``u`` ``(3K - 1, *batch)``, ``x`` ``(*batch)``) in plain
    differentiable PyTorch operations: slower and heavier than the hand-written passes, used
    only where a graph of the gradient is wanted. Same knots, bin search and per-entry map
    (:func:`_rq_forward`), so the same values up to rounding."""
    bins, ones = (u.shape[0] + 1) // 3, (1,) * x.dim()
    # bin sizes in unit coordinates, (2, K, *batch): widths and heights
    sizes = torch.softmax(u[: 2 * bins].unflatten(0, (2, bins)), dim=1)
    sizes = c.mins.view(2, 1, *ones) + c.free.view(2, 1, *ones) * sizes
    left = torch.cumsum(sizes, dim=1) - sizes  # the left knots
    xi = (x.clamp(-c.bound, c.bound) + c.bound) * c.unit
    row = int(inverse)
    index = (left[row, 1:] <= xi).sum(0)  # interior knots at or below xi
    select = index.expand(2, 1, *index.shape)
    x0, y0 = left.gather(1, select).squeeze(1).unbind(0)
    w, h = sizes.gather(1, select).squeeze(1).unbind(0)
    # knot derivatives 1, min_d + softplus(theta + shift) for the interior knots, 1
    boundary = torch.ones((1, *x.shape), dtype=u.dtype, device=u.device)
    d = torch.cat([boundary, F.softplus(u[2 * bins :] + c.shift) + c.min_d, boundary])
    d0 = d.gather(0, index.unsqueeze(0)).squeeze(0)
    d1 = d.gather(0, (index + 1).unsqueeze(0)).squeeze(0)
    y, lad, _ = _rq_forward(x, xi, x0, y0, w, h, d0, d1, inverse, c)
    return y, lad


def _to_layout(grad: Tensor, u: Tensor, native: bool, c: _Constants) -> Tensor:
    """The gradient ``grad``, computed parameter-major and contiguous (the rows of ``u``),
    in the layout of ``u`` (``native``: ``u`` is a transposed contiguous matrix)."""
    if not native:
        if u.is_contiguous():
            return grad.view(u.shape)
        return torch.empty_like(u).copy_(grad.view(u.shape))
    shape = u.movedim(0, -1).shape
    out = torch.empty(shape, dtype=grad.dtype, device=grad.device)
    g = grad.view(u.shape[0], -1).t()
    if _exact_products(g):
        # the transposition as a product with the identity, which BLAS does in cache-sized
        # blocks: as fast as a strided copy on a few thousand entries, faster on tens of
        # thousands (512 x 43 x 23 parameters: the backward 2.5 -> 2.0 ms)
        torch.mm(g, c.identity, out=out.view(-1, shape[-1]))
    else:
        out.view(-1, shape[-1]).copy_(g)
    return out.movedim(-1, 0)


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
    storage, the backward writes the gradient in the layout of ``u``). Inputs and parameters
    of two dtypes are both computed in the promoted one."""
    if x.dtype != u.dtype:
        common = torch.promote_types(x.dtype, u.dtype)
        x, u = x.to(common), u.to(common)
    shape = torch.broadcast_shapes(x.shape, u.shape[:-1])
    # on the CPU, try one shift (0) for every logit instead of a maximum per row over strided
    # logits; the forward checks that it serves every row (elsewhere the check would cost a
    # device synchronisation)
    args = (inverse, bound, min_w, min_h, min_d, shift, u.device.type == "cpu")
    if u.dim() >= 3 and u.shape[:-1] == x.shape and u.movedim((-2, -1), (0, 1)).is_contiguous():
        # parameters laid out (features, P, *rest) (a MADE's transposed output): run the
        # spline with the batch in that order, (features, *rest), so that every parameter
        # row is read in contiguous runs; only x is copied (and the outputs are views)
        y, lad = _apply(u.movedim((-1, -2), (0, 1)), x.movedim(-1, 0).contiguous(), *args)
        return y.movedim(0, -1), lad.movedim(0, -1)
    return _apply(u.expand(*shape, u.shape[-1]).movedim(-1, 0), x.expand(shape), *args)


def _apply(
    u: Tensor,
    x: Tensor,
    inverse: bool,
    bound: float,
    min_w: float,
    min_h: float,
    min_d: float,
    shift: float,
    shared: bool,
) -> tuple[Tensor, Tensor]:
    """:class:`_Spline` on ``u`` ``(3K - 1, *batch)`` and ``x`` ``(*batch)``; under a
    ``torch.func`` transform (``jacrev``, ``hessian``, ``vmap``), which cannot trace the
    hand-written Function, the same spline in plain differentiable operations."""
    if under_functorch():
        bins = (u.shape[0] + 1) // 3
        c = _make_constants(bins, bound, min_w, min_h, min_d, shift, u.dtype, u.device)
        return _differentiable_spline(u, x, inverse, c)
    return _Spline.apply(u, x, inverse, bound, min_w, min_h, min_d, shift, shared)


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
    knots, which is vectorised); both directions are exact and equally fast. The backward is
    hand-written; under ``create_graph`` (a Hessian, a gradient penalty) the spline is
    evaluated again with differentiable operations, so derivatives of every order are exact.

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

    Cost: :math:`O(K)` per entry in both directions, both exact and equally fast (see the
    module docstring). ``params`` may have any layout (feature-major, as a MADE gives them, or a
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

    #: parameter rows are read whole (softmaxes, cumulative sums, the bin search): fastest
    #: parameter-major, as a MADE gives them with ``transposed=True``
    param_major = True

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
