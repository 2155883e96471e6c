"""Shared numerics for numerical inverses: bracketed, batched root finding.

Pure functions of tensors, used by the transforms whose inverse has no closed form but reduces
to a monotone scalar equation per element (the planar flow, monotone elementwise transformers
such as deep sigmoidal flows), and small overflow-safe helpers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .core import PushforwardError, vmapped

__all__ = ["default_tol", "monotone_solve", "implicit_step", "safe_norm", "under_functorch"]


def under_functorch() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``jacrev``, ``hessian``, ``vmap``, ...) is
    running: the library's hand-written autograd Functions (the fused spline, MADE's
    block-triangular products) then step aside for the same computation in plain PyTorch
    operations, which those transforms can trace."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)  # private API
    return bool(active()) if active is not None else False


def default_tol(dtype: torch.dtype) -> float:
    """Default relative tolerance of :func:`monotone_solve` for a dtype: ``1e-12`` for float64,
    ``1e-6`` for float32 (about 5000 and 8 times machine epsilon), 4 epsilons otherwise."""
    return {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 4 * torch.finfo(dtype).eps)


_ORDINAL = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def _ordinal(x: Tensor) -> Tensor:
    """Map floats to integers in the same order, consecutive floats to consecutive integers."""
    bits = x.view(_ORDINAL[x.dtype])
    return torch.where(bits >= 0, bits, torch.iinfo(bits.dtype).min - bits)


def _from_ordinal(o: Tensor, dtype: torch.dtype) -> Tensor:
    bits = torch.where(o >= 0, o, torch.iinfo(o.dtype).min - o)
    return bits.view(dtype)


def _midpoint(lo: Tensor, hi: Tensor, batched: bool = False) -> Tensor:
    """The next bisection point of ``[lo, hi]``: the arithmetic midpoint, or, for a bracket
    spanning many binades (``hi - lo > 16 max(1, min |end|)``), the midpoint of the floats in
    it in order, which shrinks any finite float64 bracket to a few binades in under 64 steps
    (arithmetic halving would need about 1000 from ``[0, 1e300]``). ``batched``: under
    ``torch.func.vmap``, without the shortcut that tests the data."""
    mid = lo / 2 + hi / 2
    if lo.dtype not in _ORDINAL:
        return mid
    scale = torch.where(lo * hi > 0, torch.minimum(lo.abs(), hi.abs()), 0.0).clamp_min(1.0)
    wide = hi - lo > 16 * scale
    if not batched and not bool(wide.any()):
        return mid
    a, b = _ordinal(lo), _ordinal(hi)
    o = (a >> 1) + (b >> 1) + (a & b & 1)  # floor((a + b) / 2) without overflow
    return torch.where(wide, _from_ordinal(o, lo.dtype), mid)


def monotone_solve(
    f: Callable[[Tensor], Tensor],
    target: Tensor,
    lo: Tensor,
    hi: Tensor,
    *,
    tol: float | None = None,
    max_iter: int = 100,
    df: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Solve ``f(u) = target`` elementwise for an elementwise increasing ``f``, inside a bracket.

    Batched safeguarded Newton when ``df`` is given (as ``rtsafe`` in Numerical Recipes): a
    Newton step is replaced by a bisection whenever it would leave the current bracket, fails to
    halve the step before last, or meets a zero or non-finite derivative. Without ``df``, pure
    bisection. A bisection halves the bracket, or, for a bracket spanning many binades, the
    number of floats in it, so any finite bracket shrinks to ``tol`` well within ``max_iter =
    100`` steps (about 45 in float64 for an ordinary bracket; Newton typically needs under 10).

    Each evaluation of ``f`` tightens the bracket ``lo <= u* <= hi`` (``f(u) <= target`` moves
    ``lo`` up, ``f(u) >= target`` moves ``hi`` down), so iterates never leave it and no NaN is
    produced even where ``f`` or ``df`` overflow. An element stops once its bracket, or its last
    Newton step, is below ``tol * max(1, |u|)`` (the error after such a Newton step is of the
    order of its square). A root outside the given bracket yields the nearest end.

    ``f`` and ``df`` are called on a tensor of the broadcast shape of ``target``, ``lo`` and
    ``hi`` (every element at once, including those already converged), so closures over
    per-element parameters work unchanged. The solve runs under :func:`torch.no_grad`: the
    result is a constant for autograd; callers that need gradients recompute the forward map at
    the solution, or attach them with :func:`implicit_step`. Under ``torch.func.vmap`` (which
    cannot branch on the data) the bracket is not validated and all ``max_iter`` iterations
    run, converged elements staying where they are.

    Args:
        f: elementwise, monotone non-decreasing function.
        target: right-hand side.
        lo: lower bracket, ``f(lo) <= target`` (broadcastable with ``target``).
        hi: upper bracket, ``f(hi) >= target``; finite, ``lo <= hi``.
        tol: relative tolerance on ``u``; default from the dtype (:func:`default_tol`:
            ``1e-12`` in float64, ``1e-6`` in float32).
        max_iter: iteration cap (evaluations of ``f``).
        df: derivative of ``f``, enabling Newton steps (quadratic convergence).

    Returns:
        The solution ``u`` with the broadcast shape, ``lo <= u <= hi``.

    Example:
        >>> u = monotone_solve(lambda u: u**3, torch.tensor([8.0, -1.0]),
        ...                    torch.tensor(-10.0), torch.tensor(10.0), df=lambda u: 3 * u**2)
        >>> u
        tensor([ 2., -1.])
    """
    with torch.no_grad():
        target, lo, hi = torch.broadcast_tensors(*(torch.as_tensor(v) for v in (target, lo, hi)))
        batched = any(vmapped(v) for v in (target, lo, hi))
        dtype = torch.promote_types(torch.promote_types(target.dtype, lo.dtype), hi.dtype)
        if not dtype.is_floating_point:
            dtype = torch.get_default_dtype()
        target, lo, hi = target.to(dtype), lo.to(dtype).clone(), hi.to(dtype).clone()
        if not batched and not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise PushforwardError("monotone_solve: the bracket [lo, hi] must be finite")
        if not batched and (lo > hi).any():
            bad = int((lo > hi).sum())
            raise PushforwardError(f"monotone_solve: lo > hi in {bad} element(s) of the bracket")
        tol = default_tol(dtype) if tol is None else float(tol)

        u = _midpoint(lo, hi, batched)
        # the last two steps (Newton's safeguard: a step must halve the one before last);
        # a bisection counts as the distance it moves, half the bracket
        step = step_old = torch.full_like(u, float("inf"))
        done = torch.zeros_like(u, dtype=torch.bool)
        for _ in range(max_iter):
            r = f(u) - target
            batched = batched or vmapped(r)  # f may close over vmapped tensors
            # shrink the bracket with what f(u) says (NaN comparisons are False: no move)
            lo = torch.where(~done & (r <= 0), u, lo)
            hi = torch.where(~done & (r >= 0), u, hi)
            scale = tol * u.abs().clamp_min(1.0)
            done = done | (r == 0) | (hi - lo <= scale)
            if not batched and bool(done.all()):
                break
            new = _midpoint(lo, hi, batched)
            if df is not None:
                slope = df(u)
                newton = u - r / slope
                # a step landing just past a bracket end (a root at the end) is pulled back in
                inside = torch.minimum(torch.maximum(newton, lo), hi)
                ok = (
                    torch.isfinite(slope)
                    & (slope > 0)
                    & torch.isfinite(newton)
                    & ((newton - inside).abs() <= scale)
                    & ((inside - u).abs() <= 0.5 * step_old.abs())
                )
                newton = inside
                new = torch.where(ok, newton, new)
                step_old, step = step, torch.where(ok, newton - u, hi / 2 - lo / 2)
                # a Newton step this small leaves an error of order its square: converged
                converged = ok & ((newton - u).abs() <= scale)
            u = torch.where(done, u, new)
            if df is not None:
                done = done | converged
        return u


def implicit_step(
    f: Callable[[Tensor], Tensor], target: Tensor, u: Tensor, df: Callable[[Tensor], Tensor]
) -> Tensor:
    r"""Attach the implicit-function derivatives to a root ``u`` of ``f(u) = target``.

    Two steps with autograd from the detached solution, a Newton step and a chord step with
    the same slope :math:`s = f'(u)`,

    .. math:: u_1 = u - \frac{f(u) - t}{s}, \qquad u_2 = u_1 - \frac{f(u_1) - t}{s},

    have (to rounding) the value of ``u``. As functions of ``target`` and of every tensor ``f``
    closes over, :math:`u_1` differs from the true root by the square of their change (Newton's
    quadratic convergence from a fixed start) and :math:`u_2` by its cube, so the derivatives
    of :math:`u_2` are exact up to the second order, by the implicit function theorem:
    :math:`\partial u / \partial t = 1 / f'(u)`, :math:`\partial u / \partial \theta =
    -(\partial f / \partial \theta) / f'(u)`, and the derivatives of those that a Hessian or
    a gradient penalty needs (one step alone gives exact first derivatives and second
    derivatives of 0; the chord step costs one more evaluation of ``f``, not of ``f'``). Use
    it after :func:`monotone_solve` when the solution must carry gradients. Where
    ``f'(u) <= 0`` (a degenerate map) both steps are skipped.

    Example:
        >>> t = torch.tensor([8.0], requires_grad=True)
        >>> u = monotone_solve(lambda u: u**3, t, torch.tensor(0.0), torch.tensor(9.0))
        >>> u = implicit_step(lambda u: u**3, t, u, lambda u: 3 * u**2)
        >>> (du,) = torch.autograd.grad(u, t, create_graph=True)
        >>> round(du.item(), 6), 1 / 12  # d(t^(1/3))/dt
        (0.083333, 0.08333333333333333)
        >>> round(torch.autograd.grad(du, t)[0].item(), 6), -1 / 144  # -2/9 t^(-5/3)
        (-0.006944, -0.006944444444444444)
    """
    u = u.detach()
    slope = df(u)
    positive = slope > 0
    slope = torch.where(positive, slope, torch.ones_like(slope))
    for _ in range(2):
        step = (f(u) - target) / slope
        u = u - torch.where(positive, step, torch.zeros_like(step))
    return u


def safe_norm(v: Tensor, dim: int = -1) -> Tensor:
    """Euclidean norm over ``dim`` without overflow or underflow, with gradient 0 at ``v = 0``.

    :func:`torch.linalg.vector_norm` squares its input (``1e200`` overflows to ``inf`` in
    float64); here the entries are first divided by their largest magnitude (a constant for
    autograd: the norm is homogeneous, so gradients are exact).

    Example:
        >>> safe_norm(torch.tensor([3e200, 4e200], dtype=torch.float64))
        tensor(5.0000e+200, dtype=torch.float64)
    """
    tiny = torch.finfo(v.dtype).tiny
    scale = v.detach().abs().amax(dim=dim, keepdim=True).clamp_min(tiny)
    return torch.linalg.vector_norm(v / scale, dim=dim) * scale.squeeze(dim)
