r"""Elementwise transformers for coupling and autoregressive structures: affine and additive.

A :class:`~pushforward.core.Transformer` is the elementwise monotone map
:math:`x_i = \tau(z_i; \theta_i)` of a layer whose *structure* (coupling, autoregressive)
decides which features :math:`\theta_i` may depend on. These two are the classic ones: the
affine map of RealNVP, MAF and IAF, and the additive (volume-preserving) map of NICE. Both are
pure, parameter-free modules; the parameters arrive from the structure's conditioner.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ..core import PushforwardError, Transformer, shape_str

__all__ = ["AffineTransformer", "AdditiveTransformer"]


def _split(params: Tensor, per_feature: int, name: str) -> Tensor:
    if not isinstance(params, Tensor) or params.dim() < 2 or params.shape[-1] != per_feature:
        got = shape_str(params.shape) if isinstance(params, Tensor) else type(params).__name__
        raise PushforwardError(
            f"{name} params: expected shape (batch, features, {per_feature}), got {got}"
        )
    return params.unbind(-1)


class AffineTransformer(Transformer):
    r"""The affine map :math:`x = z \cdot s + t` with a bounded scale.

    .. math::
        x = z\, e^{\log s} + t, \qquad
        \log \frac{\partial x}{\partial z} = \log s

    ``params[..., 0]`` is the shift :math:`t` and ``params[..., 1]`` the raw scale
    :math:`\tilde s`, mapped to :math:`\log s` by one of two bounded parameterisations:

    * ``scale="tanh"`` (default): :math:`\log s = b \tanh(\tilde s / b)`, a soft clamp to
      :math:`(-b, b)` (``scale_bound``) that is the identity to first order near 0 (so the map
      behaves like the unbounded :math:`e^{\tilde s}` of MAF/RealNVP for moderate values) and
      has a non-vanishing gradient everywhere. A pair ``scale_bound=(a, b)`` clamps to
      :math:`(-a, b)` instead: :math:`a \tanh(\tilde s / a)` for :math:`\tilde s < 0`,
      :math:`b \tanh(\tilde s / b)` above (equal slopes and curvatures at 0). Used in the
      data -> latent direction, :math:`z = (x - t) e^{-\log s}`, a small :math:`a` bounds how
      much one layer can *expand* an input by :math:`e^{a}`: an input unlike the training data
      then cannot be amplified layer after layer into an astronomically small density (the
      image flows' failure this prevents, see ``flows.glow``).
    * ``scale="sigmoid"``: Glow's gate. The *inverse* map multiplies by a sigmoid,
      :math:`z = (x - t)\, g`, :math:`g = (\sigma(\tilde s + 2) + \epsilon) /
      (\sigma(2) + \epsilon)`, :math:`\epsilon = 10^{-3}`, i.e.

      .. math:: \log s = \log(\sigma(2) + \epsilon) - \log(\sigma(\tilde s + 2) + \epsilon)
         \in (-0.127, 6.78).

      Used in the data -> latent direction (as the couplings of an image flow are), the layer
      can contract by any factor down to :math:`\approx 10^{-3}` but expand by at most
      :math:`1/\sigma(2) \approx 1.135`, so no minibatch can be blown up by a chain of
      couplings; this is what keeps Glow's training stable (Kingma & Dhariwal 2018, code:
      ``scale = sigmoid(h + 2)``). The division by :math:`\sigma(2)+\epsilon` makes
      :math:`\tilde s = 0` the identity (Glow itself starts at scale 0.88); :math:`\epsilon`
      (as in nflows) bounds the latent -> data expansion when sampling.

    Either way no parameter value overflows the map or its inverse
    :math:`z = (x - t)\, e^{-\log s}`, and ``identity_params`` is ``(0, 0)``:
    :math:`s = 1, t = 0`. Cost: :math:`O(1)` per entry in both directions; the inverse is exact.

    Args:
        scale_bound: the bound :math:`b` on :math:`|\log s|` of ``"tanh"`` (default 5: scales
            in :math:`(e^{-5}, e^{5}) \approx (0.0067, 148)` per layer), or a pair
            :math:`(a, b)`: :math:`-a < \log s < b`.
        scale: ``"tanh"`` or ``"sigmoid"``.

    References:
        Dinh, Sohl-Dickstein and Bengio (2016), "Density estimation using Real NVP",
        arXiv:1605.08803.
        Papamakarios, Pavlakou and Murray (2017), "Masked autoregressive flow for density
        estimation", arXiv:1705.07057.
        Kingma and Dhariwal (2018), "Glow: Generative flow with invertible 1x1 convolutions",
        arXiv:1807.03039.

    Example:
        >>> tr = AffineTransformer()
        >>> params = torch.tensor([[[1.0, 0.0], [0.0, 0.5]]])  # (batch, features, 2)
        >>> x, lad = tr(torch.tensor([[2.0, 2.0]]), params)
        >>> x
        tensor([[3.0000, 3.2920]])
        >>> torch.allclose(tr.inverse(x, params)[0], torch.tensor([[2.0, 2.0]]))
        True
        >>> AffineTransformer(scale="sigmoid").log_scale(torch.tensor([-50.0, 0.0, 50.0]))
        tensor([ 6.7820,  0.0000, -0.1268])
    """

    params_per_feature = 2
    #: the parameterisations of the scale
    SCALES = ("tanh", "sigmoid")
    #: :math:`\epsilon` of the sigmoid gate
    GATE_FLOOR = 1e-3

    def __init__(self, scale_bound: float | tuple[float, float] = 5.0, scale: str = "tanh"):
        super().__init__()
        pair = tuple(scale_bound) if isinstance(scale_bound, (tuple, list)) else (scale_bound,)
        positive = all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0
            for v in pair
        )
        if not 1 <= len(pair) <= 2 or not positive:
            raise PushforwardError(
                f"scale_bound must be a positive number or a pair of them, got {scale_bound!r}"
            )
        if scale not in self.SCALES:
            raise PushforwardError(
                f"unknown affine scale {scale!r}; choose from: {', '.join(self.SCALES)}"
            )
        self.lower_bound, self.scale_bound = float(pair[0]), float(pair[-1])
        self.scale = scale

    def log_scale(self, raw: Tensor) -> Tensor:
        """The log-scale :math:`\\log s` of the raw parameter (see the class docstring)."""
        if self.scale == "sigmoid":
            two = torch.full((), 2.0, dtype=raw.dtype, device=raw.device)
            # the same float ops at raw = 0 as at the reference, so s = 1 exactly there
            at_zero = torch.log(torch.sigmoid(two) + self.GATE_FLOOR)
            return at_zero - torch.log(torch.sigmoid(raw + two) + self.GATE_FLOOR)
        high = self.scale_bound * torch.tanh(raw / self.scale_bound)
        if self.lower_bound == self.scale_bound:
            return high
        return torch.where(raw < 0, self.lower_bound * torch.tanh(raw / self.lower_bound), high)

    def forward(self, z: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        shift, raw = _split(params, 2, "affine")
        log_s = self.log_scale(raw)
        x = z * log_s.exp() + shift
        return x, log_s.expand(x.shape)

    def inverse(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        shift, raw = _split(params, 2, "affine")
        log_s = self.log_scale(raw)
        z = (x - shift) * (-log_s).exp()
        return z, (-log_s).expand(z.shape)

    def extra_repr(self) -> str:
        if self.scale == "sigmoid":
            return "scale=sigmoid"
        if self.lower_bound != self.scale_bound:
            return f"scale_bound=({self.lower_bound:g}, {self.scale_bound:g})"
        return f"scale_bound={self.scale_bound:g}"


class AdditiveTransformer(Transformer):
    r"""The additive (volume-preserving) map of NICE: :math:`x = z + t`.

    .. math:: x = z + t, \qquad \log \frac{\partial x}{\partial z} = 0

    ``params[..., 0]`` is the shift :math:`t`; ``identity_params`` is ``(0,)``. Cost:
    :math:`O(1)` per entry in both directions; the inverse :math:`z = x - t` is exact.

    References:
        Dinh, Krueger and Bengio (2014), "NICE: Non-linear independent components
        estimation", arXiv:1410.8516.

    Example:
        >>> x, lad = AdditiveTransformer()(torch.zeros(1, 2), torch.tensor([[[1.0], [2.0]]]))
        >>> x, lad
        (tensor([[1., 2.]]), tensor([[0., 0.]]))
    """

    params_per_feature = 1

    def forward(self, z: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        (shift,) = _split(params, 1, "additive")
        x = z + shift
        return x, torch.zeros_like(x)

    def inverse(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        (shift,) = _split(params, 1, "additive")
        z = x - shift
        return z, torch.zeros_like(z)
