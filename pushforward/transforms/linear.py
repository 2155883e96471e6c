r"""Linear flows: elementwise and full affine maps, ActNorm, triangular, LU and permutations.

Every map here is :math:`x = W z + b` for some parameterisation of :math:`W` that keeps it
invertible for every real parameter value and makes :math:`\log|\det W|` cheap. Matrix
parameters broadcast over optional leading batch dimensions (a conditional transform gets one
matrix per context), and the matrix helpers at the top of the module are shared by all of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..core import (
    Parameters,
    PushforwardError,
    Transform,
    check_features,
    check_positive_int,
    shape_str,
    sum_event,
)

__all__ = [
    "ElementwiseAffine",
    "Standardization",
    "FullAffine",
    "ActNorm",
    "BatchNorm",
    "TriangularLinear",
    "LULinear",
    "Permutation",
    "ConvexCombinationLinear",
]


def _batch_ladj(value: Tensor, x: Tensor, event_dim: int) -> Tensor:
    """Broadcast a log-determinant (scalar, or per context) to the batch shape of ``x``."""
    return value + x.new_zeros(x.shape[: x.dim() - event_dim])


def _affine(
    z: Tensor, shift: Tensor, log_scale: Tensor, event_dim: int, inverse: bool = False
) -> tuple[Tensor, Tensor]:
    """``x = exp(log_scale) * z + shift`` (or its inverse); parameters broadcast over the event.

    The log-determinant sums ``log_scale`` over the whole event, so a per-channel scale of an
    image counts once per pixel."""
    ladj = sum_event(log_scale.expand_as(z), event_dim)
    if inverse:
        return (z - shift) * torch.exp(-log_scale), -ladj
    return z * torch.exp(log_scale) + shift, ladj


def _moments(x: Tensor, batch_dims: int, min_scale: float) -> tuple[Tensor, Tensor]:
    """Mean and population standard deviation of ``x`` over its leading ``batch_dims``
    dimensions; the deviation is floored at ``min_scale`` so constant features do not divide by
    zero (shared by :meth:`Standardization.from_data` and :class:`ActNorm`'s initialisation)."""
    dims = tuple(range(batch_dims))
    mean = x.mean(dim=dims)
    std = x.var(dim=dims, unbiased=False).sqrt().clamp_min(min_scale)
    return mean, std


def _matvec(m: Tensor, z: Tensor) -> Tensor:
    """``m @ z`` for matrices ``(*pbatch, d, d)`` and vectors ``z`` of shape ``(*batch, d)``."""
    if m.dim() == 2:
        return z @ m.mT
    return (m @ z.unsqueeze(-1)).squeeze(-1)


def _solve(m: Tensor, y: Tensor, triangular: str | None = None, unit: bool = False) -> Tensor:
    """Solve ``m z = y`` for ``z``; ``triangular`` is ``'lower'``, ``'upper'`` or ``None``.

    One shared matrix (unconditional) is solved once for all batch elements at once."""

    def solve(a: Tensor, b: Tensor) -> Tensor:
        if triangular is None:
            return torch.linalg.solve(a, b)
        return torch.linalg.solve_triangular(a, b, upper=triangular == "upper", unitriangular=unit)

    if m.dim() == 2:
        d = y.shape[-1]
        return solve(m, y.reshape(-1, d).mT).mT.reshape(y.shape)
    return solve(m, y.unsqueeze(-1)).squeeze(-1)


def _strict_triangular(values: Tensor, d: int, lower: bool) -> Tensor:
    """A ``(*batch, d, d)`` strictly lower (or upper) triangular matrix from its
    ``d (d - 1) / 2`` packed entries ``values`` of shape ``(*batch, d (d - 1) / 2)``."""
    i, j = torch.tril_indices(d, d, -1, device=values.device)
    if not lower:
        i, j = j, i
    m = values.new_zeros(*values.shape[:-1], d, d)
    m[..., i, j] = values
    return m


def _packed_size(d: int) -> int:
    return d * (d - 1) // 2


def _pack_strict(m: Tensor, lower: bool) -> Tensor:
    """Inverse of :func:`_strict_triangular` (for initial values)."""
    d = m.shape[-1]
    i, j = torch.tril_indices(d, d, -1)
    return m[..., i, j] if lower else m[..., j, i]


def _permute(x: Tensor, index: Tensor, event_dim: int) -> Tensor:
    """Reorder the feature axis (``-event_dim``): ``out[..., i, ...] = x[..., index[i], ...]``."""
    return x.index_select(x.dim() - event_dim, index)


def _generator(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(int(seed))


class ElementwiseAffine(Transform):
    r"""Learnable per-feature scale and shift, the identity at initialisation.

    .. math::
        x = e^{s} \odot z + b, \qquad \log|\det \partial x / \partial z| = \sum_i s_i

    Any real :math:`s, b` is valid. Both directions cost :math:`O(d)` per sample. With
    ``context_features > 0``, :math:`s` and :math:`b` are a network of the context.

    Args:
        features: size :math:`d` of the vectors.
        context_features: size of the conditioning vector (0: unconditional).
        hidden: hidden widths of the context network.

    References:
        Dinh, Sohl-Dickstein and Bengio (2017), "Density estimation using Real NVP",
        arXiv:1605.08803 (the affine map of its coupling layers, here unconditioned).

    Example:
        >>> t = ElementwiseAffine(3)
        >>> x, ladj = t(torch.randn(5, 3))
        >>> x.shape, ladj.shape
        (torch.Size([5, 3]), torch.Size([5]))
    """

    def __init__(self, features: int, context_features: int = 0, hidden: Sequence[int] = (64, 64)):
        super().__init__()
        self.features = check_positive_int(features, "features")
        d = self.features
        self.params = Parameters(
            {"shift": (d,), "log_scale": (d,)},
            {"shift": 0.0, "log_scale": 0.0},
            context_features,
            hidden,
        )

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_features(z, self.features)
        p = self.params(context)
        return _affine(z, p["shift"], p["log_scale"], 1)

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_features(x, self.features)
        p = self.params(context)
        return _affine(x, p["shift"], p["log_scale"], 1, inverse=True)


class Standardization(Transform):
    r"""A fixed affine map ``x = loc + scale * z``: how a fitted model stores its data scaling.

    .. math::
        x = \mu + \sigma \odot z, \qquad
        \log|\det \partial x / \partial z| = \sum_{\text{event}} \log \sigma

    ``loc`` and ``scale`` are buffers (no parameters) that broadcast over the event: a shape
    ``(C, 1, 1)`` scale standardises each channel of ``(batch, C, H, W)`` images and counts
    ``H W`` times in the log-determinant. As the last transform of a flow, the flow models
    standardised data while its log-likelihood stays in the units of the data as given. Both
    directions cost :math:`O(d)` per sample. A context, if passed, is ignored.

    Args:
        loc: the mean :math:`\mu` (any shape broadcasting over the event).
        scale: the positive standard deviation :math:`\sigma` (same rule).
        event_dim: number of event dimensions (default: the larger number of dimensions of
            ``loc`` and ``scale``, at least 1).

    Example:
        >>> data = torch.randn(100, 3) * 5 + 2
        >>> t = Standardization.from_data(data)
        >>> z, _ = t.inverse(data)
        >>> bool(z.mean(0).abs().max() < 1e-5)
        True
    """

    def __init__(self, loc: Tensor, scale: Tensor, event_dim: int | None = None):
        super().__init__()
        loc = torch.as_tensor(loc, dtype=torch.get_default_dtype())
        scale = torch.as_tensor(scale, dtype=loc.dtype)
        try:
            shape = torch.broadcast_shapes(loc.shape, scale.shape)
        except RuntimeError:
            raise PushforwardError(
                f"Standardization: loc {shape_str(loc.shape)} and scale {shape_str(scale.shape)} "
                "do not broadcast"
            ) from None
        if event_dim is None:
            event_dim = max(1, len(shape))
        self.event_dim = check_positive_int(event_dim, "event_dim")
        if len(shape) > self.event_dim:
            raise PushforwardError(
                f"Standardization: loc/scale of shape {shape_str(shape)} have more than "
                f"event_dim={self.event_dim} dimensions"
            )
        if not (torch.isfinite(loc).all() and torch.isfinite(scale).all()):
            raise PushforwardError("Standardization: loc and scale must be finite")
        if not bool((scale > 0).all()):
            raise PushforwardError("Standardization: every scale must be positive")
        self.register_buffer("loc", loc.expand(shape).clone())
        self.register_buffer("scale", scale.expand(shape).clone())

    @classmethod
    def from_data(
        cls, data: Tensor, event_dim: int = 1, min_scale: float = 1e-6
    ) -> Standardization:
        """Fit ``loc`` and ``scale`` to the mean and standard deviation of each event entry of
        ``data`` (shape ``(*batch, *event)``), so that ``inverse(data)`` is standardised.

        Constant features (standard deviation below ``min_scale``) get scale ``min_scale``: they
        map to zero instead of dividing by zero."""
        data = torch.as_tensor(data)
        if not data.is_floating_point():
            data = data.to(torch.get_default_dtype())
        event_dim = check_positive_int(event_dim, "event_dim")
        if data.dim() < event_dim + 1 or data.shape[0] == 0:
            raise PushforwardError(
                f"Standardization.from_data: expected data of shape (batch, *event) with "
                f"event_dim={event_dim} and at least one row, got {shape_str(data.shape)}"
            )
        if not torch.isfinite(data).all():
            raise PushforwardError("Standardization.from_data: data contains NaN or infinity")
        loc, scale = _moments(data, data.dim() - event_dim, min_scale)
        return cls(loc, scale, event_dim)

    def _check(self, x: Tensor) -> None:
        k = self.event_dim
        if not isinstance(x, Tensor):
            raise PushforwardError(f"input must be a torch.Tensor, got {type(x).__name__}")
        event = tuple(x.shape[x.dim() - k :])
        ok = x.dim() > k
        if ok:
            try:
                ok = torch.broadcast_shapes(self.loc.shape, event) == event
            except RuntimeError:
                ok = False
        if not ok:
            raise PushforwardError(
                f"input: expected shape (batch, *event) with {k} event dimension(s) matching "
                f"loc/scale {shape_str(self.loc.shape)}, got {shape_str(x.shape)}"
            )

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(z)
        return _affine(z, self.loc, torch.log(self.scale), self.event_dim)

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x)
        return _affine(x, self.loc, torch.log(self.scale), self.event_dim, inverse=True)


class FullAffine(Transform):
    r"""A dense affine map ``x = A z + b`` with an unconstrained matrix (the reference linear flow).

    .. math::
        x = A z + b, \qquad \log|\det \partial x / \partial z| = \log|\det A|

    :math:`A` starts at the identity. Singular matrices form a set of measure zero, so every
    parameter value reached by an optimiser is in practice invertible; near-singular ones make
    the inverse ill-conditioned, which is why :class:`LULinear` is preferred for training.
    Cost: ``forward`` is :math:`O(d^2)` per sample plus an :math:`O(d^3)` ``slogdet`` (once per
    call, or per sample when conditional); ``inverse`` solves the system in :math:`O(d^3)`
    (``torch.linalg.solve``, exact up to rounding).

    Args:
        features: size :math:`d` of the vectors.
        context_features: size of the conditioning vector (0: unconditional).
        hidden: hidden widths of the context network.

    References:
        Kingma and Dhariwal (2018), "Glow: Generative flow with invertible 1x1 convolutions",
        arXiv:1807.03039, section 3.2 (the dense map and its :math:`O(d^3)` determinant).

    Example:
        >>> t = FullAffine(3)
        >>> z = torch.randn(5, 3)
        >>> bool(torch.allclose(t.inverse(t(z)[0])[0], z, atol=1e-6))
        True
    """

    def __init__(self, features: int, context_features: int = 0, hidden: Sequence[int] = (64, 64)):
        super().__init__()
        self.features = check_positive_int(features, "features")
        d = self.features
        self.params = Parameters(
            {"weight": (d, d), "shift": (d,)},
            {"weight": torch.eye(d), "shift": 0.0},
            context_features,
            hidden,
        )

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_features(z, self.features)
        p = self.params(context)
        a = p["weight"]
        return _matvec(a, z) + p["shift"], _batch_ladj(torch.linalg.slogdet(a)[1], z, 1)

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_features(x, self.features)
        p = self.params(context)
        a = p["weight"]
        return _solve(a, x - p["shift"]), _batch_ladj(-torch.linalg.slogdet(a)[1], x, 1)


class ActNorm(Transform):
    r"""Activation normalisation: a per-feature (or per-channel) affine map with data-dependent
    initialisation.

    .. math::
        x = e^{s} \odot z + b, \qquad
        \log|\det \partial x / \partial z| = n \sum_c s_c

    where :math:`c` runs over the features of vectors (``event_dim=1``, :math:`n = 1`) or the
    channels of ``(batch, C, H, W)`` images (``event_dim=3``, :math:`n = H W`). On the first
    ``inverse`` call (the data-to-base direction) in training mode, :math:`b` and :math:`s` are set
    to the mean and log standard deviation (floored at 1e-6) of that batch per feature/channel,
    so that the outputs have zero mean and unit variance; the buffer ``initialized`` records it,
    so a loaded model is not re-initialised. ``forward`` never initialises. Both directions cost
    :math:`O(1)` per scalar. ActNorm is unconditional (a context, if passed, is ignored).

    Args:
        features: number of features (vectors) or channels (images).
        event_dim: 1 for vectors ``(batch, features)``, 3 for images ``(batch, C, H, W)``.

    References:
        Kingma and Dhariwal (2018), "Glow: Generative flow with invertible 1x1 convolutions",
        arXiv:1807.03039, section 3.1.

    Example:
        >>> t = ActNorm(3, event_dim=3)
        >>> x = 5 + 2 * torch.randn(16, 3, 4, 4)
        >>> z, ladj = t.inverse(x)  # initialises on this batch
        >>> bool(z.mean().abs() < 1e-5), bool(t.initialized)
        (True, True)
    """

    def __init__(self, features: int, event_dim: int = 1):
        super().__init__()
        self.features = check_positive_int(features, "features")
        self.event_dim = check_positive_int(event_dim, "event_dim")
        self.shift = nn.Parameter(torch.zeros(self.features))
        self.log_scale = nn.Parameter(torch.zeros(self.features))
        self.register_buffer("initialized", torch.tensor(False))

    def _view(self, p: Tensor) -> Tensor:
        return p.view(self.features, *([1] * (self.event_dim - 1)))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set the parameters so that ``inverse(x)`` is standardised per feature/channel."""
        check_features(x, self.features, self.event_dim)
        flat = x.detach().movedim(x.dim() - self.event_dim, -1).reshape(-1, self.features)
        mean, std = _moments(flat, 1, 1e-6)
        self.shift.copy_(mean)
        self.log_scale.copy_(torch.log(std))
        self.initialized.fill_(True)

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_features(z, self.features, self.event_dim)
        return _affine(z, self._view(self.shift), self._view(self.log_scale), self.event_dim)

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_features(x, self.features, self.event_dim)
        if self.training and not bool(self.initialized):
            self.initialize(x)
        s, b = self._view(self.log_scale), self._view(self.shift)
        return _affine(x, b, s, self.event_dim, inverse=True)


class BatchNorm(Transform):
    r"""Batch normalisation as an invertible layer, as between the blocks of MAF.

    In the density (data-to-base) direction,

    .. math::
        z = e^{\gamma} \odot \frac{x - m}{\sqrt{v + \epsilon}} + \beta, \qquad
        \log|\det \partial z / \partial x|
        = \sum_i \big(\gamma_i - \tfrac12 \log(v_i + \epsilon)\big)

    where :math:`m, v` are the minibatch mean and variance while training (``inverse`` in
    training mode, which also updates running averages with ``momentum``) and the running
    averages otherwise; ``forward`` (sampling) always uses the running averages. In eval mode it
    is therefore a fixed elementwise affine map, which is what makes densities of single points
    well defined. Both directions cost :math:`O(d)` per sample. Unconditional (a context, if
    passed, is ignored).

    Args:
        features: size :math:`d` of the vectors.
        momentum: weight of the newest batch in the running averages.
        eps: added to the variance.

    References:
        Papamakarios, Pavlakou and Murray (2017), "Masked Autoregressive Flow for Density
        Estimation", arXiv:1705.07057, section 3.4; Dinh, Sohl-Dickstein and Bengio (2017),
        arXiv:1605.08803, section 3.7.

    Example:
        >>> t = BatchNorm(2)
        >>> z, ladj = t.inverse(3 + 2 * torch.randn(256, 2))  # training mode: batch statistics
        >>> bool(z.mean(0).abs().max() < 1e-5)
        True
    """

    def __init__(self, features: int, momentum: float = 0.05, eps: float = 1e-5):
        super().__init__()
        self.features = check_positive_int(features, "features")
        self.momentum, self.eps = float(momentum), float(eps)
        self.log_gamma = nn.Parameter(torch.zeros(self.features))
        self.beta = nn.Parameter(torch.zeros(self.features))
        self.register_buffer("running_mean", torch.zeros(self.features))
        self.register_buffer("running_var", torch.ones(self.features))

    def _generative(self, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """Shift and log-scale of the generative map ``x = exp(log_scale) * z + shift``."""
        log_scale = 0.5 * torch.log(var + self.eps) - self.log_gamma
        return mean - torch.exp(log_scale) * self.beta, log_scale

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_features(z, self.features)
        shift, log_scale = self._generative(self.running_mean, self.running_var)
        return _affine(z, shift, log_scale, 1)

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_features(x, self.features)
        if self.training:
            flat = x.reshape(-1, self.features)
            mean, var = flat.mean(0), flat.var(0, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach(), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        shift, log_scale = self._generative(mean, var)
        return _affine(x, shift, log_scale, 1, inverse=True)


class TriangularLinear(Transform):
    r"""A triangular affine map with a positive diagonal.

    .. math::
        x = T z + b, \quad T_{ii} = e^{\ell_i}, \qquad
        \log|\det \partial x / \partial z| = \sum_i \ell_i

    :math:`T` is lower (or upper) triangular; its off-diagonal entries and :math:`\ell` are free
    (packed, :math:`d(d-1)/2` of them), so every real value is invertible. It starts at the
    identity. Both directions cost :math:`O(d^2)` per sample; the inverse is an exact
    triangular solve (``torch.linalg.solve_triangular``).

    Args:
        features: size :math:`d` of the vectors.
        lower: lower (``True``) or upper triangular.
        context_features: size of the conditioning vector (0: unconditional).
        hidden: hidden widths of the context network.

    References:
        Tomczak and Welling (2017), "Improving variational auto-encoders using convex
        combination linear inverse autoregressive flow", arXiv:1706.02326 (the linear IAF is
        a triangular map); Kingma et al. (2016), "Improved variational inference with inverse
        autoregressive flow", arXiv:1606.04934.

    Example:
        >>> t = TriangularLinear(4, lower=False)
        >>> z = torch.randn(2, 4)
        >>> bool(torch.allclose(t.inverse(t(z)[0])[0], z, atol=1e-6))
        True
    """

    def __init__(
        self,
        features: int,
        lower: bool = True,
        context_features: int = 0,
        hidden: Sequence[int] = (64, 64),
    ):
        super().__init__()
        self.features = check_positive_int(features, "features")
        self.lower = bool(lower)
        d = self.features
        self.params = Parameters(
            {"off_diagonal": (_packed_size(d),), "log_diag": (d,), "shift": (d,)},
            {"off_diagonal": 0.0, "log_diag": 0.0, "shift": 0.0},
            context_features,
            hidden,
        )

    def matrix(self, context: Tensor | None = None) -> Tensor:
        """The dense triangular matrix :math:`T` (``(*batch, d, d)`` when conditional)."""
        return self._matrix(self.params(context))

    def _matrix(self, p: dict[str, Tensor]) -> Tensor:
        off = _strict_triangular(p["off_diagonal"], self.features, self.lower)
        return off + torch.diag_embed(torch.exp(p["log_diag"]))

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_features(z, self.features)
        p = self.params(context)
        x = _matvec(self._matrix(p), z) + p["shift"]
        return x, _batch_ladj(p["log_diag"].sum(-1), z, 1)

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_features(x, self.features)
        p = self.params(context)
        side = "lower" if self.lower else "upper"
        z = _solve(self._matrix(p), x - p["shift"], side)
        return z, _batch_ladj(-p["log_diag"].sum(-1), x, 1)


class LULinear(Transform):
    r"""An invertible linear map in LU form, :math:`W = P L U` (Glow's LU-decomposed 1x1 map).

    .. math::
        x = P L U z + b, \quad U_{ii} = \sigma_i e^{s_i}, \qquad
        \log|\det \partial x / \partial z| = \sum_i s_i

    since :math:`|\det P| = 1`, :math:`\det L = 1` (unit lower triangular) and
    :math:`\det U = \prod_i \sigma_i e^{s_i}`. The permutation :math:`P` and the signs
    :math:`\sigma` are fixed buffers; the strict triangles of :math:`L` and :math:`U` and
    :math:`s` are free, so every real value is invertible. As in Glow, the layer starts at the
    LU decomposition of a random rotation (so :math:`\log|\det W| = 0` at start), drawn from
    ``seed`` (``None``: torch's global generator). Both directions cost :math:`O(d^2)` per
    sample; the inverse is two exact triangular solves.

    Args:
        features: size :math:`d` of the vectors.
        context_features: size of the conditioning vector (0: unconditional).
        seed: seed of the initial rotation (which fixes :math:`P` and :math:`\sigma`).
        hidden: hidden widths of the context network.

    References:
        Kingma and Dhariwal (2018), "Glow: Generative flow with invertible 1x1 convolutions",
        arXiv:1807.03039, section 3.2.

    Example:
        >>> t = LULinear(3, seed=0)
        >>> z = torch.randn(4, 3)
        >>> bool(torch.allclose(t(z)[0], z @ t.weight().T, atol=1e-6))
        True
    """

    def __init__(
        self,
        features: int,
        context_features: int = 0,
        seed: int | None = None,
        hidden: Sequence[int] = (64, 64),
    ):
        super().__init__()
        self.features = check_positive_int(features, "features")
        d = self.features
        q = torch.linalg.qr(torch.randn(d, d, generator=_generator(seed), dtype=torch.float64))[0]
        p, lower, upper = torch.linalg.lu(q)
        diag = upper.diagonal()
        perm = p.argmax(-1)
        self.register_buffer("perm", perm)
        self.register_buffer("inverse_perm", torch.argsort(perm))
        self.register_buffer("sign", torch.sign(diag).to(torch.get_default_dtype()))
        self.params = Parameters(
            {
                "lower": (_packed_size(d),),
                "upper": (_packed_size(d),),
                "log_diag": (d,),
                "shift": (d,),
            },
            {
                "lower": _pack_strict(lower, True),
                "upper": _pack_strict(upper, False),
                "log_diag": torch.log(diag.abs()),
                "shift": 0.0,
            },
            context_features,
            hidden,
        )

    def _factors(self, p: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        d = self.features
        eye = torch.eye(d, dtype=p["log_diag"].dtype, device=p["log_diag"].device)
        lower = _strict_triangular(p["lower"], d, True) + eye
        upper = _strict_triangular(p["upper"], d, False)
        upper = upper + torch.diag_embed(self.sign * torch.exp(p["log_diag"]))
        return lower, upper

    def weight(self, context: Tensor | None = None) -> Tensor:
        """The dense matrix :math:`W = P L U` (``(*batch, d, d)`` when conditional)."""
        lower, upper = self._factors(self.params(context))
        return (lower @ upper).index_select(-2, self.perm)

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_features(z, self.features)
        p = self.params(context)
        lower, upper = self._factors(p)
        x = _permute(_matvec(lower, _matvec(upper, z)), self.perm, 1) + p["shift"]
        return x, _batch_ladj(p["log_diag"].sum(-1), z, 1)

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_features(x, self.features)
        p = self.params(context)
        lower, upper = self._factors(p)
        y = _permute(x - p["shift"], self.inverse_perm, 1)
        z = _solve(upper, _solve(lower, y, "lower", unit=True), "upper")
        return z, _batch_ladj(-p["log_diag"].sum(-1), x, 1)


class Permutation(Transform):
    r"""A fixed reordering of the features (or of the channels of images).

    .. math::
        x_i = z_{\pi(i)}, \qquad \log|\det \partial x / \partial z| = 0

    ``perm`` (the :math:`\pi`) is a buffer. The feature axis is the first event dimension
    (``-event_dim``): the last one for vectors, the channels of ``(batch, C, H, W)`` images.
    Both directions cost :math:`O(d)` per sample (a gather). A context, if passed, is ignored.

    Args:
        perm: a permutation of ``0, ..., d - 1``.
        event_dim: 1 for vectors, 3 for images.

    Example:
        >>> Permutation.reverse(3)(torch.tensor([[1.0, 2.0, 3.0]]))[0]
        tensor([[3., 2., 1.]])
    """

    def __init__(self, perm: Tensor, event_dim: int = 1):
        super().__init__()
        perm = torch.as_tensor(perm)
        if perm.dim() != 1 or perm.numel() == 0 or perm.is_floating_point():
            raise PushforwardError(
                f"Permutation: expected a 1-D integer tensor, got {shape_str(perm.shape)} "
                f"of {perm.dtype}"
            )
        perm = perm.long()
        if not torch.equal(torch.sort(perm).values, torch.arange(perm.numel())):
            raise PushforwardError(
                f"Permutation: {perm.tolist()} is not a permutation of 0..{perm.numel() - 1}"
            )
        self.features = perm.numel()
        self.event_dim = check_positive_int(event_dim, "event_dim")
        self.register_buffer("perm", perm.clone())
        self.register_buffer("inverse_perm", torch.argsort(perm))

    @classmethod
    def reverse(cls, features: int, event_dim: int = 1) -> Permutation:
        """Reverse the order of the features (MAF/RealNVP's default between layers)."""
        return cls(torch.arange(check_positive_int(features, "features") - 1, -1, -1), event_dim)

    @classmethod
    def random(cls, features: int, seed: int = 0, event_dim: int = 1) -> Permutation:
        """A uniformly random permutation, reproducible from ``seed``."""
        n = check_positive_int(features, "features")
        return cls(torch.randperm(n, generator=_generator(seed)), event_dim)

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_features(z, self.features, self.event_dim)
        return _permute(z, self.perm, self.event_dim), z.new_zeros(z.shape[: -self.event_dim])

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_features(x, self.features, self.event_dim)
        z = _permute(x, self.inverse_perm, self.event_dim)
        return z, x.new_zeros(x.shape[: -self.event_dim])


class ConvexCombinationLinear(Transform):
    r"""ccLinIAF: a volume-preserving linear map whose unit lower-triangular matrix is a convex
    combination of ``components`` learnable ones, weighted by the context.

    .. math::
        x = L(c)\, z, \quad L(c) = \sum_{k=1}^K y_k(c) L_k, \quad
        y(c) = \operatorname{softmax}(h(c)), \qquad
        \log|\det \partial x / \partial z| = 0

    Each :math:`L_k` is lower triangular with a unit diagonal, and the weights sum to one, so
    :math:`L(c)` is unit lower triangular too: :math:`\det L(c) = 1`. With
    ``context_features > 0`` the logits :math:`h(c)` and, as in the paper's amortized encoder,
    the :math:`L_k` are outputs of a network of the context (a VAE's encoder features);
    unconditional, they are free parameters. The :math:`L_k` start slightly apart (random
    entries of size 0.01), so that the weights receive gradients. Forming :math:`L(c)` costs
    :math:`O(K d^2)`; ``forward`` is then :math:`O(d^2)` per sample and ``inverse`` an exact
    unit-lower-triangular solve, also :math:`O(d^2)`.

    Args:
        features: size :math:`d` of the vectors.
        components: number :math:`K` of matrices combined.
        context_features: size of the conditioning vector (0: unconditional).
        hidden: hidden widths of the context network.

    References:
        Tomczak and Welling (2017), "Improving variational auto-encoders using convex
        combination linear inverse autoregressive flow", arXiv:1706.02326.

    Example:
        >>> t = ConvexCombinationLinear(3, components=4, context_features=2)
        >>> x, ladj = t(torch.randn(5, 3), torch.randn(5, 2))
        >>> ladj
        tensor([0., 0., 0., 0., 0.])
    """

    def __init__(
        self,
        features: int,
        components: int = 5,
        context_features: int = 0,
        hidden: Sequence[int] = (64, 64),
    ):
        super().__init__()
        self.features = check_positive_int(features, "features")
        self.components = check_positive_int(components, "components")
        k, m = self.components, _packed_size(self.features)
        self.params = Parameters(
            {"logits": (k,), "lower": (k, m)},
            {"logits": 0.0, "lower": 0.01 * torch.randn(k, m)},
            context_features,
            hidden,
        )

    def weights(self, context: Tensor | None = None) -> Tensor:
        """The convex weights :math:`y(c)`, shape ``(*batch, K)``, summing to one."""
        return torch.softmax(self.params(context)["logits"], -1)

    def matrix(self, context: Tensor | None = None) -> Tensor:
        """The unit lower-triangular :math:`L(c)` (``(*batch, d, d)`` when conditional)."""
        return self._matrix(self.params(context))

    def _matrix(self, p: dict[str, Tensor]) -> Tensor:
        y = torch.softmax(p["logits"], -1)
        strict = (y.unsqueeze(-1) * p["lower"]).sum(-2)
        m = _strict_triangular(strict, self.features, True)
        return m + torch.eye(self.features, dtype=m.dtype, device=m.device)

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_features(z, self.features)
        x = _matvec(self._matrix(self.params(context)), z)
        return x, z.new_zeros(z.shape[:-1])

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_features(x, self.features)
        z = _solve(self._matrix(self.params(context)), x, "lower", unit=True)
        return z, x.new_zeros(x.shape[:-1])
