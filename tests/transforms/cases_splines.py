"""Contract cases for the spline and deep-sigmoid transformers, in the autoregressive structure
(autoregressive NSF and NAF): features 1, 2 and 4, and a conditional variant of each."""

from __future__ import annotations

from pushforward.transforms.autoregressive import MaskedAutoregressive
from pushforward.transforms.naf import DeepSigmoidTransformer
from pushforward.transforms.splines import RQSplineTransformer
from tests.checks import Case

C = 3  # context features of the conditional variants


def _cases() -> list[Case]:
    cases: list[Case] = []
    for d in (1, 2, 4):
        # with one feature and no context the MADE's input layer is fully masked (nothing comes
        # before the only feature), so its weight legitimately gets no gradient
        masked = ("made.layers.0.weight",) if d == 1 else ()
        cases.append(
            Case(
                f"spline_autoregressive_{d}",
                lambda d=d: MaskedAutoregressive(d, RQSplineTransformer(bins=4), hidden=(16, 16)),
                (d,),
                zero_grad_ok=masked,
            )
        )
        # NAF as in the paper (closed-form density, numerical sampling) for 2 features, whose
        # density integration check then runs in closed form; the mirror image for 1 and 4
        cases.append(
            Case(
                f"deep_sigmoid_autoregressive_{d}",
                lambda d=d: MaskedAutoregressive(
                    d, DeepSigmoidTransformer(hidden=4, invert=d == 2), hidden=(16, 16)
                ),
                (d,),
                zero_grad_ok=masked,
            )
        )
    cases.append(
        Case(
            "spline_autoregressive_2_conditional",
            lambda: MaskedAutoregressive(
                2, RQSplineTransformer(bins=4), context_features=C, hidden=(16, 16)
            ),
            (2,),
            C,
        )
    )
    cases.append(
        Case(
            "deep_sigmoid_autoregressive_2_conditional",
            lambda: MaskedAutoregressive(
                2,
                DeepSigmoidTransformer(hidden=4, invert=True),
                context_features=C,
                hidden=(16, 16),
            ),
            (2,),
            C,
        )
    )
    # the numerically inverted direction in 2-D, with its density check (the numerical inverse
    # on the 1.4M-point grid takes a few seconds, so only here)
    cases.append(
        Case(
            "deep_sigmoid_autoregressive_2_numerical_density",
            lambda: MaskedAutoregressive(2, DeepSigmoidTransformer(hidden=4), hidden=(16, 16)),
            (2,),
        )
    )
    return cases


CASES: list[Case] = _cases()
