"""Ready-made flows and the registry: ``build(name, features, context_features=0, **options)``.

One vocabulary of options for every recipe (``layers``, ``hidden``, ``bins``, ``base``,
``permutation``, ``batch_norm``); an option a recipe cannot use is an error naming it.

Example:
    >>> flow = build("planar", 2, layers=4)
    >>> flow.log_prob(torch.zeros(3, 2)).shape
    torch.Size([3])
"""

from __future__ import annotations

import functools
import inspect
import math
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
    #: True for image flows, built over an event shape ``(channels, height, width)``
    image: bool = False

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


def register(
    name: str, summary: str, image: bool = False
) -> Callable[[Callable[..., Flow]], Callable[..., Flow]]:
    """Register ``fn(features, context_features=0, *, option=default, ...) -> Flow``;
    ``features`` is an ``int`` for vector flows and ``(C, H, W)`` for ``image=True`` ones."""

    def deco(fn: Callable[..., Flow]) -> Callable[..., Flow]:
        if name in _REGISTRY:
            raise RuntimeError(f"flow {name!r} registered twice")
        _REGISTRY[name] = Recipe(name, summary, fn, image)
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


def build(
    name: str, features: int | tuple[int, int, int], context_features: int = 0, **options
) -> Flow:
    """Build the registered flow ``name`` over ``features`` dimensions (vector flows) or over
    images of shape ``features = (channels, height, width)`` (image flows)."""
    recipe = describe(name)
    allowed = recipe.options
    for key in options:
        if key not in allowed:
            raise PushforwardError(
                f"flow {name!r} has no option {key!r}; its options are: "
                f"{', '.join(allowed) or 'none'}"
            )
    if recipe.image:
        ok = isinstance(features, (tuple, list)) and len(features) == 3
        if not ok or not all(
            isinstance(f, int) and not isinstance(f, bool) and f > 0 for f in features
        ):
            raise PushforwardError(
                f"flow {name!r} is an image flow: features must be (channels, height, width), "
                f"got {features!r}"
            )
        features = tuple(features)
    elif isinstance(features, (tuple, list)):
        raise PushforwardError(
            f"flow {name!r} is a vector flow: features must be a positive integer, got "
            f"{tuple(features)!r} (image flows: "
            f"{', '.join(n for n, r in _REGISTRY.items() if r.image) or 'none'})"
        )
    elif isinstance(features, bool) or not isinstance(features, int) or features < 1:
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


def _check_bool(name: str, value: bool) -> bool:
    if not isinstance(value, bool):
        raise PushforwardError(f"option {name} must be True or False, got {value!r}")
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
    """``hidden`` as a tuple of positive widths; a bare integer is one width (``hidden=64``, as
    the CLI parses ``--posterior-option hidden=64``)."""
    if isinstance(hidden, int) and not isinstance(hidden, bool):
        hidden = (hidden,)
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
    affine: bool = True,
):
    """``layers`` rational-quadratic spline MADE layers (``bins`` bins on ``[-5, 5]``, linear
    tails). With ``affine`` (default) one affine MADE layer follows at the data end: the
    splines act on ``[-5, 5]`` only and are the identity outside, so rows with features far
    out in the tails (5% of MiniBooNE's standardized rows have some ``|x| > 5``, up to 30)
    would reach the base unchanged; the affine layer rescales them first. On the MiniBooNE
    re-split (``fit``'s loop, 3 seeds) it took the test log-likelihood from -17.46 to -15.23
    (mean), past MAF's -15.53."""
    from .transforms.autoregressive import MaskedAutoregressive
    from .transforms.splines import RQSplineTransformer
    from .transforms.transformers import AffineTransformer

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
    if _check_bool("affine", affine):
        widths = _check_hidden(hidden)
        t = Compose(
            t, MaskedAutoregressive(features, AffineTransformer(), context_features, widths)
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


# ---------------------------------------------------------------------------------------------
# Coupling flows: NICE, RealNVP and the coupling neural spline flow are one structure
# (transforms.coupling.Coupling) with three transformers. With one feature a coupling layer has
# no identity part: every layer then transforms that feature, with parameters from the context
# (or learned constants), so the recipes still build and train at features == 1.


def _equal_widths(name: str, widths: tuple[int, ...]) -> tuple[int, ...]:
    """Residual conditioners add states of one width: every entry of ``hidden`` must be equal."""
    if len(set(widths)) != 1:
        raise PushforwardError(
            f"option hidden: {name}'s conditioner is a residual MLP (one block per entry), so "
            f"the widths must be equal, got {widths}"
        )
    return widths


def _alternating_mask(features: int, layer: int):
    """NICE's odd/even partition, flipped every other layer (never at one feature: the only
    feature is always the transformed one)."""
    from .transforms.coupling import split_mask

    return split_mask(features, "alternating", flip=features > 1 and layer % 2 == 1)


@register(
    "nice",
    "NICE (Dinh et al. 2014): additive couplings on alternating odd/even features + diagonal "
    "scaling",
)
def nice(
    features: int,
    context_features: int = 0,
    *,
    layers: int = 4,
    hidden: tuple[int, ...] = (256, 256, 256, 256),
    base: str = "normal",
):
    """NICE: ``layers`` additive coupling layers :math:`x_B = z_B + t(z_A)` whose identity and
    transformed features swap every layer (odd/even), and the diagonal scaling layer
    :math:`e^{s} \\odot z` (with a shift; its log-determinant :math:`\\sum_i s_i` is the model's
    only volume change), which sits on the latent side as in the paper. Defaults: the paper's 4
    coupling layers; its coupling networks were 5 ReLU layers of 1000 units for 784-D images,
    here 4 of 256 for tabular sizes."""
    from .transforms.coupling import Coupling
    from .transforms.linear import ElementwiseAffine
    from .transforms.transformers import AdditiveTransformer

    k = _check_positive("layers", layers)
    h = _check_hidden(hidden)
    parts: list[Transform] = [ElementwiseAffine(features, context_features, h)]
    for i in range(k):
        mask = _alternating_mask(features, i)
        parts.append(Coupling(mask, AdditiveTransformer(), None, context_features, h))
    return _flow(base, features, context_features, Compose(*parts))


@register(
    "realnvp",
    "RealNVP (Dinh et al. 2017): affine couplings on alternating odd/even features",
)
def realnvp(
    features: int,
    context_features: int = 0,
    *,
    layers: int = 10,
    hidden: tuple[int, ...] = (256, 256),
    base: str = "normal",
    batch_norm: bool = False,
):
    """RealNVP for vectors: ``layers`` affine coupling layers
    :math:`x_B = z_B \\odot e^{s(z_A)} + t(z_A)` with alternating (odd/even) masks flipped every
    layer, optionally with batch normalisation between them. Defaults: the ten coupling layers
    of the tabular baseline "Real NVP (10)" of Papamakarios et al. (2017), with conditioners of
    two hidden layers of 256 units; the soft-bounded log-scales and identity initialisation of
    :class:`~pushforward.transforms.coupling.Coupling` (and the standardisation done by ``fit``)
    make batch normalisation unnecessary by default; ``batch_norm=True`` puts it between the
    coupling layers as in that baseline."""
    from .transforms.coupling import Coupling
    from .transforms.linear import BatchNorm
    from .transforms.transformers import AffineTransformer

    k = _check_positive("layers", layers)
    h = _check_hidden(hidden)
    _check_bool("batch_norm", batch_norm)
    parts: list[Transform] = []
    for i in range(k):
        if batch_norm and i:
            parts.append(BatchNorm(features))
        mask = _alternating_mask(features, i)
        parts.append(Coupling(mask, AffineTransformer(), None, context_features, h))
    return _flow(base, features, context_features, Compose(*parts))


@register(
    "nsf-coupling",
    "coupling neural spline flow (Durkan et al. 2019): RQ-spline couplings between LU linear "
    "layers",
)
def nsf_coupling(
    features: int,
    context_features: int = 0,
    *,
    layers: int = 10,
    hidden: tuple[int, ...] = (256, 256),
    bins: int = 8,
    base: str = "normal",
    permutation: str = "lu",
):
    """Coupling NSF: ``layers`` rational-quadratic spline couplings (``bins`` bins on
    :math:`[-5, 5]`, identity tails) of the last :math:`\\lceil d/2 \\rceil` features, with
    residual-MLP conditioners (one block per ``hidden`` entry, equal widths) and a mixing layer
    between them: ``permutation="lu"`` (default) a learnable LU-decomposed linear map starting at
    a random rotation, before every coupling and after the last, as in Durkan et al. (2019);
    ``"random"`` or ``"reverse"`` a fixed permutation between couplings. Defaults: the paper's
    tabular setup of 10 steps, 8 bins and two residual blocks of 256 units."""
    from .transforms.coupling import Coupling, split_mask
    from .transforms.linear import LULinear, Permutation
    from .transforms.splines import RQSplineTransformer

    k, b = _check_positive("layers", layers), _check_positive("bins", bins)
    h = _equal_widths("nsf-coupling", _check_hidden(hidden))
    if permutation not in ("lu", "random", "reverse"):
        raise PushforwardError(
            f"unknown permutation {permutation!r}; choose from: lu, random, reverse"
        )

    def mix(i: int) -> Transform:
        if permutation == "lu":
            return LULinear(features, seed=i)
        if permutation == "random":
            return Permutation.random(features, seed=i)
        return Permutation.reverse(features)

    mask = split_mask(features, "half")
    parts: list[Transform] = []
    for i in range(k):
        if i or permutation == "lu":
            parts.append(mix(i))
        spline = RQSplineTransformer(bins=b)
        parts.append(Coupling(mask, spline, None, context_features, h, residual=True))
    if permutation == "lu":
        parts.append(mix(k))
    return _flow(base, features, context_features, Compose(*parts))


# ---------------------------------------------------------------------------------------------
# Sylvester flows (van den Berg et al. 2018): one map x = z + Q R h(R~ Q^T z + b), three ways
# of producing Q. Their natural use is the amortized VAE posterior (a diagonal Gaussian base
# driven by the encoder's context); standalone they are density models like any other.


def _sylvester(features, context_features, layers, base, make) -> Flow:
    k = _check_positive("layers", layers)
    t = Compose(*[make(i) for i in range(k)])
    return _flow(base, features, context_features, t)


@register(
    "sylvester-orthogonal",
    "Sylvester flow (van den Berg et al. 2018), Q with M orthonormal columns (iterative)",
)
def sylvester_orthogonal(
    features: int,
    context_features: int = 0,
    *,
    layers: int = 8,
    columns: int | None = None,
    hidden: tuple[int, ...] = (64, 64),
    base: str = "diag-normal",
):
    """``columns``: M, the number of orthonormal columns of Q (default: ``features``)."""
    from .transforms.sylvester import SylvesterOrthogonal

    m = None if columns is None else _check_positive("columns", columns)
    widths = _check_hidden(hidden)
    return _sylvester(
        features,
        context_features,
        layers,
        base,
        lambda i: SylvesterOrthogonal(features, m, context_features, widths),
    )


@register(
    "sylvester-householder",
    "Sylvester flow (van den Berg et al. 2018), Q a product of Householder reflections",
)
def sylvester_householder(
    features: int,
    context_features: int = 0,
    *,
    layers: int = 8,
    reflections: int = 4,
    hidden: tuple[int, ...] = (64, 64),
    base: str = "diag-normal",
):
    from .transforms.sylvester import SylvesterHouseholder

    r = _check_positive("reflections", reflections)
    widths = _check_hidden(hidden)
    return _sylvester(
        features,
        context_features,
        layers,
        base,
        lambda i: SylvesterHouseholder(features, r, context_features, widths),
    )


@register(
    "sylvester-triangular",
    "Sylvester flow (van den Berg et al. 2018), Q the identity or the reversal, alternating",
)
def sylvester_triangular(
    features: int,
    context_features: int = 0,
    *,
    layers: int = 8,
    hidden: tuple[int, ...] = (64, 64),
    base: str = "diag-normal",
):
    from .transforms.sylvester import SylvesterTriangular

    widths = _check_hidden(hidden)
    return _sylvester(
        features,
        context_features,
        layers,
        base,
        lambda i: SylvesterTriangular(features, i % 2 == 1, context_features, widths),
    )


# ---------------------------------------------------------------------------------------------
# Image flows: multi-scale recursions of Squeeze, steps and FactorOut (transforms/image.py).
# Layers are listed in the data-to-base direction, as the papers describe them, and composed in
# reverse (Compose lists the generative direction).


def _data_direction(*layers: Transform) -> Transform:
    return Compose(*reversed(layers))


#: the image couplings' default clamp of the log-scale, :math:`-\log 2 < \log s < 5`: on the
#: way to the latent one coupling expands an image by at most 2 (see ``glow``)
IMAGE_SCALE_BOUND = (math.log(2), 5.0)


def _conv_hidden(hidden, kernel) -> tuple[int, int, int]:
    """``hidden`` of an image flow (one entry per residual block, all the same width) and the
    blocks' ``kernel`` (checked by :class:`~pushforward.nn.convnet.ConvResNet`), as
    ``(width, blocks, kernel)``."""
    widths = _check_hidden(hidden)
    if len(set(widths)) != 1:
        raise PushforwardError(
            f"option hidden of an image flow lists one width per residual block, all equal; "
            f"got {hidden!r}"
        )
    return widths[0], len(widths), kernel


def _conv_coupling(mask: torch.Tensor, context_features: int, hidden, transformer=None):
    from .nn.convnet import ConvResNet
    from .transforms.coupling import Coupling
    from .transforms.transformers import AffineTransformer

    tr = transformer or AffineTransformer()
    width, blocks, kernel = hidden
    per_channel = mask.flatten(1)
    transformed = per_channel.any(1)
    channel = bool((per_channel.all(1) == transformed).all()) and 0 < transformed.sum() < len(mask)
    net = ConvResNet(
        mask.shape[0],
        tr.params_per_feature,
        # a channel mask: read the identity channels, predict the transformed ones only
        out_channels=int(transformed.sum()) if channel else None,
        hidden=width,
        blocks=blocks,
        context_features=context_features,
        init=tr.identity_params(),
        channels=(~transformed).nonzero().squeeze(-1).tolist() if channel else None,
        kernel=kernel,
    )
    return Coupling(mask, tr, conditioner=net, context_features=context_features)


def _halve(c: int, h: int, w: int, name: str) -> tuple[int, int, int]:
    if h % 2 or w % 2:
        raise PushforwardError(
            f"{name}: cannot squeeze {h}x{w} images (height and width must be even at every "
            f"level); use fewer levels"
        )
    return 4 * c, h // 2, w // 2


def _preprocess(features: tuple[int, int, int], logit: float) -> list[Transform]:
    """Pixels in [0, 1] -> the real line by RealNVP's logit (data direction), if asked."""
    from .transforms.elementwise import Logit

    if logit is None or logit is False:
        return []
    return [Inverse(Logit(float(logit), event_dim=3))]


def _glow_level(
    shape, context_features, levels, steps, hidden, affine, seed=0, split_prior=False
) -> Transform:
    from .transforms.coupling import channel_mask
    from .transforms.image import FactorOut, InvertibleConv1x1, Squeeze
    from .transforms.linear import ActNorm

    c, h, w = _halve(*shape, "glow")
    layers: list[Transform] = [Squeeze()]
    for k in range(steps):
        layers += [
            ActNorm(c, event_dim=3),
            InvertibleConv1x1(c, context_features, seed=seed + k),
            _conv_coupling(
                channel_mask(c, h, w, flip=k % 2 == 1), context_features, hidden, affine()
            ),
        ]
    if levels > 1:
        if split_prior:
            # Glow's learned prior of the factored-out half: N(mu, sigma) of the half that
            # stays, i.e. an affine coupling of the first c // 2 channels (the ones FactorOut
            # sends to the base) by a zero-initialised network of the others
            width, _, kernel = hidden
            layers.append(
                _conv_coupling(
                    channel_mask(c, h, w, flip=True), context_features, (width, 0, kernel), affine()
                )
            )
        inner = _glow_level(
            (c - c // 2, h, w), context_features, levels - 1, steps, hidden, affine,
            seed + steps, split_prior,
        )  # fmt: skip
        layers.append(FactorOut(inner, channels=c))
    layers.append(Inverse(Squeeze()))
    return _data_direction(*layers)


@register(
    "glow",
    "Glow (Kingma & Dhariwal 2018): L levels of K steps actnorm -> 1x1 conv -> affine coupling",
    image=True,
)
def glow(
    features: tuple[int, int, int],
    context_features: int = 0,
    *,
    levels: int = 2,
    layers: int = 4,
    hidden: tuple[int, ...] = (64,),
    logit: float | None = 1e-6,
    base: str = "normal",
    scale: str = "tanh",
    scale_bound: float | tuple[float, float] = IMAGE_SCALE_BOUND,
    kernel: int = 3,
    split_prior: bool = False,
):
    r"""Images in [0, 1] (dequantized pixels / levels). Each level squeezes, runs ``layers``
    steps, factors out half of the channels (all levels but the last) and unsqueezes, so the
    latent has the image's shape. The defaults (2 levels of 4 steps, conditioners of one
    residual block of 64 channels: 633k parameters at 1x28x28) train on a CPU: one step on 64
    MNIST images takes ~0.35 s on one core, against ~1.5 s for 8 steps of two blocks.

    ``scale`` and ``scale_bound`` parameterise the couplings' scale (:class:`~pushforward.
    transforms.transformers.AffineTransformer`). The default, ``"tanh"`` with ``scale_bound =
    (log 2, 5)``, clamps the log-scale to :math:`(-\log 2, 5)`: on its way to the latent an
    image is expanded by at most 2 per coupling. With the symmetric clamp ``5`` (format-1
    models) a coupling can expand by 148, and on MNIST an image unlike the training data was
    amplified coupling after coupling (its conditioners' outputs growing from 5 to 2e6) to a
    log-density of -5.6e15; such images turned up as loss spikes of 1e7 to 7e16 nats from
    ~1,500 s of training on. ``"sigmoid"`` is Glow's gate (expansion at most 1.135), stable but
    slower to learn. Digits, 2 steps of 16 channels, logit margin 0.05, test bits/dim after
    5 / 20 epochs: ``(log 2, 5)`` 2.628 / 2.324, symmetric 5: 2.596 / 2.319, sigmoid 2.806 /
    2.436.

    ``logit`` is the margin :math:`\alpha` of the logit preprocessing
    (:class:`~pushforward.transforms.elementwise.Logit`, its Jacobian part of the density;
    ``None``: none, pixels in [0, 1] go to the steps as they are). The default ``1e-6`` is the
    MAF paper's for MNIST; Real NVP's 0.05 (the default of format-2 models) squeezes the
    dequantized background pixels, most of an MNIST image, into a band of width 0.07, a
    needle that the flow learns slowly. On MNIST (600 s of training, one thread, lr 3e-3 with
    a cosine decay, batch 64, test bits/dim on 2,000 test images): 1.2088 with ``1e-6``,
    1.5147 with ``0.05``; without a logit the validation bits/dim after 300 s were 2.04,
    against 1.68 with 0.05 and 1.30 with 1e-6 (``benchmarks/images.py --options '{"logit":
    0.05}'``). Digits (17 levels, the CLI test's small Glow, 5 epochs): 2.40 against 2.63.

    ``kernel`` is the kernel size of the conditioners' residual blocks (3); ``kernel=1`` gives
    the shape of Glow's own network (3x3, per-pixel layers, 3x3), with nine times fewer
    multiply-adds per block at a given width (:class:`~pushforward.nn.convnet.ConvResNet`).
    On a CPU the activations' memory traffic then dominates: one step on 64 MNIST images,
    one thread, took 323 ms with ``hidden=(128,), kernel=1`` (349k parameters), 623 ms with
    width 192, against 273 ms for the defaults.

    ``split_prior=True`` gives the factored-out half of every level but the last Glow's learned
    prior :math:`\mathcal N(\mu(h), \sigma(h)^2)` given the half :math:`h` that stays (the
    ``split2d`` prior of Glow's code): an affine coupling of the factored channels by a
    zero-initialised network of the kept ones (a 3x3 convolution to ``hidden`` channels and a
    3x3 convolution out, no residual block), so the flow starts as the one without it. Off by
    default: on MNIST (600 s of training, one thread, lr 3e-3 with a cosine decay, batch 64)
    it reached 1.5430 test bits/dim on 2,000 test images against 1.5147 without it, its steps
    5% slower (``benchmarks/images.py --options '{"split_prior": true}'``)."""
    level = functools.partial(_glow_level, split_prior=_check_bool("split_prior", split_prior))
    return _image_flow(
        level, features, context_features, levels, layers, (hidden, kernel), logit, base, scale,
        scale_bound,
    )  # fmt: skip


def _realnvp_level(shape, context_features, levels, steps, hidden, affine) -> Transform:
    from .transforms.coupling import channel_mask, checkerboard_mask
    from .transforms.image import FactorOut, Squeeze
    from .transforms.linear import ActNorm

    c, h, w = shape
    layers: list[Transform] = []
    n_check = steps if levels > 1 else steps + 1  # the last scale: one more, as in the paper
    for k in range(n_check):
        layers += [
            ActNorm(c, event_dim=3),
            _conv_coupling(
                checkerboard_mask(c, h, w, flip=k % 2 == 1), context_features, hidden, affine()
            ),
        ]
    if levels > 1:
        c4, h2, w2 = _halve(c, h, w, "realnvp-image")
        layers.append(Squeeze())
        for k in range(steps):
            layers += [
                ActNorm(c4, event_dim=3),
                _conv_coupling(
                    channel_mask(c4, h2, w2, flip=k % 2 == 1), context_features, hidden, affine()
                ),
            ]
        shape = (c4 - c4 // 2, h2, w2)
        inner = _realnvp_level(shape, context_features, levels - 1, steps, hidden, affine)
        layers += [FactorOut(inner, channels=c4), Inverse(Squeeze())]
    return _data_direction(*layers)


@register(
    "realnvp-image",
    "multi-scale RealNVP (Dinh et al. 2017): checkerboard, squeeze, channel couplings, factor out",
    image=True,
)
def realnvp_image(
    features: tuple[int, int, int],
    context_features: int = 0,
    *,
    levels: int = 2,
    layers: int = 2,
    hidden: tuple[int, ...] = (64,),
    logit: float | None = 1e-6,
    base: str = "normal",
    scale: str = "tanh",
    scale_bound: float | tuple[float, float] = IMAGE_SCALE_BOUND,
    kernel: int = 3,
):
    """Images in [0, 1]. Each scale: ``layers`` checkerboard affine couplings, squeeze,
    ``layers`` channel-wise couplings, factor out half; the last scale ``layers + 1``
    checkerboard couplings. ActNorm before every coupling stands in for the paper's batch
    normalisation (same role, no batch statistics at sampling time). The defaults (2 couplings
    per stage, one residual block of 64 channels: 538k parameters at 1x28x28; the paper uses 3
    and 8 blocks) keep a step on 64 MNIST images under a second on one CPU core. ``scale`` and
    ``scale_bound``, ``kernel``, ``logit``: as for ``glow`` (MNIST, 300 s of training, one
    thread, lr 3e-3 with a cosine decay: test bits/dim on 2,000 test images 1.3931 with the
    default logit margin 1e-6, 2.3306 with 0.05)."""
    return _image_flow(
        _realnvp_level, features, context_features, levels, layers, (hidden, kernel), logit,
        base, scale, scale_bound,
    )  # fmt: skip


def _image_flow(
    level, features, context_features, levels, layers, network, logit, base, scale, scale_bound
) -> Flow:
    """The logit preprocessing, then the multi-scale recursion ``level``, over a normal base;
    ``network`` is ``(hidden, kernel)`` of the couplings' conditioners; every coupling's affine
    transformer is ``AffineTransformer(scale_bound, scale)``."""
    from .transforms.transformers import AffineTransformer

    lv, k = _check_positive("levels", levels), _check_positive("layers", layers)
    AffineTransformer(scale_bound, scale)  # a bad option fails here, once, naming the problem

    def affine() -> Transformer:
        return AffineTransformer(scale_bound, scale)

    t = level(features, context_features, lv, k, _conv_hidden(*network), affine)
    t = _data_direction(*_preprocess(features, logit), t)
    return Flow(_image_base(base, features), t, context_features)


def _image_base(kind: str, shape: tuple[int, int, int]) -> Base:
    if kind != "normal":
        raise PushforwardError(f"unknown base {kind!r} for an image flow; choose from: normal")
    return StandardNormal(shape)
