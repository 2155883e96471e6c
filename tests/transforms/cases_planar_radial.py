"""Contract cases for planar and radial flows."""

from __future__ import annotations

import torch

from pushforward.transforms.planar_radial import Planar, Radial
from tests.checks import Case

C = 3  # context features of the conditional variants
# a small context network: the checker's perturbation of a (64, 64) one drives w^T u_hat so close
# to -1 that the density's spike at a = 0 is narrower than the integration grid
H = (16,)


def _boundary_planar(features: int, wu: float) -> Planar:
    """A planar map with ``w^T u = wu`` (very negative: ``w^T u_hat`` within ``e^wu`` of -1)
    and a large ``w``, so that its Jacobian is nearly singular around ``a = 0``."""
    t = Planar(features)
    with torch.no_grad():
        w = torch.linspace(1.0, 2.0, features)
        t.params.params["w"].copy_(w)
        t.params.params["u"].copy_(wu * w / (w * w).sum())
        t.params.params["b"].fill_(0.3)
    return t


def _cases() -> list[Case]:
    cases = []
    for d in (1, 2, 5):
        # the exact inverses are held to 1e-10, far below the default 1e-8
        cases += [
            Case(f"planar_{d}", lambda d=d: Planar(d), (d,), atol=1e-10),
            Case(
                f"planar_{d}_conditional",
                lambda d=d: Planar(d, C, hidden=H),
                (d,),
                C,
                atol=1e-10,
            ),
            Case(f"radial_{d}", lambda d=d: Radial(d), (d,), atol=1e-10),
            Case(
                f"radial_{d}_conditional",
                lambda d=d: Radial(d, C, hidden=H),
                (d,),
                C,
                atol=1e-10,
            ),
        ]
    cases += [
        Case("planar_2_leaky_relu", lambda: Planar(2, activation="leaky_relu"), (2,), atol=1e-10),
        Case(
            "planar_5_leaky_relu_conditional",
            lambda: Planar(5, C, activation="leaky_relu", hidden=H),
            (5,),
            C,
            atol=1e-10,
        ),
        # w^T u_hat = -1 + 2e-9: a nearly non-invertible map still inverts to 1e-8 (a grid cannot
        # integrate its density spike at a = 0, hence no integration check)
        Case(
            "planar_3_boundary",
            lambda: _boundary_planar(3, -20.0),
            (3,),
            perturb=0.0,
            atol=1e-8,
            integrate=False,
        ),
    ]
    return cases


CASES: list[Case] = _cases()
