"""Contract cases for the image transforms (squeeze, per-pixel maps, factor-out)."""

from __future__ import annotations

from pushforward.core import Compose
from pushforward.transforms.elementwise import LeakyReLU
from pushforward.transforms.image import FactorOut, InvertibleConv1x1, PerPixel, Squeeze
from pushforward.transforms.linear import ActNorm, ElementwiseAffine
from tests.checks import Case


def _multiscale(context: int = 0):
    """Two levels: 1x1 conv on (2, 4, 4), squeeze to (8, 2, 2), factor out 4, conv on 4."""
    deeper = FactorOut(InvertibleConv1x1(4, context, seed=1), channels=8)
    return Compose(deeper, Squeeze(), InvertibleConv1x1(2, context, seed=0))


CASES: list[Case] = [
    Case("squeeze", lambda: Squeeze(), (4, 2, 3), integrate=False),
    Case("squeeze_3", lambda: Squeeze(3), (18, 1, 2), integrate=False),
    Case("conv1x1", lambda: InvertibleConv1x1(3, seed=0), (3, 2, 3), integrate=False),
    Case(
        "conv1x1_conditional",
        lambda: InvertibleConv1x1(3, 2, seed=0),
        (3, 2, 2),
        context_features=2,
        integrate=False,
    ),
    Case(
        "per_pixel_leaky_relu",
        lambda: PerPixel(LeakyReLU(0.5, learnable=True, context_features=2)),
        (2, 2, 2),
        context_features=2,
        integrate=False,
    ),
    Case(
        "per_pixel_affine",
        lambda: PerPixel(ElementwiseAffine(2)),
        (2, 3, 2),
        integrate=False,
    ),
    Case(
        "factor_out",
        lambda: FactorOut(ActNorm(2, event_dim=3), channels=4),
        (4, 2, 2),
        integrate=False,
    ),
    Case("multiscale", _multiscale, (8, 2, 2), integrate=False),
    Case(
        "multiscale_conditional",
        lambda: _multiscale(3),
        (8, 2, 2),
        context_features=3,
        integrate=False,
    ),
]


def _image_coupling(kind: str, transformer: str, context: int = 0):
    from pushforward.nn.convnet import ConvResNet
    from pushforward.transforms.coupling import Coupling, channel_mask, checkerboard_mask
    from pushforward.transforms.splines import RQSplineTransformer
    from pushforward.transforms.transformers import AdditiveTransformer, AffineTransformer

    tr = {
        "affine": AffineTransformer,
        "additive": AdditiveTransformer,
        "spline": lambda: RQSplineTransformer(bins=3),
    }[transformer]()
    mask = checkerboard_mask(2, 2, 2) if kind == "checkerboard" else channel_mask(2, 2, 2)
    # "channel-read": the network reads the identity channel 0 and predicts channel 1 only
    read = kind == "channel-read"
    net = ConvResNet(
        2,
        tr.params_per_feature,
        out_channels=1 if read else None,
        hidden=4,
        blocks=1,
        context_features=context,
        init=tr.identity_params(),
        channels=[0] if read else None,
    )
    return Coupling(mask, tr, conditioner=net, context_features=context)


CASES += [
    Case(
        f"coupling_{kind}_{tr}{'_conditional' if c else ''}",
        lambda kind=kind, tr=tr, c=c: _image_coupling(kind, tr, c),
        (2, 2, 2),
        context_features=c,
        integrate=False,
    )
    for kind, tr, c in [
        ("checkerboard", "affine", 0),
        ("channel", "affine", 0),
        ("checkerboard", "additive", 0),
        ("channel", "spline", 2),
        ("checkerboard", "affine", 2),
        ("channel-read", "affine", 0),
        ("channel-read", "spline", 2),
    ]
]
