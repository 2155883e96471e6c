r"""Autoregressive flows: the MADE-driven structure of MAF and (through ``Inverse``) IAF.

One class, :class:`MaskedAutoregressive`, is the *structure*: feature :math:`i` is transformed
by an elementwise :class:`~pushforward.core.Transformer` whose parameters are a MADE of the
features before it. The *transformer* decides the family: affine (MAF, IAF), additive, a
rational-quadratic spline (autoregressive NSF) or a deep sigmoidal flow (NAF), all
configurations of the same layer. An IAF layer is ``Inverse(MaskedAutoregressive(...))``
(:func:`iaf_layer`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..core import Inverse, Transform, Transformer, check_context, check_features
from ..nn.made import MADE

__all__ = ["MaskedAutoregressive", "iaf_layer"]


class MaskedAutoregressive(Transform):
    r"""Masked autoregressive flow layer (MAF): an elementwise transformer whose parameters for
    feature :math:`i` are a MADE of the features before :math:`i` in the ordering.

    .. math::
        x_i = \tau\bigl(z_i;\ \theta_i(x_{<i}, c)\bigr), \qquad
        \log\left|\det \frac{\partial x}{\partial z}\right|
        = \sum_i \log \frac{\partial \tau}{\partial z_i}\bigl(z_i; \theta_i\bigr)

    (:math:`x_{<i}`: the features earlier in the ordering; :math:`c`: the context). The Jacobian
    is triangular in the ordering, so the log-determinant is the sum of the transformer's
    elementwise log-derivatives. With an
    :class:`~pushforward.transforms.transformers.AffineTransformer` this is
    :math:`x_i = z_i \exp(\alpha_i) + \mu_i`, as in Papamakarios et al.

    Cost: :meth:`inverse` (data to base, the **density** direction) is one parallel pass,
    :math:`\theta = \mathrm{MADE}(x)`, :math:`z = \tau^{-1}(x; \theta)`. :meth:`forward` (base to
    data, **sampling**) is sequential in :math:`d`, but not :math:`d` passes of the network: with
    :meth:`MADE.autoregress <pushforward.nn.made.MADE.autoregress>`, step :math:`k` computes only
    the hidden units of degree :math:`k` from those already known, about one network pass of
    work in total (:meth:`forward_reference` is the plain :math:`d`-pass method, kept as the
    reference). Both directions are exact.

    The conditioner's output layer starts at zero weights with bias
    ``transformer.identity_params()`` per feature, so a fresh layer is the transformer's
    identity. IAF (Kingma et al. 2016) is ``Inverse(MaskedAutoregressive(...))``, which swaps
    the costs: its ``forward`` (sampling) is the parallel pass, :math:`x = \tau^{-1}(z;
    \theta(z))` with parameters from the *input*, and its density is sequential. For affine and
    additive transformers :math:`\tau^{-1}` is again affine/additive, so this is the IAF
    family exactly.

    Args:
        features: size :math:`d` of the vectors.
        transformer: the elementwise map :math:`\tau` (its ``params_per_feature`` sets the
            MADE's heads).
        context_features: size of the conditioning vector (0: unconditional).
        hidden: hidden widths of the MADE (residual: one block per entry, all equal).
        order: ``"natural"``, ``"random"`` or a permutation tensor (rank of each feature);
            see :class:`~pushforward.nn.made.MADE`.
        residual: use the residual MADE of Durkan et al. (2019).
        seed: seed of a random order.
        activation: hidden activation of the MADE.

    References:
        Papamakarios, Pavlakou and Murray (2017), "Masked autoregressive flow for density
        estimation", arXiv:1705.07057.
        Kingma, Salimans, Jozefowicz, Chen, Sutskever and Welling (2016), "Improved variational
        inference with inverse autoregressive flow", arXiv:1606.04934.
        Germain, Gregor, Murray and Larochelle (2015), "MADE: Masked autoencoder for
        distribution estimation", arXiv:1502.03509.

    Example:
        >>> from pushforward.transforms.transformers import AffineTransformer
        >>> maf = MaskedAutoregressive(3, AffineTransformer(), hidden=(16, 16))
        >>> z = torch.randn(5, 3)
        >>> x, ladj = maf(z)  # sequential (sampling)
        >>> z2, ladj2 = maf.inverse(x)  # one pass (density)
        >>> bool(torch.allclose(z2, z, atol=1e-5)), ladj.shape
        (True, torch.Size([5]))
    """

    def __init__(
        self,
        features: int,
        transformer: Transformer,
        context_features: int = 0,
        hidden: Sequence[int] = (512, 512),
        order: str | Tensor = "natural",
        residual: bool = False,
        seed: int = 0,
        activation: str = "relu",
    ):
        super().__init__()
        self.made = MADE(
            features,
            hidden,
            heads=transformer.params_per_feature,
            context_features=context_features,
            order=order,
            residual=residual,
            activation=activation,
            seed=seed,
        )
        self.features = self.made.features
        self.context_features = self.made.context_features
        self.transformer = transformer
        with torch.no_grad():
            bias = self.made.output.bias
            identity = torch.as_tensor(transformer.identity_params(), dtype=bias.dtype)
            nn.init.zeros_(self.made.output.weight)
            bias.copy_(identity.reshape(1, -1).expand(self.features, -1).reshape(-1))

    def _prepare(self, v: Tensor, context: Tensor | None) -> Tensor | None:
        check_features(v, self.features)
        return check_context(context, self.context_features, v.shape[:-1])

    def inverse(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        c = self._prepare(x, context)
        params = self.made(x, c, transposed=self.transformer.param_major)
        z, lad = self.transformer.inverse(x, params)
        return z, lad.sum(-1)

    def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        c = self._prepare(z, context)
        batch = z.shape[:-1]
        zf = z.reshape(-1, self.features)
        cf = None if c is None else c.reshape(zf.shape[0], -1)
        x, ladj = self.made.in_row_chunks(self._autoregress, zf, cf)
        return x.reshape(z.shape), ladj.reshape(batch)

    def _autoregress(self, zf: Tensor, cf: Tensor | None) -> tuple[Tensor, Tensor]:
        """``forward`` of rows ``zf`` (``(n, d)``): the inputs one at a time, and the summed
        log-determinants."""
        lads: list[Tensor] = []

        def step(i: int, params: Tensor) -> Tensor:
            xi, lad = self.transformer(zf[:, i : i + 1], params.unsqueeze(1))
            lads.append(lad)
            return xi

        x = self.made.autoregress(step, zf.shape[0], cf)
        return x, torch.cat(lads, -1).sum(-1)

    def forward_reference(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`forward` by :math:`d` full passes of the network (after pass :math:`k` the
        first :math:`k` features in the order are exact); the reference the fast path is
        tested against. Cost: :math:`d` network passes."""
        c = self._prepare(z, context)
        x = torch.zeros_like(z)
        for _ in range(self.features):
            x, lad = self.transformer(z, self.made(x, c))
        return x, lad.sum(-1)


def iaf_layer(
    features: int,
    transformer: Transformer,
    context_features: int = 0,
    hidden: Sequence[int] = (512, 512),
    order: str | Tensor = "natural",
    residual: bool = False,
    seed: int = 0,
    activation: str = "relu",
) -> Transform:
    r"""An inverse autoregressive flow layer: ``Inverse(MaskedAutoregressive(...))``.

    .. math::
        x_i = \tau^{-1}\bigl(z_i;\ \theta_i(z_{<i}, c)\bigr)

    Its ``forward`` (sampling, and ``Flow.sample_and_log_prob``) is one parallel pass; its
    ``inverse`` (density of arbitrary points) is sequential in :math:`d`. Arguments as for
    :class:`MaskedAutoregressive`.

    References:
        Kingma, Salimans, Jozefowicz, Chen, Sutskever and Welling (2016), "Improved variational
        inference with inverse autoregressive flow", arXiv:1606.04934.

    Example:
        >>> from pushforward.transforms.transformers import AffineTransformer
        >>> iaf = iaf_layer(3, AffineTransformer(), hidden=(16,))
        >>> type(iaf).__name__, type(iaf.inv).__name__
        ('Inverse', 'MaskedAutoregressive')
    """
    return Inverse(
        MaskedAutoregressive(
            features, transformer, context_features, hidden, order, residual, seed, activation
        )
    )
