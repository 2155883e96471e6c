"""The transforms, one module per family; their public names are re-exported here.

Structures (:class:`MaskedAutoregressive`, :class:`Coupling`) take elementwise transformers
(:class:`AffineTransformer`, :class:`AdditiveTransformer`, :class:`RQSplineTransformer`,
:class:`DeepSigmoidTransformer`, :class:`PiecewiseLinearTransformer`); the rest are layers.
"""

from .autoregressive import MaskedAutoregressive, iaf_layer
from .coupling import Coupling, channel_mask, checkerboard_mask, split_mask
from .elementwise import (
    LeakyReLU,
    Logit,
    PiecewiseLinear,
    PiecewiseLinearTransformer,
    Sigmoid,
    Tanh,
    log_sigmoid_derivative,
    piecewise_linear,
)
from .householder import Householder, householder_apply, householder_product
from .image import FactorOut, InvertibleConv1x1, PerPixel, Squeeze
from .linear import (
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
from .naf import DeepSigmoidTransformer, deep_sigmoid_flow
from .planar_radial import Planar, Radial
from .splines import RQSplineTransformer, rational_quadratic_spline
from .sylvester import (
    SylvesterHouseholder,
    SylvesterOrthogonal,
    SylvesterTriangular,
    orthogonalize,
)
from .transformers import AdditiveTransformer, AffineTransformer

__all__ = [
    "ActNorm",
    "AdditiveTransformer",
    "AffineTransformer",
    "BatchNorm",
    "ConvexCombinationLinear",
    "Coupling",
    "DeepSigmoidTransformer",
    "ElementwiseAffine",
    "FactorOut",
    "FullAffine",
    "Householder",
    "InvertibleConv1x1",
    "LULinear",
    "LeakyReLU",
    "Logit",
    "MaskedAutoregressive",
    "PerPixel",
    "Permutation",
    "PiecewiseLinear",
    "PiecewiseLinearTransformer",
    "Planar",
    "RQSplineTransformer",
    "Radial",
    "Sigmoid",
    "Squeeze",
    "Standardization",
    "SylvesterHouseholder",
    "SylvesterOrthogonal",
    "SylvesterTriangular",
    "Tanh",
    "TriangularLinear",
    "channel_mask",
    "checkerboard_mask",
    "deep_sigmoid_flow",
    "householder_apply",
    "householder_product",
    "iaf_layer",
    "log_sigmoid_derivative",
    "orthogonalize",
    "piecewise_linear",
    "rational_quadratic_spline",
    "split_mask",
]
