r"""Variational dequantization (Ho et al. 2019, Flow++, section 3.1).

Uniform dequantization (:func:`~pushforward.data.images.dequantize_uniform`) models
:math:`y = (x + u) / L` with :math:`u \sim \mathcal U[0, 1)^D` and bounds the discrete
log-likelihood by :math:`\mathbb E_u[\log p_Y(y)] - D \log L`; the bound is loose wherever
the flow's density :math:`p_Y` is not flat inside a pixel's bin, and the flow spends capacity
on making it flat. Variational dequantization learns the noise instead: :math:`u \sim q(u
\mid x)`, a flow conditioned on the image, and

.. math::
    \log P(x) = \log \int_{[0,1)^D} p_Y\!\Bigl(\frac{x + u}{L}\Bigr) L^{-D}\,du
    \;\ge\; \mathbb E_{q(u \mid x)}\Bigl[\log p_Y\!\Bigl(\frac{x + u}{L}\Bigr)
    - \log q(u \mid x)\Bigr] - D \log L

(Jensen's inequality; equality when :math:`q(u \mid x) \propto p_Y((x + u)/L)` on the bin).
Uniform noise is the special case :math:`q = 1`. Both :math:`p_Y` and :math:`q` are trained
on this bound; reported bits/dim use it with one draw of :math:`u` per image, so they stay
upper bounds, in expectation, on the discrete code length, comparable with uniform
dequantization's.

:math:`q(u \mid x)`: :math:`\varepsilon \sim \mathcal N(0, I)` of the image's shape, then
``layers`` affine couplings with alternating checkerboard masks whose convolutional
conditioners (:class:`~pushforward.nn.convnet.ConvResNet`) see the image, scaled to
:math:`x / (L - 1) - 1/2`, as extra input channels at every pixel, then the sigmoid onto
:math:`(0, 1)`. It is a conditional :class:`~pushforward.distributions.Flow` whose context is
the flattened image, so :math:`\log q(u \mid x)` is exact (the change of variables), and it
passes the same checker as every flow.

References:
    Ho, Chen, Srinivas, Duan and Abbeel (2019), "Flow++: Improving flow-based generative
    models with variational dequantization and architecture design", arXiv:1902.00275,
    section 3.1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from ..core import Compose, PushforwardError, check_event, check_finite, shape_str
from ..distributions import Flow, StandardNormal

__all__ = ["VariationalDequantizer", "DequantizedFlow", "DequantizationBound"]


class VariationalDequantizer(nn.Module):
    r"""The learned noise distribution :math:`q(u \mid x)` on :math:`(0, 1)^D` (see the
    module docstring).

    Args:
        shape: ``(C, H, W)`` of the images.
        levels: number of intensity levels :math:`L` of the pixels.
        layers: number of checkerboard affine couplings.
        hidden: widths of the conditioners' residual blocks (one entry per block, all equal).

    ``forward(x)`` takes integer-valued images ``(*batch, C, H, W)`` (any float or integer
    dtype) and returns ``(y, log_q)``: ``y = (x + u) / L`` with one reparameterised draw
    :math:`u \sim q(u \mid x)` per image, and :math:`\log q(u \mid x)`, shape ``batch``.
    Cost: one pass of ``layers`` small ConvResNets.

    Example:
        >>> import torch
        >>> q = VariationalDequantizer((1, 4, 4), levels=17, layers=2, hidden=(8,))
        >>> y, log_q = q(torch.randint(0, 17, (3, 1, 4, 4)))
        >>> y.shape, log_q.shape, bool(((y * 17).floor() <= 16).all())
        (torch.Size([3, 1, 4, 4]), torch.Size([3]), True)
    """

    def __init__(
        self,
        shape: Sequence[int],
        levels: int,
        layers: int = 4,
        hidden: Sequence[int] = (16,),
    ):
        super().__init__()
        from ..nn.convnet import ConvResNet
        from ..transforms.coupling import Coupling, checkerboard_mask
        from ..transforms.elementwise import Sigmoid
        from ..transforms.transformers import AffineTransformer

        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise PushforwardError(f"shape must be (channels, height, width), got {shape!r}")
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
            raise PushforwardError(f"levels must be an integer >= 2, got {levels!r}")
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise PushforwardError(f"layers must be a positive integer, got {layers!r}")
        widths = tuple(hidden)
        if not widths or len(set(widths)) != 1:
            raise PushforwardError(
                f"hidden lists one width per residual block, all equal; got {hidden!r}"
            )
        self.levels = levels
        d = math.prod(self.shape)
        steps = []
        for k in range(layers):
            tr = AffineTransformer()
            net = ConvResNet(
                self.shape[0],
                tr.params_per_feature,
                hidden=int(widths[0]),
                blocks=len(widths),
                context_features=d,
                init=tr.identity_params(),
                context_shape=self.shape,
            )
            mask = checkerboard_mask(*self.shape, flip=k % 2 == 1)
            steps.append(Coupling(mask, tr, conditioner=net, context_features=d))
        steps.append(Sigmoid(event_dim=3))
        self.flow = Flow(StandardNormal(self.shape), Compose(*steps), context_features=d)

    def context(self, x: Tensor) -> Tensor:
        """The conditioning of :math:`q`: the image scaled to :math:`x / (L - 1) - 1/2`,
        flattened to ``(*batch, C H W)``."""
        batch = x.shape[: x.dim() - 3]
        return (x / (self.levels - 1) - 0.5).reshape(*batch, -1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_event(x, self.shape, "images")
        dtype = next(self.parameters()).dtype
        x = x.to(dtype)
        check_finite(x, "images")
        u, log_q = self.flow.sample_and_log_prob(context=self.context(x))
        return (x + u) / self.levels, log_q


class DequantizedFlow(Flow):
    r"""An image flow over :math:`y \in [0, 1)^D` together with its learned dequantizer.

    It *is* the flow (``log_prob``, ``sample``, ``latent`` are the flow's, on dequantized
    images in :math:`[0, 1)^D`), with :attr:`dequantizer` added; :meth:`discrete_log_prob`
    gives the variational bound on the log-probability of integer images.

    Args:
        flow: the image flow :math:`p_Y`.
        dequantizer: :math:`q(u \mid x)` for the same image shape.
    """

    def __init__(self, flow: Flow, dequantizer: VariationalDequantizer):
        if tuple(flow.event_shape) != dequantizer.shape:
            raise PushforwardError(
                f"the dequantizer is for images {shape_str(dequantizer.shape)}, the flow's "
                f"event shape is {shape_str(flow.event_shape)}"
            )
        super().__init__(flow.base, flow.transform, flow.context_features)
        self.dequantizer = dequantizer

    @property
    def levels(self) -> int:
        return self.dequantizer.levels

    def bound(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        r""":math:`\log p_Y(y) - \log q(u \mid x)` of integer images ``x``, one draw of
        :math:`u` per image (the units of :math:`y`)."""
        y, log_q = self.dequantizer(x)
        return self.log_prob(y, context) - log_q

    def discrete_log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        r"""One-draw estimate of the lower bound on :math:`\log P(x)` (nats per image) of
        integer images ``x``: :math:`\log p_Y(y) - \log q(u \mid x) - D \log L`."""
        return self.bound(x, context) - self.features * math.log(self.levels)


class DequantizationBound(nn.Module):
    r"""What :func:`~pushforward.train.fit` trains for variational dequantization: a module
    whose ``log_prob(x)`` of integer images is :math:`\log p_Y(y) - \log q(u \mid x)`, the
    bound of :meth:`DequantizedFlow.discrete_log_prob` in the units of :math:`y` (without
    the constant :math:`-D \log L`, as uniform dequantization's :math:`\log p_Y(y)`), so
    losses and validation figures read the same in both modes.

    Example:
        >>> import torch
        >>> from pushforward import flows
        >>> flow = flows.build("glow", (1, 4, 4), levels=1, layers=1, hidden=(8,))
        >>> q = VariationalDequantizer((1, 4, 4), levels=17, layers=1, hidden=(8,))
        >>> bound = DequantizationBound(DequantizedFlow(flow, q))
        >>> bound.log_prob(torch.randint(0, 17, (5, 1, 4, 4)).float()).shape
        torch.Size([5])
    """

    def __init__(self, model: DequantizedFlow):
        super().__init__()
        if not isinstance(model, DequantizedFlow):
            raise PushforwardError(
                f"DequantizationBound needs a DequantizedFlow, got {type(model).__name__}"
            )
        self.model = model

    @property
    def event_shape(self) -> tuple[int, ...]:
        return self.model.event_shape

    @property
    def context_features(self) -> int:
        return self.model.context_features

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.model.bound(x, context)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.log_prob(x, context)
