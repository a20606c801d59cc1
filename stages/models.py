"""Small networks used as the proxy embedder and as verification recipes."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two conv blocks (conv-BN-ReLU-pool), global average pool, a hidden layer, a head.

    `features(x)` is the penultimate (hidden) activation: the proxy embedding.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, feature_dim: int = 128):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(2 * w, feature_dim), nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class ResNet18(nn.Module):
    """torchvision's ResNet-18 in the CIFAR variant (3x3 stem, no max-pool) for 32 px and up.

    `features(x)` is the 512-d globally pooled activation.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 64):
        super().__init__()
        from torchvision.models import resnet18

        net = resnet18(num_classes=num_classes)
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        self.head = net.fc
        net.fc = nn.Identity()
        self.body = net

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


RECIPES = {"small_cnn": SmallCNN, "resnet18": ResNet18}


def proxy_arch(arch: str, image_hw: int) -> str:
    """`auto`: the small ConvNet below 32 px, ResNet-18 from 32 px up."""
    if arch != "auto":
        return arch
    return "resnet18" if image_hw >= 32 else "small_cnn"


def build_model(recipe: str, in_channels: int, num_classes: int, width: int = 32) -> nn.Module:
    return RECIPES[recipe](in_channels, num_classes, width=width)
