"""embed: the proxy network, open_clip, the CLIP trained on image-caption pairs, or
embeddings the user already has (`precomputed`: stages.embed.precomputed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import DEVICE, Section
from .clip import ClipConfig


class EmbedConfig(Section):
    method: Literal["proxy", "open_clip", "proxy_clip", "precomputed"] = "proxy"
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
    # precomputed only: image embeddings at `path`, a .npy whose rows `keys` names (a Parquet file
    # with a `key` or `uid` column, row for row), or Parquet (a file, a folder of *.parquet or a
    # glob) with a `key` or `uid` column and a float list column (`column`, default: the one
    # named `embedding`, else the only float list column); captions' at `text_path`, likewise
    # (a .npy there is named by the same `keys`). Relative paths: to the config file's folder.
    path: str | None = None
    keys: str | None = None
    text_path: str | None = None
    column: str | None = None
    text_column: str | None = None

    @field_validator("path", "keys", "text_path")
    @classmethod
    def _local(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if "://" in v:
            raise ValueError(f"{v!r}: precomputed embeddings are read from local files, not URLs")
        return os.path.abspath(os.path.expanduser(v))  # a dict config's relative path: to the current folder

    @model_validator(mode="after")
    def _precomputed(self):
        given = [f for f in PRECOMPUTED_FIELDS if getattr(self, f) is not None]
        if self.method != "precomputed":
            if given:
                raise ValueError(f"{given[0]} is read only by method precomputed (method is {self.method})")
            return self
        if self.path is None:
            raise ValueError("method precomputed needs path (a .npy with keys, or Parquet with a key column)")
        npy = [f for f in ("path", "text_path") if (getattr(self, f) or "").endswith(".npy")]
        if npy and self.keys is None:
            raise ValueError(f"{npy[0]} is a .npy: set keys (a Parquet file whose `key` column names its rows)")
        if self.keys is not None and not npy:
            raise ValueError("keys names the rows of a .npy path; Parquet embeddings carry their own keys")
        if self.text_column is not None and self.text_path is None:
            raise ValueError("text_column needs text_path (which may be the same file as path)")
        return self


PRECOMPUTED_FIELDS = ("path", "keys", "text_path", "column", "text_column")


def resolve_paths(raw: dict, base: Path) -> None:
    """In place: a config file's relative embed paths, made relative to its folder `base` (as `run:`)."""
    embed = raw.get("embed")
    if not isinstance(embed, dict):
        return
    for f in ("path", "keys", "text_path"):
        v = embed.get(f)
        if isinstance(v, str) and "://" not in v and not os.path.isabs(os.path.expanduser(v)):
            embed[f] = os.path.normpath(base / v)
