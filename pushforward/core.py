"""The core contract: :class:`Transform`, :class:`Compose`, :class:`Inverse`, and the shared
shape, context and parameter helpers every transform is built from.

Direction: a transform maps base space to data space (the generative direction)::

    forward(z, context=None) -> (x, ladj)    # ladj = log|det dx/dz|, one value per batch element
    inverse(x, context=None) -> (z, ladj)    # ladj = log|det dz/dx|

Contract for implementers:

* inputs have shape ``(*batch, *event)``; ``event`` has ``event_dim`` trailing dimensions
  (1 for vectors, 3 for images); ladj has shape ``batch``;
* a ``context`` reaching a transform already has the input's batch shape (``Flow`` expands it);
* every unconstrained parameter value is a valid transform (constraints are built into the
  parameterisation), so optimisers and the shared checker may move parameters freely;
* state that defines the map (permutations, initialisation flags) lives in buffers, so a
  ``state_dict`` restores the transform exactly.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "PushforwardError",
    "Transform",
    "Compose",
    "Inverse",
    "Identity",
    "Parameters",
    "Transformer",
    "sum_event",
    "check_event",
    "check_context",
    "check_finite",
    "check_features",
    "vmapped",
    "check_positive_int",
    "shape_str",
]


class PushforwardError(ValueError):
    """A problem with what the user gave (shape, value, name, file). The CLI prints its message as
    one line; library code raises it instead of letting torch fail deep inside."""


def shape_str(shape: Sequence[int | str]) -> str:
    """``(5, 3)``-style text of a shape (also for symbolic entries like ``'batch'``)."""
    items = [str(s) for s in shape]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def sum_event(t: Tensor, event_dim: int) -> Tensor:
    """Sum the trailing ``event_dim`` dimensions (the one place event dims are reduced)."""
    if event_dim == 0:
        return t
    return t.sum(dim=tuple(range(-event_dim, 0)))


def check_event(x: Tensor, event_shape: Sequence[int], name: str = "input") -> None:
    """Raise :class:`PushforwardError` unless ``x`` is ``(*batch, *event_shape)`` with a batch."""
    event_shape = tuple(event_shape)
    k = len(event_shape)
    if not isinstance(x, Tensor):
        raise PushforwardError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < k + 1 or tuple(x.shape[x.dim() - k :]) != event_shape:
        expected = shape_str(("batch", *event_shape))
        raise PushforwardError(f"{name}: expected shape {expected}, got {shape_str(x.shape)}")


def vmapped(x: Tensor) -> bool:
    """Whether ``x`` is batched by ``torch.func.vmap``, at any level of functorch wrapping."""
    functorch = getattr(torch._C, "_functorch", None)  # private: absent, nothing is vmapped
    if functorch is None or not hasattr(functorch, "is_batchedtensor"):
        return False
    while functorch.is_functorch_wrapped_tensor(x):
        if functorch.is_batchedtensor(x):
            return True
        x = functorch.get_unwrapped(x)
    return False


def check_finite(x: Tensor, name: str = "input") -> None:
    """Raise :class:`PushforwardError` if ``x`` holds NaN or infinite values.

    Under ``torch.func.vmap`` the check is skipped: it is a data-dependent branch, which vmap
    cannot run (NaN inputs then give NaN outputs, as in plain PyTorch)."""
    if vmapped(x):
        return
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise PushforwardError(f"{name} contains {bad} NaN or infinite value(s)")


def check_context(
    context: Tensor | None, context_features: int, batch_shape: Sequence[int]
) -> Tensor | None:
    """Validate a context against the declared ``context_features`` and broadcast it to
    ``(*batch_shape, context_features)``. Returns ``None`` for an unconditional model."""
    if context_features == 0:
        if context is not None:
            raise PushforwardError("this model is unconditional: it takes no context")
        return None
    if context is None:
        raise PushforwardError(
            f"this model is conditional: it needs a context of shape "
            f"{shape_str(('batch', context_features))}"
        )
    if not isinstance(context, Tensor):
        raise PushforwardError(f"context must be a torch.Tensor, got {type(context).__name__}")
    if context.dim() < 1 or context.shape[-1] != context_features:
        raise PushforwardError(
            f"context: expected shape {shape_str(('batch', context_features))}, "
            f"got {shape_str(context.shape)}"
        )
    target = (*batch_shape, context_features)
    try:
        return context.expand(target)
    except RuntimeError:
        raise PushforwardError(
            f"context of shape {shape_str(context.shape)} does not match the batch shape "
            f"{shape_str(batch_shape)} of the input"
        ) from None


_SPATIAL = {2: ("length",), 3: ("height", "width")}


def check_features(x: Tensor, features: int, event_dim: int = 1, name: str = "input") -> None:
    """Raise :class:`PushforwardError` unless ``x`` is ``(*batch, features, *rest)`` where the
    event is the last ``event_dim`` dimensions and ``rest`` (images: height, width) is free."""
    if event_dim == 1:
        check_event(x, (features,), name)
        return
    if not isinstance(x, Tensor):
        raise PushforwardError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < event_dim + 1 or x.shape[x.dim() - event_dim] != features:
        rest = _SPATIAL.get(event_dim, ("*",) * (event_dim - 1))
        expected = shape_str(("batch", features, *rest))
        raise PushforwardError(f"{name}: expected shape {expected}, got {shape_str(x.shape)}")


def check_positive_int(value: int, name: str) -> int:
    """``value`` as an ``int``; :class:`PushforwardError` unless it is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise PushforwardError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class Transform(nn.Module):
    """An invertible, differentiable map from base space to data space.

    Subclasses implement :meth:`forward` and :meth:`inverse`, each returning the output and the
    log-absolute-determinant of the Jacobian of the direction computed, summed over the event.
    Everything else (composition, inversion, densities) is derived from these two.
    """

    #: number of trailing event dimensions (1: vectors, 3: images)
    event_dim: int = 1

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    @property
    def inv(self) -> Transform:
        """The inverse transform (``t.inv.inv is t``)."""
        return Inverse(self)


class Inverse(Transform):
    """Swap the two directions of a transform: ``Inverse(t).forward = t.inverse``.

    ``Inverse(Inverse(t))`` returns ``t`` itself. An IAF layer is ``Inverse`` of a MAF layer.

    Example:
        >>> from pushforward.transforms.linear import ElementwiseAffine
        >>> t = ElementwiseAffine(2)
        >>> Inverse(Inverse(t)) is t
        True
    """

    def __new__(cls, transform: Transform):
        if isinstance(transform, Inverse):
            return transform.transform
        return super().__new__(cls)

    def __init__(self, transform: Transform):
        super().__init__()
        self.transform = transform
        self.event_dim = transform.event_dim

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.transform.inverse(z, context)

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.transform.forward(x, context)

    @property
    def inv(self) -> Transform:
        return self.transform


class Identity(Transform):
    """The identity map :math:`x = z`, :math:`\\log|\\det J| = 0` (the transform of a flow whose
    density is its base's, e.g. MADE MoG).

    Example:
        >>> Identity()(torch.ones(2, 3))[1]
        tensor([0., 0.])
    """

    def __init__(self, event_dim: int = 1):
        super().__init__()
        self.event_dim = check_positive_int(event_dim, "event_dim")

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        batch = z.shape[: z.dim() - self.event_dim]
        return z, torch.zeros(batch, dtype=z.dtype, device=z.device)

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.forward(x, context)


class Compose(Transform):
    """``x = t_k(... t_1(z))``; log-determinants add.

    .. math::
        \\log|\\det J_{t_k \\circ \\dots \\circ t_1}(z)|
        = \\sum_i \\log|\\det J_{t_i}(z_{i-1})|

    Example:
        >>> from pushforward.transforms.linear import ElementwiseAffine, Permutation
        >>> t = Compose(ElementwiseAffine(3), Permutation.reverse(3))
        >>> x, ladj = t(torch.randn(5, 3))
        >>> ladj.shape
        torch.Size([5])
    """

    def __init__(self, *transforms: Transform):
        super().__init__()
        if len(transforms) == 1 and isinstance(transforms[0], (list, tuple)):
            transforms = tuple(transforms[0])
        if not transforms:
            raise PushforwardError("Compose needs at least one transform")
        self.transforms = nn.ModuleList(transforms)
        self.event_dim = max(t.event_dim for t in transforms)

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        total = None
        for t in self.transforms:
            z, ladj = t(z, context)
            total = ladj if total is None else total + ladj
        return z, total

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        total = None
        for t in reversed(self.transforms):
            x, ladj = t.inverse(x, context)
            total = ladj if total is None else total + ladj
        return x, total

    def __len__(self) -> int:
        return len(self.transforms)

    def __getitem__(self, i: int) -> Transform:
        return self.transforms[i]


class Parameters(nn.Module):
    """The learnable parameters of a transform: free tensors, or a network of the context.

    This is the single mechanism that makes any parametric transform conditional (the amortized
    posterior flows of a VAE use it): with ``context_features == 0`` the parameters are plain
    ``nn.Parameter`` tensors of the given shapes; otherwise an MLP maps the context to all of
    them at once, and ``forward(context)`` returns tensors of shape ``(*batch, *shape)``. The
    network's last layer starts at zero weights with the initial values as bias, so a
    conditional transform starts where the unconditional one does.

    Transforms write their arithmetic so that it broadcasts over optional leading batch
    dimensions of the parameters (``(w * z).sum(-1)`` rather than ``z @ w``).

    Example:
        >>> p = Parameters({"w": (3,), "b": ()}, context_features=2)
        >>> {k: tuple(v.shape) for k, v in p(torch.randn(7, 2)).items()}
        {'w': (7, 3), 'b': (7,)}
    """

    def __init__(
        self,
        shapes: dict[str, Sequence[int]],
        init: dict[str, Tensor | float] | None = None,
        context_features: int = 0,
        hidden: Sequence[int] = (64, 64),
    ):
        super().__init__()
        self.shapes = {k: tuple(int(s) for s in v) for k, v in shapes.items()}
        self.context_features = int(context_features)
        init = dict(init or {})
        values = {}
        for name, shape in self.shapes.items():
            v = init.get(name)
            if v is None:
                v = torch.randn(shape) * (1.0 / math.sqrt(max(1, shape[-1] if shape else 1)))
            else:
                v = torch.as_tensor(v, dtype=torch.get_default_dtype()).expand(shape).clone()
            values[name] = v
        if self.context_features == 0:
            self.params = nn.ParameterDict({k: nn.Parameter(v) for k, v in values.items()})
            self.net = None
        else:
            from .nn.mlp import MLP

            sizes = [math.prod(s) for s in self.shapes.values()]
            self.net = MLP(self.context_features, sum(sizes), hidden)
            last = self.net.last
            nn.init.zeros_(last.weight)
            with torch.no_grad():
                last.bias.copy_(torch.cat([v.reshape(-1) for v in values.values()]))
            self.params = None

    def forward(self, context: Tensor | None = None) -> dict[str, Tensor]:
        if self.net is None:
            return dict(self.params.items())
        if context is None:
            raise PushforwardError(
                f"this transform is conditional: it needs a context of shape "
                f"{shape_str(('batch', self.context_features))}"
            )
        flat = self.net(context)
        batch = flat.shape[:-1]
        out, start = {}, 0
        for name, shape in self.shapes.items():
            n = math.prod(shape)
            out[name] = flat[..., start : start + n].reshape(*batch, *shape)
            start += n
        return out


class Transformer(nn.Module):
    """An elementwise monotone map :math:`x_i = \\tau(z_i; \\theta_i)` whose parameters come from a
    conditioner (the *transformer* of a coupling or autoregressive *structure*).

    ``params`` has shape ``(*batch, features, params_per_feature)``; both directions return the
    output and the **elementwise** log-derivative ``(*batch, features)``, so that a structure can
    sum it over the features it actually transforms. Every real ``params`` is valid.
    """

    #: number of parameters per transformed feature
    params_per_feature: int = 1
    #: whether the transformer is fastest with ``params`` laid out parameter-major (each
    #: parameter's values over the batch contiguous in memory), a layout a conditioner can
    #: give at no cost by computing its output layer transposed (``MADE(..., transposed=True)``)
    param_major: bool = False

    def identity_params(self) -> Tensor:
        """A ``(params_per_feature,)`` vector for which the map is (close to) the identity; a
        structure uses it as the bias of its zero-initialised conditioner output."""
        return torch.zeros(self.params_per_feature)

    def forward(self, z: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError
