r"""Pictures of flows: densities, samples, the change of variables, training curves, and for
image flows samples at several temperatures, latent interpolations, reconstructions and
latent attribute edits.

Every function draws one figure, writes it as a PNG to ``path`` (creating parent folders) and
returns the path (:func:`reconstruction` also returns the reconstruction error;
:func:`sample_at_temperature`, the sampler behind :func:`image_samples` and ``pushforward
sample --temperature``, draws nothing). Matplotlib is imported only inside these functions,
through its object-oriented API and the Agg canvas: no ``pyplot``, no backend switch, no change
to matplotlib's global state, so importing :mod:`pushforward` (or this module) never touches
it.

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
    "sample_at_temperature",
    "image_samples",
    "interpolation",
    "reconstruction",
    "latent_edit",
    "image_grid_size",
    "TEMPERATURES",
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


# ---------------------------------------------------------------------------------------------
# images
#
# The image plots take a flow on images (event shape ``(C, H, W)``) and values in its data
# space: for the image recipes, pixels dequantized to [0, 1) (the command line uses the bin
# midpoints ``(x + 1/2) / L``). Each image is drawn as a tile of :data:`TILE_INCHES` inches
# (grey for one channel, colour for three, the first channel otherwise), clipped to [0, 1];
# with ``levels`` it is first quantized as the discrete model's pixels,
# ``floor(y L) / (L - 1)``. The figure's size in pixels follows from the grid alone (see
# :func:`image_grid_size`), so the same call always writes an image of the same size.

#: the side of one image tile, in inches (the PNGs are written at :data:`DPI`)
TILE_INCHES = 0.6
#: dots per inch of every PNG written here
DPI = 100
#: room for a block's label (left), a right margin, a block's title (above) and its column
#: labels (below), in inches
_LABEL_INCHES = 0.9
_RIGHT_INCHES = 0.2
_TITLE_INCHES = 0.35
_TICK_INCHES = 0.3
#: the temperatures of :func:`image_samples`
TEMPERATURES = (0.5, 0.8, 1.0)


def image_grid_size(blocks: Sequence[int], cols: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of a figure of image tiles stacked in row blocks of
    ``blocks[i]`` rows and ``cols`` columns, each block with a title line above, a line of
    column labels below and a label margin on the left:
    ``width = (cols T + 1.1) DPI``, ``height = sum_i (rows_i T + 0.65) DPI`` with ``T`` =
    :data:`TILE_INCHES` (inches; at :data:`DPI`).

    Example:
        >>> image_grid_size([2, 2, 2], 8)
        (590, 555)
    """
    w, h = _grid_inches(blocks, cols)
    return round(w * DPI), round(h * DPI)


def _grid_inches(blocks: Sequence[int], cols: int) -> tuple[float, float]:
    width = cols * TILE_INCHES + _LABEL_INCHES + _RIGHT_INCHES
    height = sum(rows * TILE_INCHES + _TITLE_INCHES + _TICK_INCHES for rows in blocks)
    return width, height


def _block_figure(blocks: Sequence[int], cols: int) -> tuple[Any, list[Any]]:
    """A figure (Agg canvas) of one axes per row block, sized by :func:`image_grid_size`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width, height = _grid_inches(blocks, cols)
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    axes, top = [], height
    for rows in blocks:
        block = rows * TILE_INCHES + _TITLE_INCHES + _TICK_INCHES
        bottom = top - block
        # [left, bottom, width, height] in figure fractions: tiles below the title line
        axes.append(
            fig.add_axes(
                (
                    _LABEL_INCHES / width,
                    (bottom + _TICK_INCHES) / height,
                    cols * TILE_INCHES / width,
                    rows * TILE_INCHES / height,
                )
            )
        )
        top = bottom
    return fig, axes


def _save_fixed(fig: Any, path: str | Path) -> Path:
    """Save at :data:`DPI` with the figure's own size (no tight bounding box)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path


def _check_image_flow(flow: Any, what: str) -> tuple[int, int, int]:
    shape = tuple(getattr(flow, "event_shape", ()) or ())
    if not hasattr(flow, "transform") or len(shape) != 3:
        raise PushforwardError(
            f"{what} needs a flow on images (event shape (channels, height, width)), got event "
            f"shape {shape_str(shape)}"
        )
    if int(getattr(flow, "context_features", 0)):
        raise PushforwardError(f"{what} needs an unconditional flow")
    return shape  # type: ignore[return-value]


def _image_batch(images: Any, shape: tuple[int, ...], name: str, at_least: int = 1) -> Tensor:
    """``images`` as a float64 ``(n, C, H, W)`` tensor of the flow's event shape."""
    x = torch.as_tensor(_numpy(images, name))
    if x.dim() != 4 or tuple(x.shape[1:]) != tuple(shape):
        raise PushforwardError(
            f"{name}: expected shape {shape_str(('n', *shape))}, got {shape_str(x.shape)}"
        )
    if len(x) < at_least:
        raise PushforwardError(f"{name}: need at least {at_least} images, got {len(x)}")
    if not bool(torch.isfinite(x).all()):
        raise PushforwardError(f"{name} contains NaN or infinite values")
    return x


def _check_levels(levels: int | None) -> int | None:
    if levels is None:
        return None
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise PushforwardError(f"levels must be an integer >= 2, got {levels!r}")
    return levels


def _pixels(y: np.ndarray, levels: int | None) -> np.ndarray:
    """Values of the flow's data space as displayable pixels in [0, 1]."""
    if levels is not None:
        return np.clip(np.floor(y * levels), 0, levels - 1) / (levels - 1)
    return np.clip(y, 0.0, 1.0)


def _mosaic(tiles: np.ndarray, rows: int, cols: int, levels: int | None) -> np.ndarray:
    """``(rows * cols, C, H, W)`` images as one ``(rows (H + 1) - 1, cols (W + 1) - 1[, 3])``
    picture with one-pixel white gaps."""
    n, c, h, w = tiles.shape
    px = _pixels(tiles, levels)
    px = px.transpose(0, 2, 3, 1) if c == 3 else px[:, :1].transpose(0, 2, 3, 1)
    depth = px.shape[-1]
    out = np.ones((rows * (h + 1) - 1, cols * (w + 1) - 1, depth))
    for k in range(min(n, rows * cols)):
        i, j = divmod(k, cols)
        out[i * (h + 1) : i * (h + 1) + h, j * (w + 1) : j * (w + 1) + w] = px[k]
    return out[..., 0] if depth == 1 else out


def _show(
    ax: Any,
    picture: np.ndarray,
    title: str,
    label: str = "",
    columns: Sequence[str] = (),
    tile: int = 0,
) -> None:
    """Draw a mosaic with a title, a row label and (optionally) one label per column of tiles
    of width ``tile`` pixels."""
    if picture.ndim == 2:
        ax.imshow(picture, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(picture, interpolation="nearest")
    ax.set_aspect("auto")
    ax.set_xticks([j * (tile + 1) + (tile - 1) / 2 for j in range(len(columns))])
    ax.set_xticklabels(list(columns), fontsize="x-small")
    ax.tick_params(length=0)
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title, fontsize="small", loc="left")
    if label:
        ax.set_ylabel(label, fontsize="small")


class _Evaluating:
    """Eval mode, no gradients, torch's RNG forked and seeded; the mode restored after."""

    def __init__(self, flow: nn.Module, seed: int | None = 0):
        self.flow, self.seed = flow, seed

    def __enter__(self) -> tuple[torch.dtype, torch.device]:
        self.was_training = self.flow.training
        self.rng = torch.random.fork_rng(devices=[])
        self.rng.__enter__()
        if self.seed is not None:
            torch.manual_seed(self.seed)
        self.grad = torch.no_grad()
        self.grad.__enter__()
        self.flow.eval()
        return _like(self.flow)

    def __exit__(self, *exc: Any) -> None:
        self.flow.train(self.was_training)
        self.grad.__exit__(*exc)
        self.rng.__exit__(*exc)


def sample_at_temperature(
    flow: nn.Module, n: int, temperature: float = 1.0, context: Tensor | None = None
) -> Tensor:
    r"""``n`` samples drawn with the base noise scaled by ``temperature``:
    :math:`x = f(T z)`, :math:`z \sim \mathcal N(0, I)`, i.e. :math:`z \sim \mathcal N(0, T^2 I)`
    (Glow's "temperature", Kingma and Dhariwal 2018, section 5). :math:`T = 1` is ordinary
    sampling (any base); :math:`T < 1` trades diversity for typicality. No gradients; draws
    from torch's global RNG (seed it for reproducible samples); the flow's mode is left as it
    is.

    Args:
        flow: a :class:`~pushforward.distributions.Flow`; for :math:`T \ne 1` its base must be
            the standard normal (where scaling the noise is the temperature).
        n: number of samples per context row (per draw when unconditional).
        temperature: :math:`T \ge 0`.
        context: the conditioning ``(batch, context_features)`` of a conditional flow.

    Returns:
        Samples of shape ``(n, *context_batch, *event_shape)``.

    Example:
        >>> from pushforward.distributions import Flow, StandardNormal
        >>> from pushforward.transforms.linear import ElementwiseAffine
        >>> flow = Flow(StandardNormal(2), ElementwiseAffine(2))
        >>> float(sample_at_temperature(flow, 5, 0.0).abs().max())  # the image of z = 0
        0.0
    """
    from .distributions import StandardNormal

    n = check_positive_int(n, "n")
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise PushforwardError(f"temperature must be a number, got {temperature!r}") from None
    if not (math.isfinite(t) and t >= 0):
        raise PushforwardError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not hasattr(flow, "base") or not hasattr(flow, "transform"):
        raise PushforwardError(f"expected a Flow (base and transform), got {type(flow).__name__}")
    with torch.no_grad():
        if t == 1.0:
            return flow.sample(n, context)
        if not isinstance(flow.base, StandardNormal):
            raise PushforwardError(
                f"a temperature other than 1 scales standard normal base noise; this flow's base "
                f"is {type(flow.base).__name__}"
            )
        batch, c = flow._sample_context(n, context)
        z = flow.base.rsample(batch, c) * t
        return flow.transform(z, c)[0]


def image_samples(
    flow: nn.Module,
    path: str | Path,
    *,
    temperatures: Sequence[float] = TEMPERATURES,
    rows: int = 2,
    cols: int = 8,
    levels: int | None = None,
    seed: int = 0,
) -> Path:
    """A grid of samples of an image flow: one block of ``rows x cols`` samples per
    temperature (:func:`sample_at_temperature`), labelled with it.

    Args:
        flow: an unconditional flow on images with a standard normal base.
        path: where to write the PNG (:func:`image_grid_size` ``([rows] * len(temperatures),
            cols)`` pixels).
        temperatures: the temperatures, one block each (default 0.5, 0.8, 1.0).
        rows: rows of samples per temperature.
        cols: samples per row.
        levels: quantize the samples to this many intensity levels for display.
        seed: seed of the base noise (the same noise, scaled, at every temperature).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    _check_image_flow(flow, "image_samples")
    rows, cols = check_positive_int(rows, "rows"), check_positive_int(cols, "cols")
    levels = _check_levels(levels)
    temperatures = [float(t) for t in temperatures]
    if not temperatures:
        raise PushforwardError("temperatures must list at least one temperature")
    pictures = []
    for t in temperatures:
        with _Evaluating(flow, seed):
            y = sample_at_temperature(flow, rows * cols, t)
        pictures.append(_mosaic(y.double().cpu().numpy(), rows, cols, levels))
    fig, axes = _block_figure([rows] * len(temperatures), cols)
    for ax, t, picture in zip(axes, temperatures, pictures, strict=True):
        _show(ax, picture, f"samples at temperature T = {t:g}", f"T = {t:g}")
    return _save_fixed(fig, path)


def _slerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Spherical interpolation of directions with linearly interpolated norms (per row)."""
    na = a.flatten(1).norm(dim=1).clamp_min(1e-12)
    nb = b.flatten(1).norm(dim=1).clamp_min(1e-12)
    ua, ub = a.flatten(1) / na[:, None], b.flatten(1) / nb[:, None]
    omega = torch.arccos((ua * ub).sum(1).clamp(-1.0, 1.0))
    so = torch.sin(omega)
    small = so < 1e-6  # (anti)parallel: fall back to linear
    safe = torch.where(small, torch.ones_like(so), so)
    wa = torch.where(small, 1.0 - t, torch.sin((1.0 - t) * omega) / safe)
    wb = torch.where(small, torch.full_like(so, t), torch.sin(t * omega) / safe)
    u = wa[:, None] * ua + wb[:, None] * ub
    u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (u * ((1.0 - t) * na + t * nb)[:, None]).reshape(a.shape)


def interpolation(
    flow: nn.Module,
    images: Tensor | np.ndarray,
    path: str | Path,
    *,
    pairs: int = 4,
    steps: int = 8,
    method: str = "slerp",
    levels: int | None = None,
) -> Path:
    r"""Latent interpolation between pairs of images: :math:`z_a = f^{-1}(x_a)`,
    :math:`z_b = f^{-1}(x_b)`, and :math:`f(z(t))` for ``steps`` values of :math:`t` from 0 to 1.

    ``method="slerp"`` (default) interpolates the direction of :math:`z` along the great circle
    and its norm linearly; ``"linear"`` is :math:`z(t) = (1 - t) z_a + t z_b`. Spherical is the
    default because under a Gaussian base almost all mass lies near the sphere
    :math:`\|z\| \approx \sqrt D`, and two latents are nearly orthogonal: the linear midpoint has
    norm about :math:`\|z\| / \sqrt 2`, an atypical point (like a sample at temperature 0.7),
    so linear paths dip towards blurry, over-smooth images halfway, while the spherical path
    stays among typical latents (White 2016, "Sampling generative networks",
    arXiv:1609.04468).

    Args:
        flow: an unconditional flow on images.
        images: ``(n, C, H, W)`` values in the flow's data space, ``n >= 2 pairs``; pair
            :math:`i` is images :math:`2i` and :math:`2i + 1`.
        path: where to write the PNG (:func:`image_grid_size` ``([pairs], steps)`` pixels).
        pairs: number of pairs, one row each.
        steps: images per row (``t = 0, 1/(steps-1), ..., 1``; the ends reconstruct the pair).
        method: ``"slerp"`` or ``"linear"``.
        levels: quantize for display to this many intensity levels.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    shape = _check_image_flow(flow, "interpolation")
    pairs = check_positive_int(pairs, "pairs")
    steps = check_positive_int(steps, "steps")
    if steps < 2:
        raise PushforwardError(f"steps must be at least 2 (both ends), got {steps}")
    if method not in ("slerp", "linear"):
        raise PushforwardError(f"unknown method {method!r}; choose from: slerp, linear")
    levels = _check_levels(levels)
    x = _image_batch(images, shape, "images", 2 * pairs)[: 2 * pairs]
    with _Evaluating(flow) as (dtype, device):
        z = flow.latent(x.to(dtype=dtype, device=device))
        za, zb = z[0::2], z[1::2]
        frames = []
        for t in np.linspace(0.0, 1.0, steps):
            zt = _slerp(za, zb, float(t)) if method == "slerp" else (1 - t) * za + t * zb
            frames.append(flow.transform(zt)[0].double().cpu())
    tiles = torch.stack(frames, dim=1).reshape(pairs * steps, *shape).numpy()
    fig, axes = _block_figure([pairs], steps)
    _show(
        axes[0],
        _mosaic(tiles, pairs, steps, levels),
        f"{'spherical' if method == 'slerp' else 'linear'} latent interpolation",
        "pairs",
        [f"t={t:.2g}" for t in np.linspace(0.0, 1.0, steps)],
        shape[2],
    )
    return _save_fixed(fig, path)


def reconstruction(
    flow: nn.Module,
    images: Tensor | np.ndarray,
    path: str | Path,
    *,
    n: int = 8,
    levels: int | None = None,
) -> tuple[Path, float]:
    r"""Images and their round trip through the flow, :math:`f(f^{-1}(x))`, with the largest
    absolute reconstruction error :math:`\max |x - f(f^{-1}(x))|` in the title.

    Unlike the other plots this returns the error too (a flow is exactly invertible up to
    floating point, so it should be around ``1e-5`` in float32).

    Args:
        flow: an unconditional flow on images.
        images: ``(m, C, H, W)`` values in the flow's data space; the first ``n`` are used.
        path: where to write the PNG (:func:`image_grid_size` ``([1, 1], n)`` pixels).
        n: number of images.
        levels: quantize for display to this many intensity levels.

    Returns:
        ``(path, max_abs_error)``.
    """
    shape = _check_image_flow(flow, "reconstruction")
    n = check_positive_int(n, "n")
    levels = _check_levels(levels)
    x = _image_batch(images, shape, "images")[:n]
    with _Evaluating(flow) as (dtype, device):
        xd = x.to(dtype=dtype, device=device)
        back = flow.transform(flow.latent(xd))[0]
        error = float((back - xd).abs().max())
    cols = len(x)
    fig, axes = _block_figure([1, 1], cols)
    _show(axes[0], _mosaic(x.numpy(), 1, cols, levels), "images x", "x")
    _show(
        axes[1],
        _mosaic(back.double().cpu().numpy(), 1, cols, levels),
        f"f(f^-1(x)); max |error| = {error:.2e}",
        "f(f^-1(x))",
    )
    return _save_fixed(fig, path), error


def latent_edit(
    flow: nn.Module,
    images: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    path: str | Path,
    *,
    label_a: int | None = None,
    label_b: int | None = None,
    ts: Sequence[float] = (-0.5, 0.0, 0.5, 1.0, 1.5),
    rows: int = 4,
    levels: int | None = None,
) -> Path:
    r"""Attribute arithmetic in the latent space (Glow, section 5): the direction
    :math:`\Delta = \bar z_a - \bar z_b` between the mean latents of the images of label
    :math:`a` and of label :math:`b`, added to the latents of ``rows`` images of label
    :math:`b`: :math:`x(t) = f(z_x + t \Delta)` for each :math:`t` in ``ts`` (:math:`t = 0`
    reconstructs the image, :math:`t = 1` moves its latent by the whole mean difference).

    Args:
        flow: an unconditional flow on images.
        images: ``(n, C, H, W)`` values in the flow's data space.
        labels: ``(n,)`` integer labels of the images.
        path: where to write the PNG (:func:`image_grid_size` ``([rows], len(ts))`` pixels).
        label_a: the label moved towards (default: the second smallest label present).
        label_b: the label of the edited images (default: the smallest label present).
        ts: the multiples of :math:`\Delta`, one column each.
        rows: number of edited images (fewer if label :math:`b` has fewer).
        levels: quantize for display to this many intensity levels.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    shape = _check_image_flow(flow, "latent_edit")
    rows = check_positive_int(rows, "rows")
    levels = _check_levels(levels)
    x = _image_batch(images, shape, "images", 2)
    y = np.asarray(labels).reshape(-1)
    if len(y) != len(x):
        raise PushforwardError(f"labels: expected {len(x)} labels (one per image), got {len(y)}")
    present = sorted(set(y.tolist()))
    if len(present) < 2:
        raise PushforwardError(f"latent_edit needs images of two labels, got {present}")
    b = present[0] if label_b is None else label_b
    a = next(v for v in present if v != b) if label_a is None else label_a
    for name, v in (("label_a", a), ("label_b", b)):
        if v not in present:
            raise PushforwardError(f"{name}: no image has label {v!r} (labels: {present})")
    if a == b:
        raise PushforwardError(f"label_a and label_b must differ, got {a!r} twice")
    ts = [float(t) for t in ts]
    if not ts:
        raise PushforwardError("ts must list at least one multiple of the direction")
    with _Evaluating(flow) as (dtype, device):
        z = torch.cat([flow.latent(c.to(dtype=dtype, device=device)) for c in x.split(_BATCH)])
        delta = z[torch.as_tensor(y == a)].mean(0) - z[torch.as_tensor(y == b)].mean(0)
        edited = z[torch.as_tensor(y == b)][:rows]
        frames = [flow.transform(edited + t * delta)[0].double().cpu() for t in ts]
    k = len(edited)
    tiles = torch.stack(frames, dim=1).reshape(k * len(ts), *shape).numpy()
    fig, axes = _block_figure([k], len(ts))
    columns = [f"t={t:g}" for t in ts]
    title = f"f(z + t d), d = mean z[{a}] - mean z[{b}]"
    _show(axes[0], _mosaic(tiles, k, len(ts), levels), title, f"label {b}", columns, shape[2])
    return _save_fixed(fig, path)
