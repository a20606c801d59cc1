"""The small CLIP that embed (proxy_clip) and verify (recipe clip) train."""

from __future__ import annotations

from pydantic import Field

from .base import Section


class ClipConfig(Section):
    """A small open_clip CLIP trained from scratch (stages.learn.clip): the proxy that embeds image-caption
    pairs (embed.method proxy_clip) and the model verify trains on each set (verify.recipe clip).
    Defaults: the issue's calibration recipe (ViT 4 x 192, patch 4; text 3 x 128, context 16;
    embed 128; AdamW lr 1e-3 one-cycle, 15 epochs, batch 512, bf16 on CUDA)."""

    embed_dim: int = Field(128, ge=8)
    vision_layers: int = Field(4, ge=1)
    vision_width: int = Field(192, ge=16)
    patch: int = Field(4, ge=1)
    text_layers: int = Field(3, ge=1)
    text_width: int = Field(128, ge=16)
    context: int = Field(16, ge=4)
    epochs: int = Field(15, ge=1)
    batch_size: int = Field(512, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    bf16: bool = True  # CUDA only
