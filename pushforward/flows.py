"""Ready-made flows and the registry: ``build(name, features, context_features=0, **options)``.

One vocabulary of options for every recipe (``layers``, ``hidden``, ``bins``, ``base``,
``permutation``, ``batch_norm``); an option a recipe cannot use is an error naming it.

Example:
    >>> flow = build("planar", 2, layers=4)
    >>> flow.log_prob(torch.zeros(3, 2)).shape
    torch.Size([3])
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .core import Compose, Identity, Inverse, PushforwardError, Transform, Transformer
from .distributions import Base, DiagNormal, Flow, GaussianMixture, MADEMoG, StandardNormal

__all__ = ["build", "names", "describe", "register", "make_base", "Recipe"]


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    fn: Callable[..., Flow]

    @property
    def options(self) -> dict[str, object]:
        """The recipe's options and their defaults."""
        sig = inspect.signature(self.fn)
        return {
            k: p.default
            for k, p in sig.parameters.items()
            if p.kind == inspect.Parameter.KEYWORD_ONLY
        }


_REGISTRY: dict[str, Recipe] = {}


def register(name: str, summary: str) -> Callable[[Callable[..., Flow]], Callable[..., Flow]]:
    """Register ``fn(features, context_features=0, *, option=default, ...) -> Flow``."""

    def deco(fn: Callable[..., Flow]) -> Callable[..., Flow]:
        if name in _REGISTRY:
            raise RuntimeError(f"flow {name!r} registered twice")
        _REGISTRY[name] = Recipe(name, summary, fn)
        return fn

    return deco


def names() -> list[str]:
    """The registered flow names, in registration order."""
    return list(_REGISTRY)


def describe(name: str) -> Recipe:
    """The recipe registered under ``name`` (clear error for an unknown name)."""
    if name not in _REGISTRY:
        raise PushforwardError(f"unknown flow {name!r}; choose from: {', '.join(names())}")
    return _REGISTRY[name]


def build(name: str, features: int, context_features: int = 0, **options) -> Flow:
    """Build the registered flow ``name`` over ``features`` dimensions."""
    recipe = describe(name)
    allowed = recipe.options
    for key in options:
        if key not in allowed:
            raise PushforwardError(
                f"flow {name!r} has no option {key!r}; its options are: "
                f"{', '.join(allowed) or 'none'}"
            )
    if not isinstance(features, int) or features < 1:
        raise PushforwardError(f"features must be a positive integer, got {features!r}")
    if not isinstance(context_features, int) or context_features < 0:
        raise PushforwardError(
            f"context_features must be a non-negative integer, got {context_features!r}"
        )
    return recipe.fn(features, context_features, **options)


def make_base(kind: str, features: int, context_features: int = 0) -> Base:
    """``normal`` (standard), ``diag-normal`` (learnable) or ``mixture`` (learnable, 8 comps);
    the learnable ones are conditional when ``context_features > 0``."""
    if kind == "normal":
        return StandardNormal(features)
    if kind == "diag-normal":
        return DiagNormal(features, context_features)
    if kind == "mixture":
        return GaussianMixture(features, 8, context_features)
    raise PushforwardError(f"unknown base {kind!r}; choose from: normal, diag-normal, mixture")


def _flow(base: str, features: int, context_features: int, transform: Transform) -> Flow:
    return Flow(make_base(base, features, context_features), transform, context_features)


def _check_positive(name: str, value: int) -> int:
    if not isinstance(value, int) or value < 1:
        raise PushforwardError(f"option {name} must be a positive integer, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# Recipes. Each returns a Flow; options are keyword-only with their best general defaults.


@register("planar", "planar flow (Rezende & Mohamed 2015): K layers x + u h(w^T x + b)")
def planar(features: int, context_features: int = 0, *, layers: int = 32, base: str = "normal"):
    from .transforms.planar_radial import Planar

    k = _check_positive("layers", layers)
    t = Compose(*[Planar(features, context_features) for _ in range(k)])
    return _flow(base, features, context_features, t)


@register("radial", "radial flow (Rezende & Mohamed 2015): K radial contractions/expansions")
def radial(features: int, context_features: int = 0, *, layers: int = 32, base: str = "normal"):
    from .transforms.planar_radial import Radial

    k = _check_positive("layers", layers)
    t = Compose(*[Radial(features, context_features) for _ in range(k)])
    return _flow(base, features, context_features, t)


@register(
    "householder",
    "Householder flow (Tomczak & Welling 2016): K reflections of a learnable diagonal Gaussian",
)
def householder(
    features: int, context_features: int = 0, *, layers: int = 8, base: str = "diag-normal"
):
    from .transforms.householder import Householder

    k = _check_positive("layers", layers)
    t = Householder(features, reflections=k, context_features=context_features)
    return _flow(base, features, context_features, t)


@register("affine", "full affine map A z + b of a standard normal (a full-covariance Gaussian)")
def affine(features: int, context_features: int = 0, *, base: str = "normal"):
    from .transforms.linear import FullAffine

    return _flow(base, features, context_features, FullAffine(features, context_features))


@register("lu", "stack of LU-decomposed linear maps and learnable leaky-ReLU nonlinearities")
def lu(features: int, context_features: int = 0, *, layers: int = 8, base: str = "normal"):
    from .transforms.elementwise import LeakyReLU
    from .transforms.linear import ElementwiseAffine, LULinear

    k = _check_positive("layers", layers)
    parts: list[Transform] = [ElementwiseAffine(features, context_features)]
    for _ in range(k):
        # slopes start near 1 (near the identity: the stack's initial density is not stretched
        # by (1/a)^k in the negative orthant) and are learned per layer
        slope = LeakyReLU(0.9, learnable=True, context_features=context_features)
        parts += [LULinear(features, context_features), slope]
    parts.append(LULinear(features, context_features))
    return _flow(base, features, context_features, Compose(*parts))


@register(
    "piecewise-linear",
    "LU mixing + sigmoid -> K-bin monotone piecewise-linear map of [0,1] -> logit, stacked",
)
def piecewise_linear(
    features: int,
    context_features: int = 0,
    *,
    layers: int = 4,
    bins: int = 16,
    base: str = "normal",
):
    from .transforms.elementwise import Logit, PiecewiseLinear, Sigmoid
    from .transforms.linear import ElementwiseAffine, LULinear

    k, b = _check_positive("layers", layers), _check_positive("bins", bins)
    parts: list[Transform] = []
    for _ in range(k):
        parts += [
            LULinear(features, context_features),
            Sigmoid(),
            PiecewiseLinear(features, bins=b, context_features=context_features),
            Logit(),
        ]
    parts.append(ElementwiseAffine(features, context_features))
    return _flow(base, features, context_features, Compose(*parts))


# ---------------------------------------------------------------------------------------------
# Autoregressive family: one structure (MaskedAutoregressive) x elementwise transformers.


def _orders(features: int, layers: int, permutation: str, seed: int = 0) -> list[torch.Tensor]:
    """The autoregressive order of each layer. Reversing (or permuting) the order between
    layers is the same map as a permutation layer between them, without the extra pass."""
    natural = torch.arange(features)
    if permutation == "reverse":
        return [natural if i % 2 == 0 else natural.flip(0) for i in range(layers)]
    if permutation == "random":
        g = torch.Generator().manual_seed(seed)
        return [natural] + [torch.randperm(features, generator=g) for _ in range(layers - 1)]
    raise PushforwardError(f"unknown permutation {permutation!r}; choose from: reverse, random")


def _check_hidden(hidden) -> tuple[int, ...]:
    try:
        widths = tuple(int(h) for h in hidden)
    except (TypeError, ValueError):
        raise PushforwardError(
            f"option hidden must be a sequence of positive integers, got {hidden!r}"
        ) from None
    if not widths or any(w < 1 or w != h for w, h in zip(widths, hidden, strict=True)):
        raise PushforwardError(f"option hidden must be positive integers, got {hidden!r}")
    return widths


def _autoregressive(
    features: int,
    context_features: int,
    transformer: Callable[[], Transformer],
    layers: int,
    hidden,
    permutation: str,
    batch_norm: bool,
    inverse: bool = False,
    residual: bool = False,
) -> Transform:
    """``layers`` masked autoregressive layers (their ``Inverse`` for IAF), orders reversed or
    permuted between layers, optional batch norm between them (MAF paper, section 3.4)."""
    from .transforms.autoregressive import MaskedAutoregressive
    from .transforms.linear import BatchNorm

    k = _check_positive("layers", layers)
    widths = _check_hidden(hidden)
    parts: list[Transform] = []
    for i, order in enumerate(_orders(features, k, permutation)):
        if batch_norm and i > 0:
            parts.append(BatchNorm(features))
        layer: Transform = MaskedAutoregressive(
            features, transformer(), context_features, widths, order=order, residual=residual
        )
        parts.append(Inverse(layer) if inverse else layer)
    return parts[0] if len(parts) == 1 else Compose(*parts)


@register(
    "maf",
    "masked autoregressive flow (Papamakarios et al. 2017): affine MADE layers, orders reversed",
)
def maf(
    features: int,
    context_features: int = 0,
    *,
    layers: int = 5,
    hidden: tuple[int, ...] = (512, 512),
    permutation: str = "reverse",
    batch_norm: bool = False,
    base: str = "normal",
):
    from .transforms.transformers import AffineTransformer

    t = _autoregressive(
        features,
        context_features,
        AffineTransformer,
        layers,
        hidden,
        permutation,
        batch_norm,
    )
    return _flow(base, features, context_features, t)


@register(
    "iaf",
    "inverse autoregressive flow (Kingma et al. 2016): fast sampling, sequential density",
)
def iaf(
    features: int,
    context_features: int = 0,
    *,
    layers: int = 5,
    hidden: tuple[int, ...] = (512, 512),
    permutation: str = "reverse",
    base: str = "normal",
):
    from .transforms.transformers import AffineTransformer

    t = _autoregressive(
        features,
        context_features,
        AffineTransformer,
        layers,
        hidden,
        permutation,
        False,
        inverse=True,
    )
    return _flow(base, features, context_features, t)


@register(
    "nsf",
    "autoregressive neural spline flow (Durkan et al. 2019): rational-quadratic spline MADE layers",
)
def nsf(
    features: int,
    context_features: int = 0,
    *,
    layers: int = 5,
    hidden: tuple[int, ...] = (256, 256),
    bins: int = 8,
    permutation: str = "reverse",
    batch_norm: bool = False,
    base: str = "normal",
):
    from .transforms.splines import RQSplineTransformer

    b = _check_positive("bins", bins)
    t = _autoregressive(
        features,
        context_features,
        lambda: RQSplineTransformer(bins=b),
        layers,
        hidden,
        permutation,
        batch_norm,
    )
    return _flow(base, features, context_features, t)


@register(
    "naf",
    "neural autoregressive flow (Huang et al. 2018): deep sigmoidal flow MADE layers",
)
def naf(
    features: int,
    context_features: int = 0,
    *,
    layers: int = 5,
    hidden: tuple[int, ...] = (256, 256),
    units: int = 8,
    permutation: str = "reverse",
    base: str = "normal",
):
    from .transforms.naf import DeepSigmoidTransformer

    u = _check_positive("units", units)
    # invert=True: the density direction (inverse) is the closed-form sigmoidal map and
    # sampling needs the bracketed scalar solve, as in the paper's density estimation.
    t = _autoregressive(
        features,
        context_features,
        lambda: DeepSigmoidTransformer(u, invert=True),
        layers,
        hidden,
        permutation,
        False,
    )
    return _flow(base, features, context_features, t)


@register("made", "Gaussian MADE (Germain et al. 2015): one affine autoregressive layer")
def made(
    features: int,
    context_features: int = 0,
    *,
    hidden: tuple[int, ...] = (512, 512),
):
    from .transforms.transformers import AffineTransformer

    t = _autoregressive(features, context_features, AffineTransformer, 1, hidden, "reverse", False)
    return _flow("normal", features, context_features, t)


@register(
    "made-mog",
    "MADE with a mixture of Gaussians per conditional (the MADE MoG of Papamakarios et al.)",
)
def made_mog(
    features: int,
    context_features: int = 0,
    *,
    hidden: tuple[int, ...] = (512, 512),
    components: int = 10,
):
    k = _check_positive("components", components)
    base = MADEMoG(features, k, context_features, _check_hidden(hidden))
    return Flow(base, Identity(), context_features)


@register(
    "maf-mog",
    "MAF whose base is a MADE MoG (Papamakarios et al. 2017): affine MADE layers over MADE MoG",
)
def maf_mog(
    features: int,
    context_features: int = 0,
    *,
    layers: int = 5,
    hidden: tuple[int, ...] = (512, 512),
    components: int = 10,
    permutation: str = "reverse",
    batch_norm: bool = False,
):
    from .transforms.transformers import AffineTransformer

    k = _check_positive("components", components)
    widths = _check_hidden(hidden)
    t = _autoregressive(
        features,
        context_features,
        AffineTransformer,
        layers,
        widths,
        permutation,
        batch_norm,
    )
    # the MADE MoG sits on top of the MAF in the density direction: x -> MAF^-1 -> z ~ MoG;
    # its order continues the alternation of the layers below it
    order = _orders(features, layers + 1, permutation)[-1]
    base = MADEMoG(features, k, context_features, widths, order=order)
    return Flow(base, t, context_features)


@register(
    "cclinIAF",
    "convex-combination linear IAF (Tomczak & Welling 2017) over a diagonal Gaussian",
)
def cclin_iaf(
    features: int,
    context_features: int = 0,
    *,
    components: int = 5,
    hidden: tuple[int, ...] = (64, 64),
    base: str = "diag-normal",
):
    from .transforms.linear import ConvexCombinationLinear

    k = _check_positive("components", components)
    t = ConvexCombinationLinear(features, k, context_features, _check_hidden(hidden))
    return _flow(base, features, context_features, t)
