r"""Two-dimensional toy densities: the usual benchmark shapes of the flow literature.

Each generator is a pure function of ``(n, seed)`` returning an ``(n, 2)`` ``float32`` array that
lies roughly in :math:`[-4, 4]^2`; the shapes and their constants follow the FFJORD toy data
(Grathwohl et al. 2019, arXiv:1810.01367), which most papers since reuse.

Two of them have a density in closed form, which :func:`toy_log_prob` evaluates exactly:

* ``8gaussians``: an equal-weight mixture of 8 isotropic Gaussians with means on the circle of
  radius :math:`2\sqrt 2` and standard deviation :math:`1 / (2\sqrt 2)`;
* ``checkerboard``: uniform on the 8 dark squares (side 2) of a 4x4 board on
  :math:`[-4, 4]^2`, so :math:`p(x) = 1/32` there and 0 elsewhere (squares are closed, so a
  sample rounded onto an edge still has the density).

Example:
    >>> x = sample_toy("8gaussians", 1000, seed=0)
    >>> x.shape, x.dtype
    ((1000, 2), dtype('float32'))
    >>> bool(abs(toy_log_prob("8gaussians", x).mean() + 2.83) < 0.1)
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..core import PushforwardError

__all__ = ["sample_toy", "toy_names", "toy_log_prob", "log_prob_names"]

# 8gaussians: centres at radius 4 with standard deviation 0.5, everything divided by sqrt(2)
_RADIUS_8G = 4.0 / math.sqrt(2.0)
_STD_8G = 0.5 / math.sqrt(2.0)
_ANGLES_8G = np.arange(8) * (2.0 * math.pi / 8.0)
_CENTRES_8G = _RADIUS_8G * np.stack([np.cos(_ANGLES_8G), np.sin(_ANGLES_8G)], axis=1)


def _moons(n: int, rng: np.random.Generator) -> np.ndarray:
    """Two interleaved half circles (scikit-learn's ``make_moons``, noise 0.1), times 2, shifted."""
    outer = n // 2
    t = rng.uniform(0.0, math.pi, n)
    upper = np.arange(n) < outer
    x = np.where(upper, np.cos(t), 1.0 - np.cos(t))
    y = np.where(upper, np.sin(t), 0.5 - np.sin(t))
    pts = np.stack([x, y], axis=1) + rng.normal(0.0, 0.1, (n, 2))
    return rng.permutation(pts * 2.0 + np.array([-1.0, -0.2]))


def _circles(n: int, rng: np.random.Generator) -> np.ndarray:
    """Two concentric circles (radii 3 and 1.5), noise 0.08 before scaling by 3."""
    t = rng.uniform(0.0, 2.0 * math.pi, n)
    radius = np.where(np.arange(n) < n // 2, 1.0, 0.5)
    pts = radius[:, None] * np.stack([np.cos(t), np.sin(t)], axis=1)
    pts = pts + rng.normal(0.0, 0.08, (n, 2))
    return rng.permutation(pts * 3.0)


def _rings(n: int, rng: np.random.Generator) -> np.ndarray:
    """Four concentric rings of radii 0.75, 1.5, 2.25, 3 with Gaussian noise 0.08."""
    t = rng.uniform(0.0, 2.0 * math.pi, n)
    radius = 3.0 * (1.0 + np.arange(n) % 4) / 4.0
    pts = radius[:, None] * np.stack([np.cos(t), np.sin(t)], axis=1)
    pts = pts + rng.normal(0.0, 0.08, (n, 2))
    return rng.permutation(pts)


def _eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    """Equal mixture of 8 Gaussians on a circle (see :func:`toy_log_prob` for its density)."""
    idx = rng.integers(0, 8, n)
    return _CENTRES_8G[idx] + _STD_8G * rng.normal(size=(n, 2))


def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform on the dark squares of a 4x4 checkerboard over ``[-4, 4)^2``."""
    x1 = rng.uniform(-2.0, 2.0, n)
    x2 = rng.uniform(0.0, 1.0, n) - 2.0 * rng.integers(0, 2, n) + np.floor(x1) % 2
    return 2.0 * np.stack([x1, x2], axis=1)


def _pinwheel(n: int, rng: np.random.Generator) -> np.ndarray:
    """Five curved arms: radial noise 0.3, tangential noise 0.1, twist rate 0.25, times 2."""
    arms, rate = 5, 0.25
    feats = rng.normal(size=(n, 2)) * np.array([0.3, 0.1])
    feats[:, 0] += 1.0
    labels = rng.integers(0, arms, n)
    angles = labels * (2.0 * math.pi / arms) + rate * np.exp(feats[:, 0])
    c, s = np.cos(angles), np.sin(angles)
    x = feats[:, 0] * c + feats[:, 1] * s
    y = -feats[:, 0] * s + feats[:, 1] * c
    return 2.0 * np.stack([x, y], axis=1)


def _spirals(n: int, rng: np.random.Generator) -> np.ndarray:
    """Two interleaved spirals of 1.5 turns, uniform jitter 0.5 then Gaussian noise 0.1."""
    half = n // 2
    t = np.sqrt(rng.uniform(size=n)) * (540.0 * 2.0 * math.pi / 360.0)
    x = -np.cos(t) * t + rng.uniform(0.0, 0.5, n)
    y = np.sin(t) * t + rng.uniform(0.0, 0.5, n)
    sign = np.where(np.arange(n) < half, 1.0, -1.0)
    pts = sign[:, None] * np.stack([x, y], axis=1) / 3.0
    pts = pts + rng.normal(0.0, 0.1, (n, 2))
    return rng.permutation(pts)


_GENERATORS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "moons": _moons,
    "circles": _circles,
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "pinwheel": _pinwheel,
    "spirals": _spirals,
    "rings": _rings,
}


def toy_names() -> list[str]:
    """The names :func:`sample_toy` understands."""
    return list(_GENERATORS)


def _check_name(name: str) -> None:
    if name not in _GENERATORS:
        choices = ", ".join(_GENERATORS)
        raise PushforwardError(f"unknown toy dataset {name!r}; choose from: {choices}")


def sample_toy(name: str, n: int, seed: int = 0) -> np.ndarray:
    """Draw ``n`` points of the toy density ``name``; the same ``(n, seed)`` gives the same array.

    Args:
        name: one of :func:`toy_names`.
        n: number of points (positive).
        seed: seed of the ``numpy`` generator used (no global state is touched).

    Returns:
        An ``(n, 2)`` ``float32`` array.

    Example:
        >>> sample_toy("moons", 5, seed=1).shape
        (5, 2)
    """
    _check_name(name)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise PushforwardError(f"n must be a positive integer, got {n!r}")
    rng = np.random.default_rng(seed)
    return np.ascontiguousarray(_GENERATORS[name](int(n), rng), dtype=np.float32)


def _log_prob_8gaussians(x: np.ndarray) -> np.ndarray:
    d = x[:, None, :] - _CENTRES_8G[None]
    comp = -0.5 * (d * d).sum(-1) / _STD_8G**2 - 2.0 * math.log(_STD_8G) - math.log(2.0 * math.pi)
    top = comp.max(1, keepdims=True)
    return (top + np.log(np.exp(comp - top).mean(1, keepdims=True)))[:, 0]


def _log_prob_checkerboard(x: np.ndarray) -> np.ndarray:
    # closed squares: a point on an edge (float32 rounding puts samples there) counts as inside
    u = x / 2.0
    inside = (u >= -2.0).all(1) & (u <= 2.0).all(1)
    low = np.floor(u)
    cells = [low, np.where(u == low, low - 1.0, low)]  # the one or two cells touching u
    dark = np.zeros(len(u), dtype=bool)
    for a in cells:
        for b in cells:
            c1, c2 = a[:, 0], b[:, 1]
            ok = (c1 >= -2) & (c1 <= 1) & (c2 >= -2) & (c2 <= 1)
            dark |= ok & ((c1 + c2) % 2 == 0)
    return np.where(inside & dark, -math.log(32.0), -np.inf)


_LOG_PROBS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "8gaussians": _log_prob_8gaussians,
    "checkerboard": _log_prob_checkerboard,
}


def log_prob_names() -> list[str]:
    """The toy names with an exact density in :func:`toy_log_prob`."""
    return list(_LOG_PROBS)


def toy_log_prob(name: str, x: np.ndarray) -> np.ndarray:
    """Exact log-density of the toy ``name`` at the points ``x`` (shape ``(n, 2)``).

    Defined for ``8gaussians`` (the mixture itself) and ``checkerboard`` (``-log 32`` on the dark
    squares, ``-inf`` elsewhere); the other toys have no closed form and raise
    :class:`~pushforward.core.PushforwardError`.

    Returns:
        A ``float64`` array of shape ``(n,)``.
    """
    _check_name(name)
    if name not in _LOG_PROBS:
        raise PushforwardError(
            f"toy {name!r} has no closed-form density; exact log-densities exist for: "
            f"{', '.join(_LOG_PROBS)}"
        )
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 2:
        raise PushforwardError(f"x: expected shape (n, 2), got {tuple(x.shape)}")
    return _LOG_PROBS[name](x)
