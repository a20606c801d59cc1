"""distill: synthetic sets (one spec class per method) and the expert trajectories mtt matches."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Union

from pydantic import Field, StrictInt, field_validator, model_validator

from pipeline.methods import DSA_DEFAULT, DSA_KINDS

from .base import DEVICE, Section, expand_budgets, method_names


def check_dsa(v: str) -> str:
    """The kinds of stages.learn.augment joined by _, or none (not imported here: it needs torch)."""
    bad = [k for k in v.lower().split("_") if k and k not in DSA_KINDS + ("none",)]
    if bad:
        raise ValueError(f"unknown DSA kind(s) {bad}; known: {list(DSA_KINDS)} joined by _, or none")
    return v


class ExpertsConfig(Section):
    """The expert trajectories every mtt spec of the run matches (trained once, shared)."""

    count: int = Field(5, ge=1)
    epochs: int = Field(20, ge=1)
    lr: float = Field(0.01, gt=0)
    batch_size: int = Field(256, ge=1)
    arch: Literal["convnet3"] = "convnet3"
    width: int = Field(128, ge=4)
    dsa: str = DSA_DEFAULT  # augmentation of the experts' batches (kinds joined by _, or none)
    device: DEVICE = "auto"

    _kinds = field_validator("dsa")(classmethod(lambda cls, v: check_dsa(v)))


class DistillSpec(Section):
    needs: ClassVar[frozenset[str]] = frozenset()  # what the method reads (pipeline.methods.NEEDS)

    method: str
    ipc: StrictInt = Field(ge=1)
    name: str | None = None
    iterations: int = Field(1000, ge=1)
    lr_img: float = Field(1.0, gt=0)
    dsa: str = DSA_DEFAULT  # DSA kinds joined by _, or none; verify trains the set with them too
    device: DEVICE = "auto"

    _kinds = field_validator("dsa")(classmethod(lambda cls, v: check_dsa(v)))

    @property
    def sel_name(self) -> str:
        return self.name or f"{self.method}-ipc{self.ipc}"

    def params(self) -> dict:
        return self.model_dump(exclude={"name", "device"})


class MttSpec(DistillSpec):
    needs = frozenset({"experts"})  # the run's expert trajectories
    method: Literal["mtt"]
    syn_steps: int = Field(20, ge=1)
    expert_epochs: int = Field(2, ge=1)
    max_start_epoch: int = Field(10, ge=1)
    lr_img: float = Field(100.0, gt=0)
    lr_lr: float = Field(1e-5, gt=0)
    lr_init: float = Field(0.01, gt=0)
    batch_syn: int | None = Field(None, ge=1)  # None: every synthetic image in each student step
    zca: bool = False


class DmSpec(DistillSpec):
    method: Literal["dm"]
    batch_real: int = Field(256, ge=1)
    width: int = Field(128, ge=4)  # of the randomly initialised convnet3 embedders


DISTILL_TYPES = (MttSpec, DmSpec)
DISTILL_METHODS = method_names(DISTILL_TYPES)
AnyDistill = Annotated[Union[DISTILL_TYPES], Field(discriminator="method")]


class DistillConfig(Section):
    """Synthetic sets (`specs`, default none) and the experts that mtt specs share."""

    specs: list[AnyDistill] = Field(default_factory=list)
    experts: ExpertsConfig = Field(default_factory=ExpertsConfig)

    @field_validator("specs", mode="before")
    @classmethod
    def _expand(cls, v):
        return expand_budgets(v, "ipc")

    @model_validator(mode="after")
    def _check(self):
        for i, s in enumerate(self.specs):
            if "experts" in s.needs and s.max_start_epoch + s.expert_epochs > self.experts.epochs:
                raise ValueError(f"specs.{i}: max_start_epoch {s.max_start_epoch} + expert_epochs {s.expert_epochs} "
                                 f"exceeds experts.epochs {self.experts.epochs}")
        zcas = {s.zca for s in self.specs if "experts" in s.needs}
        if len(zcas) > 1:
            raise ValueError("mtt specs disagree on zca, but share one set of experts (trained on whitened "
                             "images or not): use one zca setting")
        return self

    @property
    def has_mtt(self) -> bool:
        """Some spec matches the experts' trajectories (so the run trains them)."""
        return any("experts" in s.needs for s in self.specs)

    @property
    def zca(self) -> bool:
        return any(getattr(s, "zca", False) for s in self.specs)
