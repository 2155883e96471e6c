r"""Householder flows: volume-preserving orthogonal maps built from reflections.

A reflection :math:`H = I - 2 v v^\top / \|v\|^2` is orthogonal and its own inverse; a product of
:math:`k` of them reaches every orthogonal matrix for :math:`k = d`. The pure functions
:func:`householder_apply` and :func:`householder_product` are shared with the Sylvester flows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..core import (
    Parameters,
    PushforwardError,
    Transform,
    check_features,
    check_positive_int,
    shape_str,
)

__all__ = ["Householder", "householder_apply", "householder_product"]


def householder_apply(z: Tensor, v: Tensor, transpose: bool = False) -> Tensor:
    r"""Apply :math:`Q = H_k \cdots H_1` (or :math:`Q^\top = H_1 \cdots H_k`) to vectors.

    .. math:: H_i = I - 2 \frac{v_i v_i^\top}{\|v_i\|^2}

    Args:
        z: vectors of shape ``(*batch, d)``.
        v: reflection vectors of shape ``(*pbatch, k, d)`` (``v_1`` first), broadcasting
            against ``z``'s batch. A zero vector is taken as the identity reflection.
        transpose: apply :math:`Q^\top = Q^{-1}` (the reflections in reverse order).

    Returns:
        :math:`Q z` (or :math:`Q^\top z`), costing :math:`O(k d)` per vector; no matrix is formed.

    Example:
        >>> v = torch.randn(3, 4)
        >>> z = torch.randn(2, 4)
        >>> bool(torch.allclose(householder_apply(householder_apply(z, v), v, True), z, atol=1e-5))
        True
    """
    norms = (v * v).sum(-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
    order = range(v.shape[-2] - 1, -1, -1) if transpose else range(v.shape[-2])
    for i in order:
        vi = v[..., i, :]
        z = z - (2 * (z * vi).sum(-1, keepdim=True) / norms[..., i, :]) * vi
    return z


def householder_product(v: Tensor) -> Tensor:
    r"""The orthogonal matrix :math:`Q = H_k \cdots H_1` of reflections ``v`` of shape
    ``(..., k, d)``, as a ``(..., d, d)`` tensor (cost :math:`O(k d^2)`).

    ``householder_product(v) @ z`` equals ``householder_apply(z, v)`` for a vector ``z``.

    Example:
        >>> q = householder_product(torch.randn(2, 3))
        >>> bool(torch.allclose(q @ q.T, torch.eye(3), atol=1e-6))
        True
    """
    if not isinstance(v, Tensor) or v.dim() < 2:
        got = shape_str(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise PushforwardError(f"householder_product: expected v of shape (..., k, d), got {got}")
    d = v.shape[-1]
    eye = torch.eye(d, dtype=v.dtype, device=v.device)
    # row j of the result is Q e_j, the j-th column of Q
    return householder_apply(eye, v.unsqueeze(-3)).mT


class Householder(Transform):
    r"""Householder flow: a product of ``reflections`` learnable reflections, volume preserving.

    .. math::
        x = H_k \cdots H_1 z, \quad H_i = I - 2 \frac{v_i v_i^\top}{\|v_i\|^2}, \qquad
        \log|\det \partial x / \partial z| = 0

    since every :math:`H_i` is orthogonal (:math:`\det H_i = -1`). The inverse applies the same
    reflections in reverse order (each is its own inverse). Every real :math:`v_i` is valid (a
    zero vector counts as the identity). Both directions cost :math:`O(k d)` per sample, with no
    matrix formed. With ``context_features > 0`` the :math:`v_i` are a network of the context, as
    in the paper, where a VAE encoder produces them to rotate a diagonal Gaussian posterior.

    Args:
        features: size :math:`d` of the vectors.
        reflections: number :math:`k` of reflections.
        context_features: size of the conditioning vector (0: unconditional).
        hidden: hidden widths of the context network.

    References:
        Tomczak and Welling (2016), "Improving variational auto-encoders using Householder
        flow", arXiv:1611.09630.

    Example:
        >>> t = Householder(4, reflections=2)
        >>> z = torch.randn(3, 4)
        >>> x, ladj = t(z)
        >>> bool(torch.allclose(x.norm(dim=-1), z.norm(dim=-1), atol=1e-5)), ladj.shape
        (True, torch.Size([3]))
    """

    def __init__(
        self,
        features: int,
        reflections: int = 2,
        context_features: int = 0,
        hidden: Sequence[int] = (64, 64),
    ):
        super().__init__()
        self.features = check_positive_int(features, "features")
        self.reflections = check_positive_int(reflections, "reflections")
        self.params = Parameters(
            {"vectors": (self.reflections, self.features)}, None, context_features, hidden
        )

    def matrix(self, context: Tensor | None = None) -> Tensor:
        """The orthogonal matrix :math:`Q = H_k \\cdots H_1` (``(*batch, d, d)`` if conditional)."""
        return householder_product(self.params(context)["vectors"])

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_features(z, self.features)
        x = householder_apply(z, self.params(context)["vectors"])
        return x, z.new_zeros(z.shape[:-1])

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_features(x, self.features)
        z = householder_apply(x, self.params(context)["vectors"], transpose=True)
        return z, x.new_zeros(x.shape[:-1])
