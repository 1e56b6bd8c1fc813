"""A small CNN with two branches whose outputs are concatenated, then a classifier."""
from __future__ import annotations

import torch
from torch import nn


def _conv(c_in: int, c_out: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class TwoBranchCNN(nn.Module):
    """stem -> (3x3 branch, 1x1 branch) -> concat -> conv -> global pool -> Linear."""

    def __init__(self, in_channels: int = 1, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv(in_channels, width, 3)
        self.branch3 = _conv(width, width, 3)
        self.branch1 = _conv(width, width // 2, 1)
        self.mix = _conv(width + width // 2, 2 * width, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([self.branch3(x), self.branch1(x)], dim=1)
        x = self.mix(x)
        return self.classifier(torch.flatten(self.pool(x), 1))


def cnn(in_channels: int = 1, width: int = 16, num_classes: int = 10) -> nn.Module:
    """The model function a config names: ``_target_: my_models.cnn``."""
    return TwoBranchCNN(in_channels, width, num_classes)
