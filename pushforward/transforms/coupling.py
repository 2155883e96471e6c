r"""Coupling layers: the one structure behind NICE, RealNVP, Glow's affine coupling and coupling
neural spline flows.

A boolean *mask* over the event splits the input in two parts: the *identity part*
:math:`A` (mask ``False``) passes through unchanged and, with the context, drives a
*conditioner* network whose outputs are the parameters of an elementwise
:class:`~pushforward.core.Transformer` applied to the *transformed part* :math:`B` (mask
``True``):

.. math::
    x_A = z_A, \qquad x_B = \tau\bigl(z_B;\ \theta(z_A, c)\bigr), \qquad
    \log\left|\det \frac{\partial x}{\partial z}\right|
    = \sum_{i \in B} \log \frac{\partial \tau}{\partial z_i}\bigl(z_i; \theta_i\bigr).

The Jacobian is block triangular (identity on :math:`A`, diagonal on :math:`B`), and the
inverse :math:`z_A = x_A`, :math:`z_B = \tau^{-1}(x_B; \theta(x_A, c))` needs the same single
pass of the conditioner. The transformer picks the family: additive (NICE), affine (RealNVP,
Glow), rational-quadratic spline (coupling NSF), all one class, :class:`Coupling`.

Masks are pure functions of the event shape: :func:`split_mask` for vectors (halves or
alternating features), :func:`checkerboard_mask` and :func:`channel_mask` for
``(channels, height, width)`` images. In all of them ``flip=True`` swaps the two parts, which
is how consecutive layers take turns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..core import (
    PushforwardError,
    Transform,
    Transformer,
    check_context,
    check_event,
    check_positive_int,
    shape_str,
)
from ..nn.mlp import _ACTIVATIONS, MLP
from ..nn.resnet import ResidualMLP

__all__ = ["Coupling", "split_mask", "checkerboard_mask", "channel_mask"]


def split_mask(features: int, kind: str = "half", flip: bool = False) -> Tensor:
    r"""A coupling mask for vectors: ``True`` marks the features a layer transforms.

    ``kind="half"`` transforms the last :math:`\lceil d/2 \rceil` features (the first
    :math:`\lfloor d/2 \rfloor` are the identity part, as :math:`x_{1:d}` in NICE and RealNVP);
    ``kind="alternating"`` transforms the even-indexed features :math:`0, 2, 4, \dots` (NICE's
    odd/even partition). ``flip=True`` returns the complement. Unflipped masks transform
    :math:`\lceil d/2 \rceil \ge 1` features, so with a single feature the layer transforms it
    (and its parameters depend on the context only); the flipped mask of one feature is empty,
    which :class:`Coupling` rejects.

    Args:
        features: size :math:`d` of the vectors.
        kind: ``"half"`` or ``"alternating"``.
        flip: swap the identity and the transformed parts.

    Returns:
        A boolean tensor of shape ``(features,)``.

    Example:
        >>> split_mask(5)
        tensor([False, False,  True,  True,  True])
        >>> split_mask(5, "alternating", flip=True)
        tensor([False,  True, False,  True, False])
    """
    d = check_positive_int(features, "features")
    index = torch.arange(d)
    if kind == "half":
        mask = index >= d // 2
    elif kind == "alternating":
        mask = index % 2 == 0
    else:
        raise PushforwardError(f"unknown mask kind {kind!r}; choose from: half, alternating")
    return ~mask if flip else mask


def checkerboard_mask(channels: int, height: int, width: int, flip: bool = False) -> Tensor:
    r"""RealNVP's spatial checkerboard mask for ``(channels, height, width)`` images: ``True``
    (transformed) where :math:`i + j` is even, in every channel; ``flip=True`` returns the
    complement.

    .. math:: m_{c i j} = [\, (i + j) \bmod 2 = 0 \,]

    References:
        Dinh, Sohl-Dickstein and Bengio (2017), "Density estimation using Real NVP",
        arXiv:1605.08803, section 3.4.

    Example:
        >>> checkerboard_mask(1, 2, 3).int()
        tensor([[[1, 0, 1],
                 [0, 1, 0]]], dtype=torch.int32)
    """
    c = check_positive_int(channels, "channels")
    h = check_positive_int(height, "height")
    w = check_positive_int(width, "width")
    parity = (torch.arange(h).unsqueeze(1) + torch.arange(w)) % 2 == 0
    mask = parity.expand(c, h, w).clone()
    return ~mask if flip else mask


def channel_mask(channels: int, height: int, width: int, flip: bool = False) -> Tensor:
    r"""RealNVP's channel-wise mask for ``(channels, height, width)`` images: the last
    :math:`\lceil C/2 \rceil` channels are transformed, the first :math:`\lfloor C/2 \rfloor`
    are the identity part; ``flip=True`` returns the complement.

    .. math:: m_{c i j} = [\, c \ge \lfloor C / 2 \rfloor \,]

    References:
        Dinh, Sohl-Dickstein and Bengio (2017), "Density estimation using Real NVP",
        arXiv:1605.08803, section 3.4.

    Example:
        >>> channel_mask(4, 2, 2)[:, 0, 0]
        tensor([False, False,  True,  True])
    """
    c = check_positive_int(channels, "channels")
    h = check_positive_int(height, "height")
    w = check_positive_int(width, "width")
    mask = (torch.arange(c) >= c // 2).view(c, 1, 1).expand(c, h, w).clone()
    return ~mask if flip else mask


class _DenseConditioner(nn.Module):
    """The default conditioner: an MLP (or residual MLP) of the identity features, flattened, and
    the context, giving ``(*batch, transformed, params_per_feature)``; learned constants when it
    has no input at all (one feature and no context). Its output layer starts at zero weights
    with the transformer's identity parameters as bias."""

    def __init__(
        self,
        identity_features: int,
        context_features: int,
        transformed: int,
        identity: Tensor,
        hidden: Sequence[int],
        residual: bool,
        activation: str,
    ):
        super().__init__()
        self.transformed = transformed
        self.params_per_feature = identity.numel()
        init = identity.reshape(1, -1).expand(transformed, -1)
        inputs = identity_features + context_features
        out = transformed * self.params_per_feature
        self.net: nn.Module | None = None
        self.constant: nn.Parameter | None = None
        if inputs == 0:
            self.constant = nn.Parameter(init.clone())
            return
        self.net = (
            ResidualMLP(inputs, out, hidden, activation)
            if residual
            else MLP(inputs, out, hidden, activation)
        )
        last = self.net.last
        with torch.no_grad():
            nn.init.zeros_(last.weight)
            last.bias.copy_(init.reshape(-1))

    def forward(self, identity: Tensor, context: Tensor | None) -> Tensor:
        if self.net is None:
            return self.constant.expand(*identity.shape[:-1], *self.constant.shape)
        h = identity if context is None else torch.cat([identity, context], -1)
        return self.net(h).unflatten(-1, (self.transformed, self.params_per_feature))


def _check_mask(mask: Tensor) -> Tensor:
    if not isinstance(mask, Tensor):
        raise PushforwardError(f"mask must be a boolean torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        if (
            mask.is_floating_point()
            or mask.is_complex()
            or not bool(((mask == 0) | (mask == 1)).all())
        ):
            raise PushforwardError(f"mask must be boolean (or 0/1 integers), got {mask.dtype}")
        mask = mask != 0
    if mask.dim() < 1 or mask.numel() == 0:
        raise PushforwardError(
            f"mask: expected the event shape, e.g. (features,) or (channels, height, width), "
            f"got {shape_str(mask.shape)}"
        )
    if not bool(mask.any()):
        raise PushforwardError(
            f"mask {shape_str(mask.shape)} selects no entry to transform (all False): the layer "
            "would be the identity"
        )
    return mask.detach().cpu().clone()


class Coupling(Transform):
    r"""Coupling layer: the entries selected by ``mask`` are transformed elementwise, with
    parameters from a network of the other entries and the context.

    .. math::
        x_A = z_A, \qquad x_B = \tau\bigl(z_B;\ \theta(z_A, c)\bigr), \qquad
        \log\left|\det \frac{\partial x}{\partial z}\right|
        = \sum_{i \in B} \log \frac{\partial \tau}{\partial z_i}\bigl(z_i; \theta_i\bigr)

    (:math:`B`: entries where ``mask`` is ``True``; :math:`A`: the others; :math:`c`: the
    context). The inverse is :math:`z_A = x_A`, :math:`z_B = \tau^{-1}(x_B; \theta(x_A, c))`.
    With an :class:`~pushforward.transforms.transformers.AdditiveTransformer` this is NICE's
    additive coupling :math:`x_B = z_B + t(z_A)` (log-determinant 0); with an
    :class:`~pushforward.transforms.transformers.AffineTransformer` RealNVP's
    :math:`x_B = z_B \odot \exp(s(z_A)) + t(z_A)`; with a
    :class:`~pushforward.transforms.splines.RQSplineTransformer` the coupling neural spline
    flow. The identity part is copied exactly.

    Cost: both directions are one parallel pass (one conditioner evaluation and one transformer
    evaluation) and both are exact: density evaluation and sampling are equally fast.

    **Default conditioner** (``conditioner=None``): an MLP (``residual=True``: a
    :class:`~pushforward.nn.resnet.ResidualMLP`) of the identity entries, flattened, with the
    context concatenated, giving the transformer's parameters for the transformed entries. Its
    last layer starts at zero weights with bias ``transformer.identity_params()`` per entry, so a
    fresh layer is the transformer's identity. With no identity entries and no context (one
    feature), the parameters are learned constants: the layer is then an elementwise map.

    **Custom conditioner** (e.g. a convolutional ResNet for images): any module called as
    ``conditioner(identity, context)`` where

    * ``identity`` is the input with its transformed entries set to zero,
      ``z.masked_fill(mask, 0)``, of shape ``(*batch, *event)`` (RealNVP's :math:`b \odot z`:
      spatial structure is kept, and the values at transformed entries carry no information);
    * ``context`` is ``None`` (unconditional) or ``(*batch, context_features)``;
    * it returns the parameters either for every entry, ``(*batch, *event, P)`` (only the
      transformed entries' are used, as when a convolutional network outputs a full-resolution
      map), or for the transformed entries only, ``(*batch, n_B, P)`` in the row-major order of
      ``mask.nonzero()`` (or any ``(*batch, ..., P)`` holding :math:`n_B` entries in that
      order, e.g. ``(*batch, C_B, H, W, P)`` for a channel mask); :math:`P` is
      ``transformer.params_per_feature``.

    It must not read the transformed entries through any other route (that would break
    invertibility), and it should start at the identity itself (zero output weights with bias
    ``transformer.identity_params()``); ``hidden``, ``residual`` and ``activation`` are then
    unused.

    Args:
        mask: boolean tensor of the event shape (``(features,)`` for vectors,
            ``(channels, height, width)`` for images); ``True`` marks transformed entries. See
            :func:`split_mask`, :func:`checkerboard_mask`, :func:`channel_mask`.
        transformer: the elementwise map :math:`\tau`.
        conditioner: a custom conditioner (see above), or ``None`` for the default MLP.
        context_features: size of the conditioning vector (0: unconditional).
        hidden: hidden widths of the default conditioner (``residual=True``: one block per
            entry, all equal).
        residual: make the default conditioner a residual MLP (Durkan et al., 2019).
        activation: hidden activation of the default conditioner.

    References:
        Dinh, Krueger and Bengio (2014), "NICE: Non-linear independent components
        estimation", arXiv:1410.8516.
        Dinh, Sohl-Dickstein and Bengio (2017), "Density estimation using Real NVP",
        arXiv:1605.08803.
        Durkan, Bekasov, Murray and Papamakarios (2019), "Neural spline flows",
        arXiv:1906.04032.

    Example:
        >>> from pushforward.transforms.transformers import AffineTransformer
        >>> layer = Coupling(split_mask(4), AffineTransformer(), hidden=(16, 16))
        >>> z = torch.randn(5, 4)
        >>> x, ladj = layer(z)
        >>> z2, ladj2 = layer.inverse(x)
        >>> bool(torch.equal(x[:, :2], z[:, :2])), bool(torch.allclose(z2, z, atol=1e-6))
        (True, True)
        >>> ladj.shape
        torch.Size([5])
    """

    def __init__(
        self,
        mask: Tensor,
        transformer: Transformer,
        conditioner: nn.Module | None = None,
        context_features: int = 0,
        hidden: Sequence[int] = (256, 256),
        residual: bool = False,
        activation: str = "relu",
    ):
        super().__init__()
        mask = _check_mask(mask)
        if not isinstance(transformer, Transformer):
            raise PushforwardError(
                f"transformer must be a pushforward Transformer, got {type(transformer).__name__}"
            )
        if (
            isinstance(context_features, bool)
            or not isinstance(context_features, int)
            or context_features < 0
        ):
            raise PushforwardError(
                f"context_features must be a non-negative integer, got {context_features!r}"
            )
        self.event_dim = mask.dim()
        self.event_shape = tuple(mask.shape)
        self.context_features = int(context_features)
        self.transformer = transformer
        self.register_buffer("mask", mask)
        self._build_index()
        if conditioner is None:
            if activation not in _ACTIVATIONS:
                raise PushforwardError(
                    f"unknown activation {activation!r}; choose from {sorted(_ACTIVATIONS)}"
                )
            hidden = tuple(check_positive_int(h, "hidden width") for h in hidden)
            self.conditioner = _DenseConditioner(
                self.identity_index.numel(),
                self.context_features,
                self.transformed_index.numel(),
                torch.as_tensor(transformer.identity_params(), dtype=torch.get_default_dtype()),
                hidden,
                bool(residual),
                activation,
            )
        elif isinstance(conditioner, nn.Module):
            self.conditioner = conditioner
        else:
            raise PushforwardError(
                f"conditioner must be a torch.nn.Module or None, got {type(conditioner).__name__}"
            )
        self.register_load_state_dict_post_hook(_rebuild_index)

    def _build_index(self) -> None:
        """Index buffers derived from the mask (rebuilt after ``load_state_dict``)."""
        flat = self.mask.flatten()
        identity = (~flat).nonzero().squeeze(-1)
        transformed = flat.nonzero().squeeze(-1)
        order = torch.cat([identity, transformed])
        device = self.mask.device
        self.register_buffer("identity_index", identity.to(device), persistent=False)
        self.register_buffer("transformed_index", transformed.to(device), persistent=False)
        self.register_buffer("unsort", torch.argsort(order).to(device), persistent=False)

    def _params(self, v: Tensor, a: Tensor, c: Tensor | None, batch: tuple[int, ...]) -> Tensor:
        """The transformer's parameters for the transformed entries, ``(*batch, n_B, P)``."""
        if isinstance(self.conditioner, _DenseConditioner):
            return self.conditioner(a, c)
        out = self.conditioner(v.masked_fill(self.mask, 0.0), c)
        n, p = self.transformed_index.numel(), self.transformer.params_per_feature
        k = len(batch)
        if isinstance(out, Tensor):
            if tuple(out.shape) == (*batch, n, p):
                return out
            if tuple(out.shape) == (*batch, *self.event_shape, p):
                return out.flatten(k, k + self.event_dim - 1).index_select(
                    k, self.transformed_index
                )
            middle = out.shape[k:-1]
            if tuple(out.shape[:k]) == batch and out.shape[-1] == p and middle.numel() == n:
                return out.reshape(*batch, n, p)  # transformed entries only, in mask order
        got = shape_str(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise PushforwardError(
            f"conditioner output: expected shape {shape_str((*batch, *self.event_shape, p))} "
            f"(every entry) or {shape_str((*batch, n, p))} (transformed entries, any shape "
            f"of {n} entries before the last), got {got}"
        )

    def _couple(self, v: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        check_event(v, self.event_shape)
        batch = tuple(v.shape[: v.dim() - self.event_dim])
        c = check_context(context, self.context_features, batch)
        flat = v.reshape(*batch, -1)
        a = flat.index_select(-1, self.identity_index)
        b = flat.index_select(-1, self.transformed_index)
        params = self._params(v, a, c, batch)
        out_b, lad = (self.transformer.inverse if inverse else self.transformer)(b, params)
        out = torch.cat([a, out_b], -1).index_select(-1, self.unsort).reshape(v.shape)
        return out, lad.sum(-1)

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(z, context, inverse=False)

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(x, context, inverse=True)

    def extra_repr(self) -> str:
        n, total = self.transformed_index.numel(), self.mask.numel()
        return f"event_shape={shape_str(self.event_shape)}, transformed={n}/{total}"


def _rebuild_index(module: Coupling, incompatible_keys: object) -> None:
    module._build_index()
