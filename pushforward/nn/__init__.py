"""Conditioner networks: MLP (and, as families land, MADE, ResNet, ConvNet)."""

from .made import MADE
from .mlp import MLP

__all__ = ["MADE", "MLP"]
