"""embed: the proxy network, open_clip, or the CLIP trained on image-caption pairs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import DEVICE, Section
from .clip import ClipConfig


class EmbedConfig(Section):
    method: Literal["proxy", "open_clip", "proxy_clip"] = "proxy"
    epochs: int = Field(3, ge=1)
    seeds: int = Field(1, ge=1)  # proxy runs; training-dynamics scores average over them
    arch: Literal["auto", "small_cnn", "resnet18"] = "auto"  # auto: small_cnn below 32 px, else resnet18
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.05, gt=0)
    width: int = Field(32, ge=4)
    image_size: int | None = Field(None, ge=4)
    device: DEVICE = "auto"
    # open_clip only
    model: str = "ViT-B-32"
    pretrained: str | None = None  # an open_clip tag, a local checkpoint path, or None (random weights)
    num_workers: int = Field(2, ge=0)
    shard_groups: int = Field(1, ge=1)  # >1: embed_part units the flow maps over workers
    # proxy_clip only: the CLIP trained on the pairs, and how many augmented views SAS averages
    clip: ClipConfig = Field(default_factory=ClipConfig)
    views: int = Field(4, ge=1)
