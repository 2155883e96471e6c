"""Contract cases for the autoregressive family (MAF layers; their ``Inverse`` is IAF, which the
checker covers for every case)."""

from __future__ import annotations

from pushforward.core import Transformer
from pushforward.transforms.autoregressive import MaskedAutoregressive
from pushforward.transforms.transformers import AdditiveTransformer, AffineTransformer
from tests.checks import Case

C = 3  # context features of the conditional variants
TRANSFORMERS = {"affine": AffineTransformer, "additive": AdditiveTransformer}


def _case(
    kind: str,
    d: int,
    context_features: int = 0,
    order: str = "natural",
    residual: bool = False,
) -> Case:
    def make() -> MaskedAutoregressive:
        transformer: Transformer = TRANSFORMERS[kind]()
        return MaskedAutoregressive(
            d, transformer, context_features, (16, 16), order, residual, seed=1
        )

    name = (
        f"maf_{kind}_{d}_{order}" + "_residual" * residual + "_conditional" * bool(context_features)
    )
    # at d = 1 no input reaches a hidden unit: the first layer's weights have nothing to learn
    idle = ("made.layers.0.weight",) if d == 1 else ()
    return Case(name, make, (d,), context_features, zero_grad_ok=idle)


CASES: list[Case] = [
    _case("affine", 1),
    _case("affine", 2),
    _case("affine", 5),
    _case("affine", 5, order="random"),
    _case("affine", 2, residual=True),
    _case("affine", 5, order="random", residual=True),
    _case("affine", 1, context_features=C),
    _case("affine", 2, context_features=C, order="random"),
    _case("affine", 5, context_features=C, order="random", residual=True),
    _case("additive", 1),
    _case("additive", 2),
    _case("additive", 5, order="random"),
    _case("additive", 5, context_features=C, residual=True),
]
