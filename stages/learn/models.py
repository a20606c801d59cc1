"""Small networks used as the proxy embedder and as verification recipes."""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

import torch
from torch import nn

M = TypeVar("M")
_INIT_LOCK = threading.Lock()


def seeded_init(seed: int, factory: Callable[[], M]) -> M:
    """`factory()` (a network's construction) with torch's global RNG seeded to `seed`.

    nn.Module initialisers draw from the global RNG, and a local flow runs units in threads of
    one process: two units seeding and building at once would take each other's draws (the
    same seed, different weights). The lock makes seed-and-build one step, and fork_rng leaves
    the global RNG as it was for whoever else uses it.
    """
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


class BodyHead(nn.Module):
    """A network as `body` (inputs -> penultimate features) and a linear `head` (features ->
    logits): `features(x)` is what the proxy embeds and the gradient features are built on."""

    body: nn.Module
    head: nn.Linear

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class SmallCNN(BodyHead):
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


class ResNet18(BodyHead):
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


class ConvNet3(BodyHead):
    """The dataset-distillation ConvNet: 3 x (conv 3x3, instance norm, ReLU, avg-pool 2), linear head.

    Instance norm (GroupNorm with one group per channel) has no batch statistics, so a
    weighted subset trains like its samples repeated and a tiny synthetic set trains
    like a big one. `features(x)` is the flattened last block (128 x 3 x 3 at 28 px).
    """

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, width: int = 128, depth: int = 3):
        super().__init__()
        c, h, w = in_shape
        layers = []
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(width, width, affine=True),
                       nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            c, h, w = width, h // 2, w // 2
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(width * h * w, num_classes)


class MLP(BodyHead):
    """Two hidden ReLU layers on flattened inputs: for embedding vectors (or tiny images)."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, width: int = 256):
        super().__init__()
        d = int(torch.tensor(in_shape).prod())
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(d, width), nn.ReLU(inplace=True),
                                  nn.Linear(width, width), nn.ReLU(inplace=True))
        self.head = nn.Linear(width, num_classes)


RECIPES = {"small_cnn": SmallCNN, "resnet18": ResNet18, "convnet3": ConvNet3, "mlp": MLP}
DEFAULT_WIDTH = {"small_cnn": 32, "resnet18": 64, "convnet3": 128, "mlp": 256}


def proxy_arch(arch: str, image_hw: int) -> str:
    """`auto`: the small ConvNet below 32 px, ResNet-18 from 32 px up."""
    if arch != "auto":
        return arch
    return "resnet18" if image_hw >= 32 else "small_cnn"


def build_model(recipe: str, in_shape: tuple[int, ...], num_classes: int, width: int | None = None) -> nn.Module:
    """A recipe's network for inputs of shape `in_shape` ([C, H, W] images or [D] features)."""
    width = width or DEFAULT_WIDTH[recipe]
    if recipe in ("small_cnn", "resnet18"):
        return RECIPES[recipe](in_shape[0], num_classes, width=width)
    return RECIPES[recipe](tuple(in_shape), num_classes, width=width)
