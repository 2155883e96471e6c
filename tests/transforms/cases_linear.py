"""Contract cases for the linear family and Householder reflections."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from pushforward.core import Transform
from pushforward.transforms.householder import Householder
from pushforward.transforms.linear import (
    ActNorm,
    BatchNorm,
    ConvexCombinationLinear,
    ElementwiseAffine,
    FullAffine,
    LULinear,
    Permutation,
    Standardization,
    TriangularLinear,
)
from tests.checks import Case

C = 3  # context features of the conditional variants


class Family(NamedTuple):
    name: str
    make: Callable[[int, int], Transform]  # (features, context_features) -> transform
    sizes: tuple[int, ...]  # unconditional cases; sizes 1 and 2 also integrate the density
    conditional_sizes: tuple[int, ...]
    #: parameters with nothing to learn at size 1 (all-zero gradient allowed there)
    idle_at_1: tuple[str, ...] = ()


_FAMILIES = [
    Family("elementwise_affine", lambda d, c: ElementwiseAffine(d, c), (1, 2, 5), (1, 5)),
    Family("full_affine", lambda d, c: FullAffine(d, c), (1, 2, 5), (1, 5)),
    Family(
        "triangular_lower",
        lambda d, c: TriangularLinear(d, context_features=c),
        (1, 2, 5),
        (1, 5),
        ("off_diagonal",),
    ),
    Family(
        "triangular_upper",
        lambda d, c: TriangularLinear(d, lower=False, context_features=c),
        (2, 5),
        (5,),
    ),
    Family(
        "lu_linear",
        lambda d, c: LULinear(d, context_features=c, seed=0),
        (1, 2, 5),
        (1, 5),
        ("lower", "upper"),
    ),
    # a 1-D reflection or unit-triangular map is the same for every context: conditional from 3
    Family("householder", lambda d, c: Householder(d, 3, c), (1, 2, 5), (3,), ("vectors",)),
    Family("cc_linear", lambda d, c: ConvexCombinationLinear(d, 3, c), (2, 5), (3,)),
]


def _parametric_cases() -> list[Case]:
    cases = []
    for f in _FAMILIES:
        for d in f.sizes:
            make = lambda f=f, d=d: f.make(d, 0)  # noqa: E731
            cases.append(Case(f"{f.name}_{d}", make, (d,), zero_grad_ok=f.idle_at_1 * (d == 1)))
        for d in f.conditional_sizes:
            # the checker's 0.3 perturbation of every network weight can give LU products
            # condition numbers near 1e9, which turns 1e-16 differences between batched and
            # single network evaluations into 1e-8 (over its 1e-10 bound); 0.1 keeps them sane
            make = lambda f=f, d=d: f.make(d, C)  # noqa: E731
            cases.append(Case(f"{f.name}_{d}_conditional", make, (d,), C, perturb=0.1))
    return cases


def _standardization(loc: list[float], scale: list[float]) -> Standardization:
    return Standardization(torch.tensor(loc), torch.tensor(scale))


CASES: list[Case] = [
    *_parametric_cases(),
    Case("actnorm_1", lambda: ActNorm(1), (1,)),
    Case("actnorm_2", lambda: ActNorm(2), (2,)),
    Case("actnorm_5", lambda: ActNorm(5), (5,)),
    Case("actnorm_image", lambda: ActNorm(3, event_dim=3), (3, 4, 4)),
    Case("batchnorm_1", lambda: BatchNorm(1), (1,)),
    Case("batchnorm_2", lambda: BatchNorm(2), (2,)),
    Case("batchnorm_5", lambda: BatchNorm(5), (5,)),
    Case("standardization_1", lambda: _standardization([2.0], [3.0]), (1,)),
    Case("standardization_2", lambda: _standardization([2.0, -1.0], [0.5, 3.0]), (2,)),
    Case(
        "standardization_5",
        lambda: Standardization(torch.arange(5.0), torch.linspace(0.5, 2, 5)),
        (5,),
    ),
    Case(
        "standardization_image",
        lambda: Standardization(
            torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1),
            torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1),
            event_dim=3,
        ),
        (3, 4, 4),
    ),
    Case("permutation_reverse_2", lambda: Permutation.reverse(2), (2,)),
    Case("permutation_random_5", lambda: Permutation.random(5, seed=3), (5,)),
    Case("permutation_channels", lambda: Permutation.random(3, seed=1, event_dim=3), (3, 4, 4)),
]
