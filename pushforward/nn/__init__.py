"""Conditioner networks: MLP (and, as families land, MADE, ResNet, ConvNet)."""

from .mlp import MLP

__all__ = ["MLP"]
