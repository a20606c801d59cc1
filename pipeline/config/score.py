"""score: which per-sample scores to compute (the methods: pipeline.methods.SCORES)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pipeline.methods import SCORE_METHODS

from .base import DEVICE, Section


class LabelIssuesConfig(Section):
    """label_issues: `folds` models of the proxy's kind, each trained on the other folds (stratified,
    seeded), give every sample probabilities from a model that never saw it (score/oof_probs.npy)."""

    folds: int = Field(5, ge=2)
    epochs: int | None = Field(None, ge=1)  # null: enough for 500 optimiser steps per fold model, at least 2
    arch: Literal["auto", "small_cnn", "resnet18", "mlp"] = "auto"  # auto: as embed's proxy (small_cnn below 32 px)
    width: int | None = Field(None, ge=4)  # default: the arch's (small_cnn 32)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.05, gt=0)


class ScoreConfig(Section):
    methods: list[Literal[SCORE_METHODS]] = Field(default_factory=list)
    el2n_epoch: int = Field(2, ge=1)  # 1-based proxy epoch for el2n / grand (clipped to the last)
    knn_k: int = Field(10, ge=1)
    prototype_clusters: int | None = Field(None, ge=1)  # default: number of classes
    prototype_per_class: bool = False
    influence_damping: float = Field(0.01, gt=0)
    label_issues: LabelIssuesConfig = Field(default_factory=LabelIssuesConfig)
    device: DEVICE = "auto"

    @field_validator("methods")
    @classmethod
    def _unique(cls, v):
        if len(set(v)) != len(v):
            raise ValueError("a score method is listed twice")
        return v
