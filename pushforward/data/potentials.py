r"""The four unnormalised 2-D target densities of Rezende and Mohamed (2015), Table 1.

Each target is :math:`p(z) \propto \exp(-U(z))` for a potential (energy) :math:`U`, with

.. math::
    w_1(z) = \sin\Bigl(\frac{2\pi z_1}{4}\Bigr), \quad
    w_2(z) = 3 \exp\Bigl(-\frac12 \Bigl[\frac{z_1 - 1}{0.6}\Bigr]^2\Bigr), \quad
    w_3(z) = 3\, \sigma\Bigl(\frac{z_1 - 1}{0.3}\Bigr),

.. math::
    U_1(z) &= \frac12 \Bigl(\frac{\|z\| - 2}{0.4}\Bigr)^2
        - \ln\Bigl(e^{-\frac12 [(z_1 - 2)/0.6]^2} + e^{-\frac12 [(z_1 + 2)/0.6]^2}\Bigr) \\
    U_2(z) &= \frac12 \Bigl(\frac{z_2 - w_1(z)}{0.4}\Bigr)^2 \\
    U_3(z) &= -\ln\Bigl(e^{-\frac12 [(z_2 - w_1(z))/0.35]^2}
        + e^{-\frac12 [(z_2 - w_1(z) + w_2(z))/0.35]^2}\Bigr) \\
    U_4(z) &= -\ln\Bigl(e^{-\frac12 [(z_2 - w_1(z))/0.4]^2}
        + e^{-\frac12 [(z_2 - w_1(z) + w_3(z))/0.35]^2}\Bigr)

where :math:`\sigma(x) = 1 / (1 + e^{-x})`. The logarithms of sums are evaluated with
``logsumexp``, so every value is finite for every finite :math:`z` (no ``log(0)`` far from
the modes). :func:`potential` returns the unnormalised **log**-density :math:`-U`, the form
:func:`pushforward.train.fit_target` and :func:`pushforward.losses.reverse_kl` take.

Only :math:`U_1` is normalisable on :math:`\mathbb R^2`. :math:`U_2, U_3, U_4` do not depend
on :math:`z_1` except through bounded wiggles, so :math:`\int e^{-U} dz_2` is about constant in
:math:`z_1` and the total mass is infinite: these targets are meant on a box (the paper draws
them on :math:`[-4, 4]^2`). A reverse-KL fit then keeps spreading :math:`q` along :math:`z_1`
(its entropy grows at no cost), so :math:`\mathbb E_q[\log q + U]` has no lower bound.
``potential(name, box=4)`` adds a steep wall outside :math:`[-4, 4]^2` (:func:`box_wall`),
which makes every target normalisable; ``pushforward fit-target`` uses it by default.

References:
    Rezende and Mohamed (2015), "Variational Inference with Normalizing Flows",
    arXiv:1505.05770 (Table 1, section 6.1).

Example:
    >>> log_p = potential("U2")  # U2 = (z2 - sin(pi z1 / 2))^2 / (2 * 0.4^2)
    >>> log_p(torch.tensor([[0.0, 0.4], [1.0, 1.0]]))
    tensor([-0.5000, -0.0000])
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..core import PushforwardError, check_event

__all__ = ["potential", "potential_names", "box_wall", "BOX", "WALL_WIDTH"]

#: half-width of the square the paper draws the targets on, :math:`[-4, 4]^2`
BOX = 4.0
#: width of :func:`box_wall`: the density falls by :math:`e^{-1/2}` 0.05 outside the box
WALL_WIDTH = 0.05


def _w1(z1: Tensor) -> Tensor:
    return torch.sin(2 * math.pi * z1 / 4)


def _w2(z1: Tensor) -> Tensor:
    return 3 * torch.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)


def _w3(z1: Tensor) -> Tensor:
    return 3 * torch.sigmoid((z1 - 1) / 0.3)


def _log_two_bumps(a: Tensor, b: Tensor) -> Tensor:
    """``log(exp(-a²/2) + exp(-b²/2))`` without underflow."""
    return torch.logsumexp(torch.stack([-0.5 * a * a, -0.5 * b * b]), dim=0)


def _u1(z: Tensor) -> Tensor:
    z1 = z[..., 0]
    # vector_norm has a zero (not NaN) gradient at the origin
    r = torch.linalg.vector_norm(z, dim=-1)
    return 0.5 * ((r - 2) / 0.4) ** 2 - _log_two_bumps((z1 - 2) / 0.6, (z1 + 2) / 0.6)


def _u2(z: Tensor) -> Tensor:
    z1, z2 = z[..., 0], z[..., 1]
    return 0.5 * ((z2 - _w1(z1)) / 0.4) ** 2


def _u3(z: Tensor) -> Tensor:
    z1, z2 = z[..., 0], z[..., 1]
    d = z2 - _w1(z1)
    return -_log_two_bumps(d / 0.35, (d + _w2(z1)) / 0.35)


def _u4(z: Tensor) -> Tensor:
    z1, z2 = z[..., 0], z[..., 1]
    d = z2 - _w1(z1)
    return -_log_two_bumps(d / 0.4, (d + _w3(z1)) / 0.35)


_POTENTIALS: dict[str, Callable[[Tensor], Tensor]] = {
    "U1": _u1,
    "U2": _u2,
    "U3": _u3,
    "U4": _u4,
}


def potential_names() -> list[str]:
    """The names :func:`potential` understands: ``["U1", "U2", "U3", "U4"]``."""
    return list(_POTENTIALS)


def box_wall(z: Tensor, box: float, width: float = WALL_WIDTH) -> Tensor:
    r"""A steep quadratic wall outside the square :math:`[-b, b]^2`, zero inside:
    :math:`\frac12 \sum_i \bigl(\max(0, |z_i| - b) / w\bigr)^2`.

    Added to :math:`U_2, U_3, U_4` it confines them to the box the paper draws them on, which
    makes them normalisable (their mass outside is negligible), so that a reverse-KL fit has
    a minimum instead of spreading :math:`q` along :math:`z_1` for ever.

    Example:
        >>> box_wall(torch.tensor([[0.0, 3.9], [4.1, 0.0]]), 4.0)
        tensor([0.0000, 2.0000])
    """
    out = torch.relu(z.abs() - box) / width
    return 0.5 * (out * out).sum(-1)


def potential(name: str, box: float | None = None) -> Callable[[Tensor], Tensor]:
    """The unnormalised log-density :math:`\\log \\tilde p(z) = -U(z)` of a named target.

    Args:
        name: ``"U1"`` ... ``"U4"`` (case-insensitive); see :func:`potential_names`.
        box: confine the target to :math:`[-b, b]^2` by :func:`box_wall` (``None``: the
            paper's potential as it is; the command line uses :data:`BOX`).

    Returns:
        A function mapping ``z`` of shape ``(*batch, 2)`` to ``-U(z)`` of shape ``batch``,
        differentiable, in ``z``'s dtype and device.

    Example:
        >>> potential("U1")(torch.tensor([[2.0, 0.0]])).shape
        torch.Size([1])
    """
    key = str(name).upper()
    if key not in _POTENTIALS:
        raise PushforwardError(
            f"unknown potential {name!r}; choose from: {', '.join(potential_names())}"
        )
    energy = _POTENTIALS[key]

    if box is not None and not (isinstance(box, (int, float)) and math.isfinite(box) and box > 0):
        raise PushforwardError(f"box must be a positive number or None, got {box!r}")

    def log_density(z: Tensor) -> Tensor:
        check_event(z, (2,), "z")
        u = energy(z)
        return -u if box is None else -(u + box_wall(z, float(box)))

    log_density.__name__ = f"log_density_{key}"
    log_density.__qualname__ = log_density.__name__
    log_density.__doc__ = f"-{key}(z): the unnormalised log-density of target {key}."
    return log_density
