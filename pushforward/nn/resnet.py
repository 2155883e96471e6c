r"""A residual multilayer perceptron: the conditioner of the coupling layers of neural spline
flows."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..core import PushforwardError, check_positive_int

__all__ = ["ResidualMLP"]

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "gelu": nn.GELU, "silu": nn.SiLU}


class _Block(nn.Module):
    """One pre-activation residual block, ``h + W_2 act(W_1 act(h) + b_1) + b_2``."""

    def __init__(self, width: int, activation: str):
        super().__init__()
        self.act = _ACTIVATIONS[activation]()
        self.inner = nn.Linear(width, width)
        self.outer = nn.Linear(width, width)
        # the block starts close to the identity (as in nflows' residual nets and our MADE)
        nn.init.uniform_(self.outer.weight, -1e-3, 1e-3)
        nn.init.uniform_(self.outer.bias, -1e-3, 1e-3)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.outer(self.act(self.inner(self.act(h))))


class ResidualMLP(nn.Module):
    r"""A residual MLP: an input layer, one pre-activation residual block per hidden width, and
    an output layer.

    .. math::
        h_0 = W_{\text{in}} x + b_{\text{in}}, \qquad
        h_{k} = h_{k-1} + W_2^{k} \sigma(W_1^{k} \sigma(h_{k-1}) + b_1^{k}) + b_2^{k}, \qquad
        y = W_{\text{out}} h_K + b_{\text{out}}

    Each block's second layer starts near zero (uniform :math:`\pm 10^{-3}`), so a fresh network
    is close to the two-layer linear map, and the skip connections keep gradients flowing through
    deep stacks. All hidden widths must be equal (the skips add states of one width). Cost: one
    pass, :math:`O(\text{in} \cdot w + 2 K w^2 + w \cdot \text{out})` per row.

    Args:
        in_features: number of inputs.
        out_features: number of outputs.
        hidden: hidden widths, one residual block per entry, all equal.
        activation: ``"relu"``, ``"tanh"``, ``"elu"``, ``"gelu"`` or ``"silu"``.

    References:
        He, Zhang, Ren and Sun (2016), "Identity mappings in deep residual networks",
        arXiv:1603.05027 (pre-activation blocks).
        Durkan, Bekasov, Murray and Papamakarios (2019), "Neural spline flows",
        arXiv:1906.04032 (residual conditioners of two blocks for tabular data).

    Example:
        >>> import torch
        >>> net = ResidualMLP(3, 2, hidden=(16, 16))
        >>> net(torch.randn(5, 3)).shape
        torch.Size([5, 2])
        >>> len(net.blocks)
        2
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] = (256, 256),
        activation: str = "relu",
    ):
        super().__init__()
        self.in_features = check_positive_int(in_features, "in_features")
        self.out_features = check_positive_int(out_features, "out_features")
        widths = [check_positive_int(h, "hidden width") for h in hidden]
        if not widths:
            raise PushforwardError("ResidualMLP needs at least one hidden width (one block)")
        if len(set(widths)) != 1:
            raise PushforwardError(f"residual blocks need equal hidden widths, got {tuple(widths)}")
        if activation not in _ACTIVATIONS:
            raise PushforwardError(
                f"unknown activation {activation!r}; choose from {sorted(_ACTIVATIONS)}"
            )
        width = widths[0]
        self.first = nn.Linear(self.in_features, width)
        self.blocks = nn.ModuleList(_Block(width, activation) for _ in widths)
        self.output = nn.Linear(width, self.out_features)

    @property
    def last(self) -> nn.Linear:
        """The output layer (for zero or identity initialisation)."""
        return self.output

    def forward(self, x: Tensor) -> Tensor:
        h = self.first(x)
        for block in self.blocks:
            h = block(h)
        return self.output(h)
