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
    r"""The affine map :math:`x = z \cdot s + t` with a softly bounded scale.

    .. math::
        x = z\, e^{\log s} + t, \qquad
        \log s = b \tanh(\tilde s / b), \qquad
        \log \frac{\partial x}{\partial z} = \log s

    ``params[..., 0]`` is the shift :math:`t` and ``params[..., 1]`` the raw log-scale
    :math:`\tilde s`; the soft clamp keeps :math:`\log s` in :math:`(-b, b)` (``scale_bound``),
    is the identity to first order near 0 (so the map behaves like the unbounded
    :math:`e^{\tilde s}` of MAF/RealNVP for moderate values) and has a non-vanishing gradient
    everywhere, so no parameter value overflows the map or its inverse
    :math:`z = (x - t)\, e^{-\log s}`. ``identity_params`` is ``(0, 0)``: :math:`s = 1, t = 0`.
    Cost: :math:`O(1)` per entry in both directions; the inverse is exact.

    Args:
        scale_bound: the bound :math:`b` on :math:`|\log s|` (default 5: scales in
            :math:`(e^{-5}, e^{5}) \approx (0.0067, 148)` per layer).

    References:
        Dinh, Sohl-Dickstein and Bengio (2016), "Density estimation using Real NVP",
        arXiv:1605.08803.
        Papamakarios, Pavlakou and Murray (2017), "Masked autoregressive flow for density
        estimation", arXiv:1705.07057.

    Example:
        >>> tr = AffineTransformer()
        >>> params = torch.tensor([[[1.0, 0.0], [0.0, 0.5]]])  # (batch, features, 2)
        >>> x, lad = tr(torch.tensor([[2.0, 2.0]]), params)
        >>> x
        tensor([[3.0000, 3.2920]])
        >>> torch.allclose(tr.inverse(x, params)[0], torch.tensor([[2.0, 2.0]]))
        True
    """

    params_per_feature = 2

    def __init__(self, scale_bound: float = 5.0):
        super().__init__()
        ok = isinstance(scale_bound, numbers.Real) and not isinstance(scale_bound, bool)
        if not ok or not math.isfinite(scale_bound) or scale_bound <= 0:
            raise PushforwardError(f"scale_bound must be a positive number, got {scale_bound!r}")
        self.scale_bound = float(scale_bound)

    def log_scale(self, raw: Tensor) -> Tensor:
        """:math:`\\log s = b \\tanh(\\tilde s / b)`."""
        return self.scale_bound * torch.tanh(raw / self.scale_bound)

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
