"""Contract cases for the Sylvester flows (orthogonal, Householder, triangular)."""

from __future__ import annotations

import torch

from pushforward.transforms.sylvester import (
    SylvesterHouseholder,
    SylvesterOrthogonal,
    SylvesterTriangular,
)
from tests.checks import Case

C = 3  # context features of the conditional variants
H = (16,)  # a small context network keeps the perturbed maps away from the boundary


def _boundary_triangular(features: int, raw: float) -> SylvesterTriangular:
    """A triangular map with ``r_ii = tanh(raw)``, ``r~_ii = -tanh(raw)``: every
    ``1 + r_ii r~_ii`` is about ``4 exp(-2 raw)``, so the Jacobian is nearly singular where an
    ``a_i`` is near 0."""
    torch.manual_seed(3)
    t = SylvesterTriangular(features, flip=True)
    with torch.no_grad():
        t.params.params["r_diag"].fill_(raw)
        t.params.params["r_tilde_diag"].fill_(-raw)
        t.params.params["b"].copy_(torch.linspace(-0.5, 0.5, features))
    return t


def _cases() -> list[Case]:
    cases = []
    # the exact inverses are held to 1e-10, far below the default 1e-8
    for d in (1, 2, 3, 5):
        # in one dimension Q = q / |q| = +-1 and a reflection is -1: their raw parameters are
        # dead by design
        cases += [
            Case(
                f"sylvester_orthogonal_{d}",
                lambda d=d: SylvesterOrthogonal(d),
                (d,),
                atol=1e-10,
                zero_grad_ok=("params.q",) if d == 1 else (),
            ),
            Case(
                f"sylvester_householder_{d}",
                lambda d=d: SylvesterHouseholder(d, reflections=2),
                (d,),
                atol=1e-10,
                zero_grad_ok=("params.vectors",) if d == 1 else (),
            ),
            Case(
                f"sylvester_triangular_{d}",
                lambda d=d: SylvesterTriangular(d, flip=d % 2 == 0),
                (d,),
                atol=1e-10,
            ),
        ]
    cases += [
        Case("sylvester_orthogonal_5_m3", lambda: SylvesterOrthogonal(5, m=3), (5,), atol=1e-10),
        Case("sylvester_orthogonal_3_m1", lambda: SylvesterOrthogonal(3, m=1), (3,), atol=1e-10),
        Case("sylvester_orthogonal_2_m1", lambda: SylvesterOrthogonal(2, m=1), (2,), atol=1e-10),
        Case(
            "sylvester_orthogonal_2_conditional",
            lambda: SylvesterOrthogonal(2, context_features=C, hidden=H),
            (2,),
            C,
            atol=1e-10,
            # amortized: the grid would orthogonalise one Q per point (1.4 million); the
            # unconditional and the 1-D conditional cases integrate
            integrate=False,
        ),
        Case(
            "sylvester_orthogonal_5_m3_conditional",
            lambda: SylvesterOrthogonal(5, m=3, context_features=C, hidden=H),
            (5,),
            C,
            atol=1e-10,
        ),
        Case(
            "sylvester_householder_3_conditional",
            lambda: SylvesterHouseholder(3, reflections=3, context_features=C, hidden=H),
            (3,),
            C,
            atol=1e-10,
        ),
        Case(
            "sylvester_triangular_1_conditional",
            lambda: SylvesterTriangular(1, context_features=C, hidden=H),
            (1,),
            C,
            atol=1e-10,
        ),
        Case(
            "sylvester_triangular_5_conditional",
            lambda: SylvesterTriangular(5, flip=True, context_features=C, hidden=H),
            (5,),
            C,
            atol=1e-10,
        ),
        # 1 + r_ii r~_ii ~ 4.5e-7: a nearly non-invertible map still inverts to 1e-10 (a grid
        # cannot resolve its density spikes, hence no integration check)
        Case(
            "sylvester_triangular_3_boundary",
            lambda: _boundary_triangular(3, 8.0),
            (3,),
            perturb=0.0,
            atol=1e-10,
            integrate=False,
        ),
    ]
    return cases


CASES: list[Case] = _cases()
