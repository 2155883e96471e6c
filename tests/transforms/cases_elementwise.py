"""Contract cases for the elementwise family.

Maps with a bounded domain or range get base-space samples inside the domain, a base density
supported there, and an integration box equal to (or containing) the support in data space, so
that the checker's "density integrates to 1" test is meaningful.
"""

from __future__ import annotations

import math

import torch

from pushforward.distributions import Uniform
from pushforward.transforms.elementwise import (
    LeakyReLU,
    Logit,
    PiecewiseLinear,
    Sigmoid,
    Tanh,
)
from tests.checks import Case

C = 3  # context features of the conditional variants
SIZES = (1, 2, 4)


def _unit(margin: float = 0.0):
    """Sampler of base-space inputs uniform on [margin, 1 - margin]."""

    def sample(batch: tuple[int, ...], d: int) -> torch.Tensor:
        return margin + (1 - 2 * margin) * torch.rand(*batch, d, dtype=torch.float64)

    return sample


def _on_unit(d: int, margin: float = 0.0) -> dict:
    """Case options for a map whose base space is the unit cube."""
    draw = _unit(margin)
    return {"sample": lambda b, d=d: draw(b, d), "base": lambda d=d: Uniform(d)}


def _cases() -> list[Case]:
    cases: list[Case] = []
    for d in SIZES:
        # piecewise-linear on the unit cube, uniform base. The density is piecewise constant, and
        # the midpoint rule errs by about (cell width) x (jump) at every knot: smaller
        # perturbations than the default keep the jumps, and the 2-D grid error, well below
        # 1e-3 (a perturbed context network otherwise spreads the logits so far that some output
        # bins are narrower than a grid cell of the 2-D check).
        for c in (0, C):
            suffix = "_conditional" if c else ""
            cases.append(
                Case(
                    f"piecewise_linear_{d}{suffix}",
                    lambda d=d, c=c: PiecewiseLinear(d, bins=5, context_features=c),
                    (d,),
                    c,
                    box=(0.0, 1.0),
                    perturb=0.05 if c else 0.2,
                    **_on_unit(d),
                )
            )
        # leaky ReLU: a symmetric box puts the kink at 0 on a cell boundary of the grid
        cases.append(Case(f"leaky_relu_{d}", lambda: LeakyReLU(0.2), (d,), box=(-8.0, 8.0)))
        cases.append(
            Case(
                f"leaky_relu_learnable_{d}",
                lambda: LeakyReLU(0.3, learnable=True),
                (d,),
                box=(-8.0, 8.0),
            )
        )
        # (a small perturbation keeps every context's slope near 0.5, inside the box)
        cases.append(
            Case(
                f"leaky_relu_{d}_conditional",
                lambda: LeakyReLU(0.5, learnable=True, context_features=C),
                (d,),
                C,
                box=(-16.0, 16.0),
                perturb=0.05,
            )
        )
        # sigmoid-type maps: a normal base, integrated over their bounded range
        cases.append(Case(f"sigmoid_{d}", lambda: Sigmoid(), (d,), box=(0.0, 1.0)))
        cases.append(Case(f"tanh_{d}", lambda: Tanh(), (d,), box=(-1.0, 1.0)))
        # logit: uniform base on [0, 1]; with alpha > 0 the support is [logit(a), logit(1 - a)]
        cases.append(
            Case(f"logit_{d}", lambda: Logit(), (d,), box=(-30.0, 30.0), **_on_unit(d, margin=0.02))
        )
        edge = math.log(0.95 / 0.05)
        cases.append(
            Case(
                f"logit_alpha_{d}",
                lambda: Logit(alpha=0.05),
                (d,),
                box=(-edge, edge),
                **_on_unit(d),
            )
        )
    # the default slope 0.01: the narrow negative side is resolved by the 1-D grid only
    cases.append(Case("leaky_relu_default_1", lambda: LeakyReLU(), (1,), box=(-1.0, 9.0)))
    # image-shaped events
    image = (2, 3, 3)
    cases += [
        Case("sigmoid_image", lambda: Sigmoid(event_dim=3), image),
        Case("tanh_image", lambda: Tanh(event_dim=3), image),
        Case("leaky_relu_image", lambda: LeakyReLU(0.1, learnable=True, event_dim=3), image),
        Case(
            "logit_image",
            lambda: Logit(0.05, event_dim=3),
            image,
            sample=lambda b: torch.rand(*b, *image, dtype=torch.float64),
        ),
    ]
    return cases


CASES: list[Case] = _cases()
