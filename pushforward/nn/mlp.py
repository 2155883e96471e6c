"""A plain multilayer perceptron, the default conditioner network."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "gelu": nn.GELU, "silu": nn.SiLU}


class MLP(nn.Sequential):
    """``Linear -> act -> ... -> Linear`` with the given hidden widths.

    Example:
        >>> import torch
        >>> MLP(3, 2, hidden=(16, 16))(torch.randn(5, 3)).shape
        torch.Size([5, 2])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] = (64, 64),
        activation: str = "relu",
    ):
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; choose from {sorted(_ACTIVATIONS)}"
            )
        layers: list[nn.Module] = []
        widths = [in_features, *hidden]
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), _ACTIVATIONS[activation]()]
        layers.append(nn.Linear(widths[-1], out_features))
        super().__init__(*layers)
        self.in_features = in_features
        self.out_features = out_features

    @property
    def last(self) -> nn.Linear:
        """The output layer (for zero or identity initialisation)."""
        return self[-1]

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)
