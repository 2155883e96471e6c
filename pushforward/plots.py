r"""Pictures of flows: densities, samples, the change of variables, training curves.

Every function draws one figure, writes it as a PNG to ``path`` (creating parent folders) and
returns the path. Matplotlib is imported only inside these functions, through its
object-oriented API and the Agg canvas: no ``pyplot``, no backend switch, no change to
matplotlib's global state, so importing :mod:`pushforward` (or this module) never touches it.

Densities are evaluated in eval mode without gradients, in the flow's dtype and device, in
batches; points where a flow's log-density is NaN (outside a transform's domain) are drawn as
density 0.

Example:
    >>> from pushforward.distributions import Flow, StandardNormal
    >>> from pushforward.transforms.linear import ElementwiseAffine
    >>> flow = Flow(StandardNormal(2), ElementwiseAffine(2))
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> density_2d(flow, torch.randn(500, 2), folder / "density.png", grid=50).name
    'density.png'
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .core import PushforwardError, check_positive_int, shape_str

__all__ = [
    "density_2d",
    "pairs",
    "training_curves",
    "change_of_variables_1d",
    "target_vs_flow",
]

Bounds = tuple[float, float] | tuple[tuple[float, float], tuple[float, float]]
_BATCH = 8192
_MAX_POINTS = 5000  # scatter plots draw at most this many points per set
_DATA, _FLOW = "C0", "C1"


# ---------------------------------------------------------------------------------------------
# helpers


def _figure(ncols: int, nrows: int = 1, size: float = 4.0) -> tuple[Any, np.ndarray]:
    """A figure on an Agg canvas (never pyplot) and its ``(nrows, ncols)`` axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size * ncols, size * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def _numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise PushforwardError(f"{name} must be a tensor or numeric array") from None


def _points(x: Any, features: int | None, name: str) -> np.ndarray:
    """``x`` as a ``(rows, features)`` float64 array."""
    a = _numpy(x, name)
    if a.ndim != 2 or (features is not None and a.shape[1] != features) or len(a) == 0:
        expected = shape_str(("rows", features if features is not None else "features"))
        raise PushforwardError(f"{name}: expected shape {expected}, got {shape_str(a.shape)}")
    return a


def _thin(a: np.ndarray, limit: int = _MAX_POINTS) -> np.ndarray:
    if len(a) <= limit:
        return a
    return a[np.random.default_rng(0).choice(len(a), limit, replace=False)]


def _like(flow: nn.Module) -> tuple[torch.dtype, torch.device]:
    for t in (*flow.parameters(), *flow.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.get_default_dtype(), torch.device("cpu")


def _check_flow(flow: Any, features: int, what: str) -> None:
    shape = tuple(getattr(flow, "event_shape", ()) or ())
    if not hasattr(flow, "log_prob") or shape != (features,):
        raise PushforwardError(
            f"{what} needs an unconditional flow on vectors of {features} feature(s), got "
            f"event shape {shape_str(shape)}"
        )
    if int(getattr(flow, "context_features", 0)):
        raise PushforwardError(f"{what} needs an unconditional flow")


def _eval_log_prob(flow: nn.Module, points: np.ndarray) -> np.ndarray:
    """``flow.log_prob`` at the rows of ``points`` (NaN -> -inf), as float64."""
    dtype, device = _like(flow)
    x = torch.as_tensor(points, dtype=dtype, device=device)
    out = []
    was_training = flow.training
    flow.eval()
    try:
        with torch.no_grad():
            for chunk in x.split(_BATCH):
                out.append(flow.log_prob(chunk).double().cpu())
    finally:
        flow.train(was_training)
    lp = torch.cat(out).numpy()
    return np.where(np.isnan(lp), -np.inf, lp)


def _samples(flow: nn.Module, n: int, seed: int = 0) -> np.ndarray:
    was_training = flow.training
    flow.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            x = flow.sample((n,))
    finally:
        flow.train(was_training)
    return x.detach().double().cpu().reshape(n, -1).numpy()


def _box(value: Any, name: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """``(lo, hi)`` for both axes or ``((x0, x1), (y0, y1))`` as the latter, checked."""
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        a = np.zeros(0)
    if a.shape == (2,):
        a = np.stack([a, a])
    if a.shape != (2, 2) or not np.isfinite(a).all() or not (a[:, 1] > a[:, 0]).all():
        raise PushforwardError(
            f"{name} must be (lo, hi) or ((x_lo, x_hi), (y_lo, y_hi)) with lo < hi, got {value!r}"
        )
    return (float(a[0, 0]), float(a[0, 1])), (float(a[1, 0]), float(a[1, 1]))


def _data_box(data: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    """A box around the central 99% of ``data`` per axis, with a 10% margin."""
    lo, hi = np.quantile(data, [0.005, 0.995], axis=0)
    pad = 0.1 * np.maximum(hi - lo, 1e-3)
    return (lo[0] - pad[0], hi[0] + pad[0]), (lo[1] - pad[1], hi[1] + pad[1])


def _grid(
    box: tuple[tuple[float, float], tuple[float, float]], n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell centres ``xs``, ``ys`` of an ``n x n`` grid and its ``(n * n, 2)`` points (row-major
    in y, so ``values.reshape(n, n)`` is an image with y along the rows)."""
    (x0, x1), (y0, y1) = box
    xs = x0 + (np.arange(n) + 0.5) * (x1 - x0) / n
    ys = y0 + (np.arange(n) + 0.5) * (y1 - y0) / n
    gx, gy = np.meshgrid(xs, ys)
    return xs, ys, np.stack([gx.ravel(), gy.ravel()], axis=1)


def _image(ax: Any, values: np.ndarray, box: Any, title: str) -> None:
    (x0, x1), (y0, y1) = box
    ax.imshow(values, origin="lower", extent=(x0, x1, y0, y1), aspect="auto", cmap="viridis")
    ax.set_title(title)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)


def _scatter(ax: Any, points: np.ndarray, box: Any, title: str, color: str) -> None:
    (x0, x1), (y0, y1) = box
    ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.4, color=color, linewidths=0)
    ax.set_title(title)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)


# ---------------------------------------------------------------------------------------------
# plots


def density_2d(
    flow: nn.Module,
    data: Tensor | np.ndarray,
    path: str | Path,
    *,
    samples: int = 2000,
    grid: int = 200,
    bounds: Bounds | None = None,
) -> Path:
    """Three panels for a 2-D flow: the data, the learned density, the flow's samples.

    The density panel is :math:`\\exp \\log q(x)` on a ``grid x grid`` lattice of cell centres.

    Args:
        flow: an unconditional flow on 2-D vectors.
        data: points of shape ``(rows, 2)`` (at most 5000 are drawn).
        path: where to write the PNG.
        samples: number of flow samples to draw.
        grid: lattice points per axis.
        bounds: ``(lo, hi)`` for both axes or ``((x_lo, x_hi), (y_lo, y_hi))``; default: the
            central 99% of the data with a 10% margin.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    _check_flow(flow, 2, "density_2d")
    points = _points(data, 2, "data")
    samples = check_positive_int(samples, "samples")
    grid = check_positive_int(grid, "grid")
    box = _data_box(points) if bounds is None else _box(bounds, "bounds")
    _, _, lattice = _grid(box, grid)
    density = np.exp(_eval_log_prob(flow, lattice)).reshape(grid, grid)
    drawn = _samples(flow, samples)

    fig, axes = _figure(3)
    _scatter(axes[0, 0], _thin(points), box, f"data ({len(points)} points)", _DATA)
    _image(axes[0, 1], density, box, "flow density")
    _scatter(axes[0, 2], _thin(drawn), box, f"flow samples ({samples})", _FLOW)
    return _save(fig, path)


def pairs(
    data: Tensor | np.ndarray,
    samples: Tensor | np.ndarray,
    path: str | Path,
    *,
    dims: Sequence[int] | None = None,
    max_dims: int = 5,
) -> Path:
    """Scatter matrix of a few dimensions: data against flow samples.

    Off the diagonal, pairwise scatter plots of the data and the samples overlaid; on the
    diagonal, their marginal histograms. For tabular data with more than two features.

    Args:
        data: points of shape ``(rows, features)`` (at most 5000 are drawn).
        samples: flow samples of shape ``(rows', features)``.
        path: where to write the PNG.
        dims: the feature indices to show; default the first ``max_dims``.
        max_dims: how many features to show when ``dims`` is not given.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    a = _points(data, None, "data")
    b = _points(samples, a.shape[1], "samples")
    features = a.shape[1]
    if dims is None:
        dims = list(range(min(features, check_positive_int(max_dims, "max_dims"))))
    else:
        dims = [int(d) for d in dims]
        bad = [d for d in dims if not -features <= d < features]
        if not dims or bad:
            raise PushforwardError(
                f"dims must be indices of the {features} features, got {list(dims)}"
            )
    a, b = _thin(a), _thin(b)
    k = len(dims)
    fig, axes = _figure(k, k, size=2.2 if k > 1 else 4.0)
    for row, i in enumerate(dims):
        lo, hi = np.quantile(np.concatenate([a[:, i], b[:, i]]), [0.005, 0.995])
        for col, j in enumerate(dims):
            ax = axes[row, col]
            if i == j:
                edges = np.linspace(lo, hi, 41) if hi > lo else 40
                ax.hist(a[:, i], bins=edges, density=True, histtype="step", color=_DATA)
                ax.hist(b[:, i], bins=edges, density=True, histtype="step", color=_FLOW)
            else:
                ax.scatter(b[:, j], b[:, i], s=1, alpha=0.3, color=_FLOW, linewidths=0)
                ax.scatter(a[:, j], a[:, i], s=1, alpha=0.3, color=_DATA, linewidths=0)
            if row == k - 1:
                ax.set_xlabel(f"x{j}")
            if col == 0:
                ax.set_ylabel(f"x{i}")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=_DATA, label="data"), Line2D([], [], color=_FLOW, label="flow")]
    axes[0, 0].legend(handles=handles, loc="upper right", fontsize="small")
    return _save(fig, path)


def training_curves(history: Any, path: str | Path) -> Path:
    """Training loss and validation log-likelihood over a run.

    Args:
        history: a :class:`pushforward.train.History` (or its ``to_dict()``).
        path: where to write the PNG.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    d = history if isinstance(history, dict) else getattr(history, "__dict__", None)
    if not isinstance(d, dict) or "train_loss" not in d:
        raise PushforwardError(
            f"training_curves needs a History (or its dict), got {type(history).__name__}"
        )

    def floats(key: str) -> np.ndarray:
        return np.array([math.nan if v is None else float(v) for v in d.get(key) or []])

    loss, valid = floats("train_loss"), floats("valid_log_likelihood")
    every = d.get("loss_every")
    fig, axes = _figure(2 if len(valid) else 1, size=4.5)
    ax = axes[0, 0]
    if every:
        ax.plot(every * np.arange(1, len(loss) + 1), loss, color=_FLOW)
        ax.set_xlabel("step")
    else:
        ax.plot(np.arange(1, len(loss) + 1), loss, marker="." if len(loss) < 50 else None)
        ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (nats)")
    ax.set_title(f"training loss (stopped: {d.get('stopped') or '?'})")
    if len(valid):
        ax = axes[0, 1]
        ax.plot(np.arange(1, len(valid) + 1), valid, marker="." if len(valid) < 50 else None)
        best = d.get("best_epoch")
        if best:
            ax.axvline(best, color="grey", linestyle="--", label=f"best epoch {best}")
            ax.legend(fontsize="small")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation log-likelihood (nats)")
        ax.set_title("validation log-likelihood")
    return _save(fig, path)


def change_of_variables_1d(
    flow: nn.Module,
    path: str | Path,
    *,
    z_range: tuple[float, float] | None = None,
    x_range: tuple[float, float] | None = None,
) -> Path:
    """The change of variables of a 1-D flow: base density, the map, pushed-forward density.

    Left: :math:`p_z(z)`; middle: :math:`x = f(z)`; right: the density of :math:`x`,

    .. math:: p_x(x) = p_z\\bigl(f^{-1}(x)\\bigr) \\left|\\frac{dx}{dz}\\right|^{-1},

    computed by ``flow.log_prob``, over a histogram of 20,000 flow samples (the two agree
    when the flow is correct).

    Args:
        flow: an unconditional flow on vectors of one feature.
        path: where to write the PNG.
        z_range: base-space interval; default the base's support for a uniform base, else
            the central 99.8% of base samples.
        x_range: data-space interval; default the image of ``z_range``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    _check_flow(flow, 1, "change_of_variables_1d")
    dtype, device = _like(flow)
    n = 400
    if z_range is None:
        low, high = getattr(flow.base, "low", None), getattr(flow.base, "high", None)
        if isinstance(low, Tensor) and isinstance(high, Tensor):
            z_range = (float(low.reshape(-1)[0]), float(high.reshape(-1)[0]))
        else:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(0)
                zs = flow.base.rsample((20000,)).double().cpu().numpy().ravel()
            z_range = tuple(np.quantile(zs, [0.001, 0.999]))
    (z0, z1), _ = _box(z_range, "z_range")
    z = z0 + (np.arange(n) + 0.5) * (z1 - z0) / n
    z_t = torch.as_tensor(z, dtype=dtype, device=device).reshape(n, 1)
    was_training = flow.training
    flow.eval()
    try:
        with torch.no_grad():
            p_z = flow.base.log_prob(z_t).exp().double().cpu().numpy()
            x_of_z = flow.transform(z_t)[0].double().cpu().numpy().ravel()
    finally:
        flow.train(was_training)
    if x_range is None:
        finite = x_of_z[np.isfinite(x_of_z)]
        if not len(finite) or finite.max() <= finite.min():
            raise PushforwardError("the flow maps z_range to a single point; give x_range")
        x_range = (float(finite.min()), float(finite.max()))
    (x0, x1), _ = _box(x_range, "x_range")
    x = x0 + (np.arange(n) + 0.5) * (x1 - x0) / n
    p_x = np.exp(_eval_log_prob(flow, x.reshape(n, 1)))
    drawn = _samples(flow, 20000).ravel()

    fig, axes = _figure(3)
    ax = axes[0, 0]
    ax.plot(z, p_z, color=_DATA)
    ax.fill_between(z, p_z, alpha=0.2, color=_DATA)
    ax.set_xlabel("z")
    ax.set_title("base density $p_z(z)$")
    ax = axes[0, 1]
    ax.plot(z, x_of_z, color="k")
    ax.set_xlabel("z")
    ax.set_ylabel("x")
    ax.set_title("the map $x = f(z)$")
    ax = axes[0, 2]
    # histogram normalised by all samples, so that it estimates p_x on [x0, x1]
    counts, edges = np.histogram(drawn, bins=60, range=(x0, x1))
    heights = counts / (len(drawn) * (edges[1] - edges[0]))
    ax.stairs(heights, edges, fill=True, color=_FLOW, alpha=0.35, label="flow samples")
    ax.plot(x, p_x, color=_FLOW, label="$p_z(f^{-1}(x))\\,|dx/dz|^{-1}$")
    finite = p_x[np.isfinite(p_x)]
    top = max(heights.max(), np.quantile(finite, 0.98) if len(finite) else 0.0)
    if top > 0:
        ax.set_ylim(0, 1.15 * top)
    ax.set_xlim(x0, x1)
    ax.set_xlabel("x")
    ax.set_title("pushed-forward density $p_x(x)$")
    ax.legend(fontsize="small")
    return _save(fig, path)


def target_vs_flow(
    flow: nn.Module,
    log_density: Callable[[Tensor], Tensor],
    path: str | Path,
    *,
    bounds: Bounds = (-4, 4),
    grid: int = 200,
) -> Path:
    """An unnormalised 2-D target density beside the flow fitted to it.

    The target :math:`\\tilde p = \\exp(\\log \\tilde p)` is normalised numerically on the grid
    (:math:`Z \\approx \\sum \\tilde p \\, \\Delta x \\Delta y`); the flow's density is drawn as it
    is, on the same colour scale, with its probability mass inside the box in the title.

    Args:
        flow: an unconditional flow on 2-D vectors.
        log_density: :math:`\\log \\tilde p`, mapping ``(batch, 2)`` to ``(batch,)`` (e.g.
            :func:`pushforward.data.potentials.potential`).
        path: where to write the PNG.
        bounds: ``(lo, hi)`` for both axes or ``((x_lo, x_hi), (y_lo, y_hi))``.
        grid: lattice points per axis.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    _check_flow(flow, 2, "target_vs_flow")
    grid = check_positive_int(grid, "grid")
    box = _box(bounds, "bounds")
    (x0, x1), (y0, y1) = box
    cell = (x1 - x0) * (y1 - y0) / grid**2
    _, _, lattice = _grid(box, grid)
    dtype, device = _like(flow)
    with torch.no_grad():
        lp = log_density(torch.as_tensor(lattice, dtype=dtype, device=device))
    lp = _numpy(lp, "log_density(z)").reshape(-1)
    if lp.shape != (grid * grid,):
        raise PushforwardError(f"log_density must return one value per point, got {lp.shape}")
    lp = np.where(np.isnan(lp), -np.inf, lp)
    if not np.isfinite(lp).any():
        raise PushforwardError("log_density is not finite anywhere inside bounds")
    target = np.exp(lp - lp.max())
    target = (target / (target.sum() * cell)).reshape(grid, grid)
    density = np.exp(_eval_log_prob(flow, lattice)).reshape(grid, grid)
    mass = float(density.sum() * cell)

    from matplotlib.colors import Normalize

    norm = Normalize(0.0, max(target.max(), np.nanmax(density)))
    fig, axes = _figure(2)
    for ax, values, title in (
        (axes[0, 0], target, "target (normalised on the grid)"),
        (axes[0, 1], density, f"flow density (mass in box {mass:.3f})"),
    ):
        ax.imshow(values, origin="lower", extent=(x0, x1, y0, y1), aspect="auto", norm=norm)
        ax.set_title(title)
    return _save(fig, path)
