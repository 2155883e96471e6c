"""Contract cases for the coupling family: one ``Coupling`` structure with the affine, additive
and rational-quadratic spline transformers, half and alternating masks (both flips), with and
without context, for 1, 2 and 3 features; plus custom conditioners (a convolutional one on
image-shaped events, and one returning parameters for the transformed entries only)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pushforward.core import Transformer
from pushforward.transforms.coupling import (
    Coupling,
    channel_mask,
    checkerboard_mask,
    split_mask,
)
from pushforward.transforms.splines import RQSplineTransformer
from pushforward.transforms.transformers import AdditiveTransformer, AffineTransformer
from tests.checks import Case

C = 3  # context features of the conditional variants
TRANSFORMERS = {
    "affine": AffineTransformer,
    "additive": AdditiveTransformer,
    "gated": lambda: AffineTransformer(scale="sigmoid"),
    "affine_asymmetric": lambda: AffineTransformer(scale_bound=(0.5, 3.0)),
    "spline": lambda: RQSplineTransformer(bins=4),
}


def _case(
    kind: str,
    d: int,
    mask: str = "half",
    flip: bool = False,
    context_features: int = 0,
    residual: bool = False,
) -> Case:
    def make() -> Coupling:
        transformer: Transformer = TRANSFORMERS[kind]()
        return Coupling(
            split_mask(d, mask, flip),
            transformer,
            context_features=context_features,
            hidden=(16, 16),
            residual=residual,
        )

    name = (
        f"coupling_{kind}_{d}_{mask}"
        + "_flip" * flip
        + "_residual" * residual
        + "_conditional" * bool(context_features)
    )
    # the conditional 2-D spline gets a gentler start: with the context as extra input, the
    # default perturbation makes the density too sharp for the checker's 1200 x 1200
    # integration grid (an error of the quadrature, not of the map: its ladj is checked
    # against autograd either way)
    perturb = 0.15 if kind == "spline" and context_features and d == 2 else 0.3
    return Case(name, make, (d,), context_features, perturb=perturb)


class ConvConditioner(nn.Module):
    """A tiny image conditioner: one 3x3 convolution of the masked image (and the context, as
    constant channels) to ``P`` parameters per entry, ``(*batch, C, H, W, P)``."""

    def __init__(self, channels: int, params: int, context_features: int = 0):
        super().__init__()
        self.channels, self.params = channels, params
        self.conv = nn.Conv2d(channels + context_features, channels * params, 3, padding=1)

    def forward(self, identity: Tensor, context: Tensor | None) -> Tensor:
        batch, (c, h, w) = identity.shape[:-3], identity.shape[-3:]
        v = identity.reshape(-1, c, h, w)
        if context is not None:
            v = torch.cat([v, context.reshape(v.shape[0], -1, 1, 1).expand(-1, -1, h, w)], 1)
        out = self.conv(v).unflatten(1, (c, self.params)).movedim(2, -1)
        return out.reshape(*batch, c, h, w, self.params)


class CompactConditioner(nn.Module):
    """A vector conditioner of the masked input returning parameters for the transformed
    features only, ``(*batch, n_B, P)``."""

    def __init__(self, features: int, transformed: int, params: int):
        super().__init__()
        self.shape = (transformed, params)
        self.net = nn.Sequential(
            nn.Linear(features, 16), nn.Tanh(), nn.Linear(16, transformed * params)
        )

    def forward(self, identity: Tensor, context: Tensor | None) -> Tensor:
        return self.net(identity).unflatten(-1, self.shape)


def _image_case(kind: str, mask: Tensor, context_features: int = 0) -> Case:
    def make() -> Coupling:
        transformer: Transformer = TRANSFORMERS[kind]()
        net = ConvConditioner(mask.shape[0], transformer.params_per_feature, context_features)
        return Coupling(mask, transformer, net, context_features)

    c, h, w = mask.shape
    name = f"coupling_{kind}_image_{c}x{h}x{w}" + "_conditional" * bool(context_features)
    return Case(name, make, tuple(mask.shape), context_features)


def _compact_case() -> Case:
    def make() -> Coupling:
        mask = split_mask(3, "alternating")
        transformer = AffineTransformer()
        net = CompactConditioner(3, int(mask.sum()), transformer.params_per_feature)
        return Coupling(mask, transformer, net)

    return Case("coupling_affine_3_custom_compact_conditioner", make, (3,))


CASES: list[Case] = [
    _case("affine", 1),
    _case("affine", 2),
    _case("affine", 2, "half", flip=True),
    _case("affine", 3, "alternating"),
    _case("affine", 3, "half", flip=True),
    _case("affine", 1, context_features=C),
    _case("affine", 3, "alternating", flip=True, context_features=C),
    _case("affine", 2, context_features=C, residual=True),
    _case("gated", 2),
    _case("affine_asymmetric", 3, "half", context_features=C),
    _case("gated", 3, "alternating", context_features=C),
    _case("additive", 1),
    _case("additive", 2, "alternating", flip=True),
    _case("additive", 3, "half"),
    _case("additive", 3, "alternating", context_features=C),
    _case("spline", 1),
    _case("spline", 2),
    _case("spline", 3, "alternating"),
    _case("spline", 3, "half", flip=True, residual=True),
    _case("spline", 1, context_features=C),
    _case("spline", 2, "alternating", flip=True, context_features=C),
    _case("spline", 3, "half", context_features=C, residual=True),
    _image_case("affine", checkerboard_mask(2, 2, 2)),
    _image_case("gated", channel_mask(2, 2, 2)),
    _image_case("spline", channel_mask(2, 2, 2, flip=True), context_features=C),
    _compact_case(),
]
