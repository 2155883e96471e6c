"""Conditioner networks: MLP, residual MLP, MADE (masked, with degrees), convolutional ResNet."""

from .convnet import ConvResNet
from .made import MADE
from .mlp import MLP
from .resnet import ResidualMLP

__all__ = ["ConvResNet", "MADE", "MLP", "ResidualMLP"]
