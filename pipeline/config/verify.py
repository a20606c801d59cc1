"""verify: the training protocol every set gets, and the online methods it trains beside them
(the online methods' facts: pipeline.methods.ONLINE)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictFloat, field_validator, model_validator

from pipeline.methods import ONLINE, ONLINE_METHODS

from .base import DEVICE, Section, check_fraction, check_names, expand_budgets
from .clip import ClipConfig


class OnlineSpec(Section):
    """Selection during training, run inside verify's trainer (stages.learn.online).

    `budget` is the fraction of the training set backpropagated per epoch (a list
    expands like select's). craig / gradmatch are the adaptive variants: full-data warm
    start, then re-selection every `every` epochs from the current model's gradients.
    """

    method: Literal[ONLINE_METHODS]
    budget: StrictFloat
    name: str | None = None
    kappa: float = Field(0.5, ge=0, le=1)  # craig / gradmatch: warm start (see stages.learn.online.adaptive)
    every: int = Field(5, ge=1)  # craig / gradmatch: epochs between re-selections

    _fraction = field_validator("budget")(classmethod(lambda cls, v: check_fraction(v)))

    @property
    def label(self) -> str:
        """The method as the report names it: `adaptive-craig`, `crest`, ..."""
        return ONLINE[self.method].label_prefix + self.method

    @property
    def sel_name(self) -> str:
        return self.name or f"{self.label}-{self.budget}"


DEFAULT_EPOCHS = 20  # the fixed-epochs protocol's default (the DD ConvNet recipe's)


class VerifyConfig(Section):
    """The fixed training protocol every training set gets (defaults: the DD ConvNet recipe).

    Exactly one of two budgets governs: `epochs` (fixed epochs, the default: a subset of 10%
    gets a tenth of full data's optimiser steps) or `steps` (equal steps: every set, full data,
    subsets, distilled sets, gets exactly `steps` optimiser steps, epochs derived per set, the
    schedule and `milestones` counted in steps; the fair comparison when subsets are small).
    """

    recipe: Literal["convnet3", "resnet18", "mlp", "small_cnn", "clip"] = "convnet3"
    epochs: int | None = Field(None, ge=1)  # fixed epochs: 20 unless `steps` is set (then None)
    steps: int | None = Field(None, ge=1)  # set: the equal-steps protocol (epochs and ipc_epochs unused)
    seeds: int = Field(3, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["step", "cosine"] = "step"
    milestones: list[int] | None = None  # step: epochs (steps under `steps`) where lr x gamma (default: half-way)
    gamma: float = Field(0.1, gt=0, le=1)
    augment: Literal["none", "crop_flip"] = "none"
    bf16: bool = True  # CUDA only
    channels_last: bool = True  # CUDA only
    width: int | None = Field(None, ge=4)  # default: the recipe's own
    image_size: int | None = Field(None, ge=4)
    random_baseline: bool = True
    # distilled sets and their random-ipc baselines: a few images per class need many more
    # epochs than a real subset (the DD protocol); lr x gamma half-way through
    ipc_epochs: int = Field(300, ge=1)
    online: list[OnlineSpec] = Field(default_factory=list)
    # recipe clip: the CLIP every image-caption set trains (zero-shot accuracy with class-name
    # prompts is the reported accuracy; a linear probe on its image features beside it)
    clip: ClipConfig = Field(default_factory=ClipConfig)
    prompts: list[str] = Field(default_factory=lambda: ["a photo of a {}"], min_length=1)  # {} = a class name
    device: DEVICE = "auto"

    @field_validator("prompts")
    @classmethod
    def _slot(cls, v):
        for p in v:
            try:
                ok = p.count("{}") == 1 and p.format("A") != p.format("B")
            except (KeyError, IndexError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"prompt {p!r} needs exactly one {{}} for the class name (and no other braces)")
        return v

    @field_validator("online", mode="before")
    @classmethod
    def _expand(cls, v):
        return expand_budgets(v)

    @property
    def protocol(self) -> str:
        """`steps` (equal steps) or `epochs` (fixed epochs): which budget governs every training."""
        return "steps" if self.steps is not None else "epochs"

    @model_validator(mode="after")
    def _check(self):
        if self.steps is None and self.epochs is None:
            self.epochs = DEFAULT_EPOCHS
        if self.steps is not None:
            if self.epochs is not None:
                raise ValueError("verify.epochs and verify.steps are both set: exactly one governs the training "
                                 "(steps: every set gets that many optimiser steps; drop one)")
            if self.recipe == "clip":
                raise ValueError("verify.steps trains classifiers; recipe clip trains for verify.clip.epochs "
                                 "(drop verify.steps)")
        length, unit = (self.steps, "steps") if self.steps is not None else (self.epochs, "epochs")
        for m in self.milestones or []:
            if not 0 < m < length:
                raise ValueError(f"milestone {m} is outside the training (1..{length - 1} {unit})")
        if self.recipe == "clip" and self.online:
            raise ValueError("online selection trains classifiers; recipe clip trains a CLIP on pairs (drop verify.online)")
        check_names("online", [s.sel_name for s in self.online])
        return self
