r"""Image transforms: squeeze, per-pixel maps (the invertible 1x1 convolution), factor-out.

Images are events of shape ``(channels, height, width)`` (``event_dim = 3``). The multi-scale
architecture of RealNVP and Glow is built from three pieces, in the generative direction
(base to data, like every transform here):

* :class:`Squeeze` -- whose *inverse* (data to base) is the space-to-depth reshape
  :math:`(C, H, W) \to (4C, H/2, W/2)`, as the papers describe it going from data to latent;
* :class:`PerPixel` -- any vector transform applied over the channels at every pixel;
  :class:`InvertibleConv1x1` is ``PerPixel(LULinear)``, Glow's LU-decomposed 1x1 convolution;
* :class:`FactorOut` -- the first half of the channels goes straight to the base, the rest
  through an inner transform, so a multi-scale flow is a recursion
  ``Compose(FactorOut(deeper levels), Squeeze(), steps)``.

References:
    Dinh, Sohl-Dickstein and Bengio (2016), "Density estimation using Real NVP",
    arXiv:1605.08803 (squeeze, multi-scale architecture, factoring out).
    Kingma and Dhariwal (2018), "Glow: Generative flow with invertible 1x1 convolutions",
    arXiv:1807.03039.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import PushforwardError, Transform, check_positive_int, shape_str
from .linear import LULinear

__all__ = ["Squeeze", "PerPixel", "InvertibleConv1x1", "FactorOut"]


def _check_image(v: Tensor, name: str, channels: int | None = None) -> None:
    if not isinstance(v, Tensor):
        raise PushforwardError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    if v.dim() < 4:
        raise PushforwardError(
            f"{name}: expected images of shape (batch, channels, height, width), "
            f"got {shape_str(v.shape)}"
        )
    if channels is not None and v.shape[-3] != channels:
        raise PushforwardError(
            f"{name}: expected shape {shape_str(('batch', channels, 'height', 'width'))}, "
            f"got {shape_str(v.shape)}"
        )


class Squeeze(Transform):
    r"""Space-to-depth in the data-to-base direction: every :math:`f \times f` block of pixels
    becomes :math:`f^2` channels.

    .. math::
        \operatorname{inverse}: (C, H, W) \to (f^2 C, H/f, W/f), \qquad
        \log|\det J| = 0

    (a permutation of the entries). :meth:`forward` is depth-to-space, the exact inverse. The
    channel order is ``(c, i, j)``: output channel :math:`c f^2 + i f + j` holds pixel
    :math:`(f h + i, f w + j)` of channel :math:`c`. Cost: one reshape and permute.

    Args:
        factor: block size :math:`f` (2 in RealNVP and Glow).

    References:
        Dinh, Sohl-Dickstein and Bengio (2016), "Density estimation using Real NVP",
        arXiv:1605.08803, section 3.6.

    Example:
        >>> sq = Squeeze()
        >>> z, ladj = sq.inverse(torch.randn(5, 1, 4, 6))
        >>> z.shape, sq(z)[0].shape
        (torch.Size([5, 4, 2, 3]), torch.Size([5, 1, 4, 6]))
    """

    event_dim = 3

    def __init__(self, factor: int = 2):
        super().__init__()
        self.factor = check_positive_int(factor, "factor")

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_image(x, "x")
        f = self.factor
        *batch, c, h, w = x.shape
        if h % f or w % f:
            raise PushforwardError(
                f"Squeeze: height and width must be multiples of {f}, got {h}x{w}"
            )
        y = x.reshape(*batch, c, h // f, f, w // f, f)
        n = len(batch)
        y = y.permute(*range(n), n, n + 2, n + 4, n + 1, n + 3)
        y = y.reshape(*batch, c * f * f, h // f, w // f)
        return y, x.new_zeros(batch)

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_image(z, "z")
        f = self.factor
        *batch, c, h, w = z.shape
        if c % (f * f):
            raise PushforwardError(
                f"Squeeze: channels must be a multiple of {f * f} to unsqueeze, got {c}"
            )
        n = len(batch)
        y = z.reshape(*batch, c // (f * f), f, f, h, w)
        y = y.permute(*range(n), n, n + 3, n + 1, n + 4, n + 2)
        return y.reshape(*batch, c // (f * f), h * f, w * f), z.new_zeros(batch)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class PerPixel(Transform):
    r"""A vector transform over the channels, applied at every pixel with shared parameters.

    .. math::
        x_{\cdot hw} = g(z_{\cdot hw}), \qquad
        \log|\det J| = \sum_{h, w} \log|\det J_g(z_{\cdot hw})|

    A 1x1 convolution is ``PerPixel`` of a linear map; any vector transform of the library
    (elementwise, LU, Householder, even a small autoregressive layer) becomes a per-pixel
    image transform this way. A context of shape ``(*batch, context_features)`` conditions
    every pixel of its image (the inner transform sees the pixels as extra leading batch
    dimensions, broadcast against the context). Cost: the inner transform's, on
    :math:`H W` times the batch.

    Args:
        transform: a vector transform (``event_dim`` 1) on the channels.

    Example:
        >>> from pushforward.transforms.linear import ElementwiseAffine
        >>> t = PerPixel(ElementwiseAffine(3))
        >>> x, ladj = t(torch.randn(2, 3, 4, 4))
        >>> x.shape, ladj.shape
        (torch.Size([2, 3, 4, 4]), torch.Size([2]))
    """

    event_dim = 3

    def __init__(self, transform: Transform):
        super().__init__()
        if transform.event_dim != 1:
            raise PushforwardError(
                f"PerPixel needs a vector transform (event_dim 1), got event_dim "
                f"{transform.event_dim}"
            )
        self.transform = transform

    def _map(self, v: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        _check_image(v, "x" if inverse else "z")
        # (*batch, C, H, W) -> (H, W, *batch, C): pixels lead, so a (*batch, cf) context and
        # per-context parameters broadcast against them
        y = v.movedim((-2, -1), (0, 1))
        t = self.transform
        out, ladj = t.inverse(y, context) if inverse else t(y, context)
        return out.movedim((0, 1), (-2, -1)), ladj.sum((0, 1))

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._map(z, context, False)

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._map(x, context, True)


class InvertibleConv1x1(PerPixel):
    r"""Glow's invertible 1x1 convolution, LU-parameterised: :math:`W = P L U` over channels.

    .. math::
        x_{\cdot hw} = W z_{\cdot hw} + b, \qquad
        \log|\det J| = H W \sum_i s_i, \quad U_{ii} = \sigma_i e^{s_i}

    It is :class:`PerPixel` of :class:`~pushforward.transforms.linear.LULinear` (one
    implementation of the LU map for vectors and images), started at a random rotation.
    Cost: :math:`O(C^2)` per pixel each way; the inverse is two triangular solves.

    Args:
        channels: number of channels :math:`C`.
        context_features: size of the conditioning vector (0: unconditional).
        seed: seed of the initial rotation.

    References:
        Kingma and Dhariwal (2018), "Glow: Generative flow with invertible 1x1 convolutions",
        arXiv:1807.03039, section 3.2.

    Example:
        >>> conv = InvertibleConv1x1(4, seed=0)
        >>> z = torch.randn(2, 4, 3, 3)
        >>> x, ladj = conv(z)
        >>> bool(torch.allclose(conv.inverse(x)[0], z, atol=1e-5))
        True
    """

    def __init__(self, channels: int, context_features: int = 0, seed: int | None = None):
        super().__init__(LULinear(channels, context_features, seed=seed))
        self.channels = channels


class FactorOut(Transform):
    r"""Multi-scale factoring: the first channels go to the base, the rest through ``inner``.

    .. math::
        x = \bigl(z_{1:k},\ g(z_{k+1:C})\bigr), \qquad
        \log|\det J| = \log|\det J_g(z_{k+1:C})|

    In the data-to-base direction (RealNVP, section 3.6) this is "half of the dimensions are
    factored out" after a scale: they are Gaussianised at that resolution, and only the other
    half is transformed further, by ``inner`` (deeper levels, typically
    ``Compose(FactorOut(...), Squeeze(), steps)``). The factored-out part is modelled by the
    base exactly, so no density is lost. Cost: ``inner``'s on the kept channels.

    Args:
        inner: the transform of the remaining channels (``event_dim`` 3).
        channels: total number of channels :math:`C` of the input.
        factored: number :math:`k` of channels factored out (default :math:`C/2`).

    References:
        Dinh, Sohl-Dickstein and Bengio (2016), "Density estimation using Real NVP",
        arXiv:1605.08803, section 3.6.

    Example:
        >>> t = FactorOut(InvertibleConv1x1(2, seed=0), channels=4)
        >>> x, ladj = t(torch.randn(3, 4, 2, 2))
        >>> x.shape
        torch.Size([3, 4, 2, 2])
    """

    event_dim = 3

    def __init__(self, inner: Transform, channels: int, factored: int | None = None):
        super().__init__()
        self.channels = check_positive_int(channels, "channels")
        k = self.channels // 2 if factored is None else factored
        if not isinstance(k, int) or not 0 < k < self.channels:
            raise PushforwardError(
                f"FactorOut: factored must be between 1 and {self.channels - 1}, got {k!r}"
            )
        if inner.event_dim != 3:
            raise PushforwardError(
                f"FactorOut needs an image transform (event_dim 3), got event_dim {inner.event_dim}"
            )
        self.factored = k
        self.inner = inner

    def _map(self, v: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        _check_image(v, "x" if inverse else "z", self.channels)
        out, rest = v.split((self.factored, self.channels - self.factored), dim=-3)
        rest, ladj = self.inner.inverse(rest, context) if inverse else self.inner(rest, context)
        return torch.cat((out, rest), dim=-3), ladj

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._map(z, context, False)

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._map(x, context, True)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, factored={self.factored}"
