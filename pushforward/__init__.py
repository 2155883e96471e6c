"""pushforward: normalizing flows for PyTorch."""

from .core import (
    Compose,
    Identity,
    Inverse,
    Parameters,
    PushforwardError,
    Transform,
    Transformer,
)
from .distributions import (
    Base,
    DiagNormal,
    Flow,
    GaussianMixture,
    MADEMoG,
    StandardNormal,
    Uniform,
)
from .flows import build, names

__version__ = "0.1.0"

__all__ = [
    "Base",
    "Compose",
    "Identity",
    "MADEMoG",
    "build",
    "names",
    "DiagNormal",
    "Flow",
    "GaussianMixture",
    "Inverse",
    "Parameters",
    "PushforwardError",
    "StandardNormal",
    "Transform",
    "Transformer",
    "Uniform",
    "__version__",
]
