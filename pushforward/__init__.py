"""pushforward: normalizing flows for PyTorch."""

from .core import Compose, Inverse, Parameters, PushforwardError, Transform, Transformer
from .distributions import DiagNormal, Flow, GaussianMixture, StandardNormal, Uniform

__version__ = "0.1.0"

__all__ = [
    "Compose",
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
