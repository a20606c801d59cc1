"""score: which per-sample scores to compute (the methods: pipeline.methods.SCORES)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pipeline.methods import SCORE_METHODS

from .base import DEVICE, Section


class ScoreConfig(Section):
    methods: list[Literal[SCORE_METHODS]] = Field(default_factory=list)
    el2n_epoch: int = Field(2, ge=1)  # 1-based proxy epoch for el2n / grand (clipped to the last)
    knn_k: int = Field(10, ge=1)
    prototype_clusters: int | None = Field(None, ge=1)  # default: number of classes
    prototype_per_class: bool = False
    influence_damping: float = Field(0.01, gt=0)
    device: DEVICE = "auto"

    @field_validator("methods")
    @classmethod
    def _unique(cls, v):
        if len(set(v)) != len(v):
            raise ValueError("a score method is listed twice")
        return v
