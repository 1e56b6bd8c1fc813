"""Small built-in models.

The CNNs are ``nn.Sequential`` at the top level (stem, residual blocks, head). hpcprune uses that
shape to cache the activations entering a block during sensitivity analysis; any other model works
too, with a full forward per cell.
"""
from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BatchNorm, identity or 1x1 projection shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # the residual add couples conv2's, the shortcut's and the input's channels in one group
        return self.relu(out + self.shortcut(x))


class Head(nn.Module):
    def __init__(self, in_ch: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet(
    in_channels: int = 1,
    num_classes: int = 10,
    widths: tuple[int, ...] | list[int] = (16, 32),
    blocks: tuple[int, ...] | list[int] = (1, 1),
    stem_stride: int = 1,
) -> nn.Sequential:
    """A ResNet-style CNN: 3x3 stem conv, stages of basic blocks (stride 2 between stages), head.

    ``widths`` and ``blocks`` give each stage's channel count and block count.
    """
    if len(widths) != len(blocks) or not widths:
        raise ValueError(f"widths {list(widths)} and blocks {list(blocks)} must be non-empty and of equal length")
    layers: list[nn.Module] = [
        nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stem_stride, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=False),
        )
    ]
    in_ch = widths[0]
    for stage, (width, n) in enumerate(zip(widths, blocks)):
        for b in range(n):
            stride = 2 if (stage > 0 and b == 0) else 1
            layers.append(BasicBlock(in_ch, width, stride))
            in_ch = width
    layers.append(Head(in_ch, num_classes))
    return nn.Sequential(*layers)


class MLP(nn.Sequential):
    """A plain MLP on flattened inputs (hidden layers are prunable neuron groups)."""

    def __init__(self, in_features: int = 64, num_classes: int = 10, hidden: tuple[int, ...] | list[int] = (128, 64)) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        layers.append(nn.Linear(prev, num_classes))
        super().__init__(*layers)
