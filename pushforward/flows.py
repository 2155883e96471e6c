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

import torch  # noqa: F401  (used by the doctest above)

from .core import Compose, PushforwardError, Transform
from .distributions import Base, DiagNormal, Flow, GaussianMixture, StandardNormal

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
        parts += [LULinear(features, context_features), LeakyReLU(0.5, learnable=True)]
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
