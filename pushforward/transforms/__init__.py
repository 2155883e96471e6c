"""The transforms, one module per family; their public names are re-exported here.

Structures (:class:`MaskedAutoregressive`, :class:`Coupling`) take elementwise transformers
(:class:`AffineTransformer`, :class:`AdditiveTransformer`, :class:`RQSplineTransformer`,
:class:`DeepSigmoidTransformer`, :class:`PiecewiseLinearTransformer`); the rest are layers.
"""

from .autoregressive import MaskedAutoregressive, iaf_layer
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
from .transformers import AdditiveTransformer, AffineTransformer

__all__ = [
    "ActNorm",
    "AdditiveTransformer",
    "AffineTransformer",
    "BatchNorm",
    "ConvexCombinationLinear",
    "DeepSigmoidTransformer",
    "ElementwiseAffine",
    "FullAffine",
    "Householder",
    "LULinear",
    "LeakyReLU",
    "Logit",
    "MaskedAutoregressive",
    "Permutation",
    "PiecewiseLinear",
    "PiecewiseLinearTransformer",
    "Planar",
    "RQSplineTransformer",
    "Radial",
    "Sigmoid",
    "Standardization",
    "Tanh",
    "TriangularLinear",
    "deep_sigmoid_flow",
    "householder_apply",
    "householder_product",
    "iaf_layer",
    "log_sigmoid_derivative",
    "piecewise_linear",
    "rational_quadratic_spline",
]
