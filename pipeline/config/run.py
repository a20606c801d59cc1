"""The whole run: one section per stage, and the rules that span sections."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field, field_validator, model_validator

from pipeline.errors import CurateError
from pipeline.methods import SCORES, VALIDATED_SCORES

from .base import Section, check_names, expand_budgets
from .distill import DistillConfig, DistillSpec
from .embed import EmbedConfig
from .flow import FlowConfig
from .index import IndexConfig
from .knn import KnnConfig
from .materialize import MaterializeConfig
from .score import ScoreConfig
from .select import AnySpec, SelectSpec
from .verify import VerifyConfig


@dataclass(frozen=True)
class VerifySet:
    """One training set verify compares, trained by its own unit `verify/<name>`.

    Random baselines: `random-ipc<k>` beside distilled sets of k images per class, and one
    random subset per budget of the run's selections and online methods (none where a
    `random` selection has that budget), named by the size as far as the config knows it:
    `random-n<k>` for a count k, `random-<fraction>` for a fraction (its size needs the pool),
    `random-<sel>` for a selection without a budget (dedup, a clipscore threshold: its size is
    what it kept). The report names every random subset of k samples `random-n<k>`.
    """

    name: str
    kind: str  # full | selection | online | distilled | random
    spec: object = None  # the SelectSpec, OnlineSpec or DistillSpec it trains on
    budget: int | float | None = None  # random: a count or a fraction of the pool
    ipc: int | None = None  # random: this many per class
    like: str | None = None  # random: as many samples as this selection holds


def random_baselines(cfg: "RunConfig") -> list[VerifySet]:
    if not cfg.verify.random_baseline:
        return []
    out = [VerifySet(f"random-ipc{k}", "random", ipc=k) for k in dict.fromkeys(d.ipc for d in cfg.distill.specs)]
    key = lambda b: (isinstance(b, int), b)  # noqa: E731  a count 1 is not the fraction 1.0
    seen = {key(s.budget) for s in cfg.select if s.method == "random"}  # the selection is the baseline
    for s in [*cfg.select, *cfg.verify.online]:
        if s.budget is None:
            out.append(VerifySet(f"random-{s.sel_name}", "random", like=s.sel_name))
        elif key(s.budget) not in seen:
            seen.add(key(s.budget))
            name = f"random-n{s.budget}" if isinstance(s.budget, int) else f"random-{s.budget}"
            out.append(VerifySet(name, "random", budget=s.budget))
    return out


class RunConfig(Section):
    run: str
    dataset: str
    seed: int = Field(0, ge=0, lt=2**32)  # numpy and torch generators take 0 .. 2**32 - 1
    index: IndexConfig = Field(default_factory=IndexConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    select: list[AnySpec] = Field(default_factory=list)
    materialize: MaterializeConfig = Field(default_factory=MaterializeConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    flow: FlowConfig = Field(default_factory=FlowConfig)
    knn: KnnConfig = Field(default_factory=KnnConfig)  # every neighbour search and k-means (stages.kernels.knn)

    @property
    def needs_validation(self) -> bool:
        return bool(VALIDATED_SCORES & set(self.score.methods))

    @property
    def uses_captions(self) -> bool:
        """An image-text run: captions are embedded, scored, selected on or trained on, so the
        index requires one per sample (missing / empty ones are bad input, raised or skipped)."""
        return (self.embed.method == "proxy_clip" or self.verify.recipe == "clip"
                or any("captions" in SCORES[m].needs for m in self.score.methods)
                or any("captions" in s.needs for s in self.select))

    @field_validator("select", mode="before")
    @classmethod
    def _expand(cls, v):
        return expand_budgets(v)

    @field_validator("distill", mode="before")
    @classmethod
    def _distill_list(cls, v):
        return {"specs": v} if isinstance(v, list) else v  # `distill: [spec, ...]` means the specs alone

    @model_validator(mode="after")
    def _unique_names(self):
        names = [s.sel_name for s in self.select]
        clash = sorted(set(names) & {s.sel_name for s in self.verify.online})
        if clash:
            raise ValueError(f"verify.online name {clash[0]!r} is also a selection's name (set 'name' on one)")
        dnames = [s.sel_name for s in self.distill.specs]
        clash = sorted(set(dnames) & (set(names) | {s.sel_name for s in self.verify.online}))
        if clash:
            raise ValueError(f"distill name {clash[0]!r} is also a selection's or an online method's name "
                             "(set 'name' on one)")
        check_names("distill", dnames)
        check_names("selection", names)
        sets = [s.name for s in self.verify_sets()]
        clash = sorted({n for n in sets if sets.count(n) > 1})
        if clash:
            raise ValueError(f"{clash[0]!r} names two of verify's training sets (the full data, a random baseline "
                             "and a selection, online method or distilled set): set 'name' on yours")
        weighted = [s.sel_name for s in self.select if s.weights]
        if self.verify.recipe == "clip" and weighted:
            raise ValueError(f"selection {weighted[0]!r} has coreset weights, which verify.recipe clip does not "
                             "apply (contrastive batches): use an unweighted method or a classifier recipe")
        if self.verify.recipe == "clip" and self.distill.specs:
            raise ValueError("distilled sets are images without captions: verify.recipe clip cannot train on them")
        for i, spec in enumerate(self.select):
            if spec.pool is not None and spec.pool not in names[:i]:
                raise ValueError(f"select.{i}.pool: '{spec.pool}' is not an earlier selection of this run "
                                 f"(earlier: {', '.join(names[:i]) or 'none'})")
            score = getattr(spec, "score", None)
            if score is not None and score not in self.score.methods:
                raise ValueError(f"select.{i}.score: '{score}' is not computed; add it to score.methods")
        return self

    def verify_sets(self) -> list[VerifySet]:
        """verify's training sets in report order: full data, selections, online methods,
        distilled sets, then the random baselines."""
        return ([VerifySet("full", "full")] + [VerifySet(s.sel_name, "selection", s) for s in self.select]
                + [VerifySet(o.sel_name, "online", o) for o in self.verify.online]
                + [VerifySet(d.sel_name, "distilled", d) for d in self.distill.specs] + random_baselines(self))

    def verify_set(self, name: str) -> VerifySet:
        for s in self.verify_sets():
            if s.name == name:
                return s
        have = ", ".join(s.name for s in self.verify_sets())
        raise CurateError(f"config: verify has no training set named '{name}' (one unit per set: {have})")

    def selection(self, name: str) -> SelectSpec:
        for s in self.select:
            if s.sel_name == name:
                return s
        raise CurateError(f"config: no selection named '{name}' (have: {', '.join(s.sel_name for s in self.select)})")

    def distilled(self, name: str) -> DistillSpec:
        for s in self.distill.specs:
            if s.sel_name == name:
                return s
        have = ", ".join(s.sel_name for s in self.distill.specs) or "none"
        raise CurateError(f"config: no distill spec named '{name}' (have: {have})")
