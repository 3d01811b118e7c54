"""CIFAR ResNets (He et al., 2016) with parameter-free "option A" shortcuts.

The layout matches the widely used CIFAR ResNet checkpoints (e.g. the ResNet-20 in
``shared/teachers/resnet20-cifar10-optionA.th``) parameter for parameter, so their state
dicts load without any renaming once a ``module.`` prefix is stripped:

* ``conv1`` (3 -> 16, 3x3, no bias), ``bn1``, ReLU;
* ``layer1``, ``layer2``, ``layer3``: ``n`` :class:`BasicBlock` each, with 16, 32 and 64
  channels; the first block of ``layer2`` and ``layer3`` has stride 2;
* global average pooling and ``linear`` (64 -> ``num_classes``, with bias).

Depth is ``6n + 2``: :func:`resnet20` (n=3), :func:`resnet32` (n=5), :func:`resnet44` (n=7)
and :func:`resnet56` (n=9).

Every ReLU is applied functionally with :func:`torch.nn.functional.relu` (there are no
``nn.ReLU`` modules), as in the original code; the quantizer relies on finding these call
sites in a :func:`torch.fx.symbolic_trace` graph. The down-sampling shortcut is a small
module (:class:`PadShortcut`) rather than a lambda, so the whole network is fx-traceable.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "PadShortcut",
    "BasicBlock",
    "CifarResNet",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
]


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 spatially, zero-pad ``pad`` channels on each side.

    It has no parameters, so it adds nothing to the state dict.
    """

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = int(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.pad's tuple runs from the last dimension backwards: (W, W, H, H, C, C).
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection; ReLUs are functional."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            if stride != 2 or planes - in_planes != 2 * (planes // 4):
                raise ValueError(
                    "option-A shortcut supports stride 2 with planes == 2 * in_planes, got "
                    f"in_planes={in_planes}, planes={planes}, stride={stride}"
                )
            self.shortcut = PadShortcut(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


def _kaiming_init(module: nn.Module) -> None:
    """Kaiming-normal init for conv and linear weights (as in the original code)."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight)


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth ``6 * blocks_per_stage + 2`` for 3x32x32 inputs."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self._in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, blocks_per_stage, stride=1)
        self.layer2 = self._make_layer(32, blocks_per_stage, stride=2)
        self.layer3 = self._make_layer(64, blocks_per_stage, stride=2)
        self.linear = nn.Linear(64, num_classes)
        self.apply(_kaiming_init)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for block_stride in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self._in_planes, planes, block_stride))
            self._in_planes = planes * BasicBlock.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = F.adaptive_avg_pool2d(out, 1)
        out = torch.flatten(out, 1)
        return self.linear(out)


def resnet20(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 for CIFAR (0.27 M parameters with 10 classes)."""
    return CifarResNet(3, num_classes=num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    """ResNet-32 for CIFAR (0.46 M parameters with 10 classes)."""
    return CifarResNet(5, num_classes=num_classes)


def resnet44(num_classes: int = 10) -> CifarResNet:
    """ResNet-44 for CIFAR (0.66 M parameters with 10 classes)."""
    return CifarResNet(7, num_classes=num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    """ResNet-56 for CIFAR (0.85 M parameters with 10 classes)."""
    return CifarResNet(9, num_classes=num_classes)
