"""select: one spec class per selection method, each stating what the method needs and yields.

`needs` names the upstream data a method reads (pipeline.methods.NEEDS: the select unit's
upstream units follow from it) and `weights` whether it yields coreset weights. Every list of
selection methods (SELECT_METHODS, CAPTION_METHODS, the select stage's dispatch) is derived
from SPEC_TYPES.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Union

from pydantic import Field, field_validator, model_validator

from pipeline.methods import SCORE_METHODS

from .base import DEVICE, Budget, Section, check_budget, method_names


class SelectSpec(Section):
    """One selection. Budget: a fraction of the training pool (index) or a count.

    `pool` names an earlier selection of the run whose selected rows are the candidates
    (e.g. craig after dedup); the budget still counts against the whole training pool, so
    that verify compares subsets of equal size.
    """

    needs: ClassVar[frozenset[str]] = frozenset()  # what the method reads (pipeline.methods.NEEDS)
    weights: ClassVar[bool] = False  # yields coreset weights (verify trains on sum(w * loss) / sum(w))

    method: str
    budget: Budget
    name: str | None = None
    pool: str | None = None

    _check = field_validator("budget")(classmethod(lambda cls, v: check_budget(v)))

    @property
    def sel_name(self) -> str:
        return self.name or f"{self.method}-{self.budget}"

    def params(self) -> dict:
        return self.model_dump(exclude={"name"})


class RandomSpec(SelectSpec):
    method: Literal["random"]


class StratifiedSpec(SelectSpec):
    needs = frozenset({"labels"})
    method: Literal["stratified"]


FEATURES = Literal["gradients", "bias_gradients", "embeddings"]  # last-layer grads, p - y, embed/embeddings.npy
# craig / gradmatch: per class where there are labels; gradients with the default `features`
GRADIENT_NEEDS = frozenset({"embeddings", "gradients"})


class GradientCoresetSpec(SelectSpec):
    """craig and gradmatch: weighted coresets whose gradient sum matches the pool's."""

    needs = GRADIENT_NEEDS
    weights = True
    features: FEATURES = "gradients"
    device: DEVICE = "auto"


Parts = Annotated[int, Field(ge=1, le=10000)]  # per-group methods: run as this many select_part units (stages.select)


class CraigSpec(GradientCoresetSpec):
    method: Literal["craig"]
    parts: Parts = 1
    metric: Literal["euclidean", "cosine"] = "euclidean"
    optimizer: Literal["lazy", "stochastic"] = "stochastic"
    eps: float = Field(0.01, gt=0, lt=1)  # stochastic greedy: (1 - 1/e - eps) in expectation
    graph: Literal["auto", "dense", "sparse"] = "auto"
    dense_max: int = Field(10000, ge=1)  # auto: a class larger than this gets the sparse k-NN graph
    knn: int = Field(32, ge=1)


class GradMatchSpec(GradientCoresetSpec):
    method: Literal["gradmatch"]
    parts: Parts = 1  # per: class only (batches span the classes)
    per: Literal["class", "batch"] = "class"
    batch_size: int = Field(32, ge=1)  # per: batch
    lam: float = Field(0.05, ge=0)  # ridge on the weights, for gradients scaled to unit mean norm
    tol: float = Field(1e-5, gt=0)  # stop when ||residual|| / ||target|| <= tol (small: OMP usually fills the budget)

    @model_validator(mode="after")
    def _parts_per_class(self):
        if self.parts > 1 and self.per == "batch":
            raise ValueError("gradmatch runs in parts per class only (per: class); per: batch mixes the classes")
        return self


class DifficultySpec(SelectSpec):
    needs = frozenset({"scores"})
    method: Literal["difficulty"]
    score: Literal[SCORE_METHODS]
    keep: Literal["hard", "easy", "auto"] = "hard"
    class_balanced: bool = False
    auto_threshold: float = Field(0.3, gt=0, le=1)  # auto: keep hard from this kept fraction up


class CcsSpec(SelectSpec):
    needs = frozenset({"scores"})
    method: Literal["ccs"]
    score: Literal[SCORE_METHODS]
    beta: float = Field(0.1, ge=0, lt=1)  # hardest fraction pruned first
    bins: int = Field(50, ge=1)


class _DedupNeeds:
    """DedupSpec.needs: nothing upstream for content features (the index's images), the embed
    unit's embeddings for `features: embeddings`. On the class: the default's (content)."""

    def __get__(self, spec, cls):
        return frozenset({"embeddings"}) if spec is not None and spec.features == "embeddings" else frozenset()


DEDUP_EPS = {"content": 0.002, "embeddings": 0.05}  # default eps per feature space


class DedupSpec(SelectSpec):
    """Drop near-duplicates: every sample whose similarity to an already kept one exceeds 1 - eps.

    features: `content` (default) compares the pixels (stages.kernels.content: centre thumbnails,
    one-pixel shifts), with no model, keeping the first occurrence; `embeddings` runs SemDeDup on
    the embed unit's embeddings (proxy, open_clip or precomputed). A dedup that would remove more
    than `max_removed` of its pool stops with the share and the similarity quantiles.
    """

    needs = _DedupNeeds()
    method: Literal["dedup"]
    budget: None = None  # keeps whatever is not a near-duplicate
    features: Literal["content", "embeddings"] = "content"
    eps: float | None = Field(None, gt=0, lt=2)  # drop when similarity to a kept sample > 1 - eps; default per features
    max_removed: float = Field(0.2, gt=0, le=1)  # stop instead of removing more than this share of the pool
    clusters: int | None = Field(None, ge=1)  # embeddings: k-means clusters; default N // 1000
    center: bool = True  # embeddings: subtract the mean embedding before cosine (see stages.kernels.coresets.dedup)
    device: DEVICE = "auto"

    @field_validator("budget", mode="before")
    @classmethod
    def _check(cls, v):  # replaces SelectSpec's budget check
        if v is not None:
            raise ValueError("dedup takes no budget: eps decides what it keeps (set a budget on a selection whose pool is this one)")
        return v

    @model_validator(mode="after")
    def _per_features(self):
        if self.features == "content":  # a saved config repeats the defaults: only other values are refused
            extra = [k for k, default in (("clusters", None), ("center", True)) if getattr(self, k) != default]
            if extra:
                raise ValueError(f"{' and '.join(extra)} {'applies' if len(extra) == 1 else 'apply'} to features: embeddings, not content")
        if self.eps is None:
            self.eps = DEDUP_EPS[self.features]
        return self

    @property
    def sel_name(self) -> str:
        what = "" if self.features == "content" else f"{self.features}-"
        return self.name or f"dedup-{what}eps{self.eps}"


class CleanSpec(SelectSpec):
    """Drop suspected label issues: with `score: label_issues` and no `fraction`, the samples
    confident learning flagged; otherwise the worst `fraction` of the candidates by `score`
    (the highest, or the lowest of a value score such as knn_shapley). No budget: it keeps what
    is left, named `clean-<score>[-<fraction>]`, its `budget` column holds the kept fraction.
    Flagged samples are a model's verdict: more than `max_removed` of the pool stops the selection
    (an undertrained fold model flags most of a dataset) unless the limit is raised."""

    needs = frozenset({"scores"})
    method: Literal["clean"]
    budget: None = None
    score: Literal[SCORE_METHODS]
    fraction: float | None = Field(None, gt=0, lt=1)  # share of the candidates (the pool) to drop
    max_removed: float = Field(0.2, gt=0, le=1)  # flagged mode: stop instead of dropping more than this share

    @field_validator("budget", mode="before")
    @classmethod
    def _check(cls, v):  # replaces SelectSpec's budget check
        if v is not None:
            raise ValueError("clean takes no budget: it drops the flagged samples, or `fraction` of them by score "
                             "(set a budget on a selection whose pool is this one)")
        return v

    @model_validator(mode="after")
    def _fraction(self):
        if self.fraction is None and self.score != "label_issues":
            raise ValueError(f"clean by score {self.score} needs a fraction to drop (only label_issues flags "
                             "samples itself), e.g. fraction: 0.1")
        return self

    @property
    def sel_name(self) -> str:
        return self.name or f"clean-{self.score}" + (f"-{self.fraction}" if self.fraction is not None else "")


GROUPS = Literal["kmeans", "labels"]  # pseudo-classes of image-caption data: k-means on embeddings, or labels


class ClipCovSpec(SelectSpec):
    """Per pseudo-class greedy that keeps the subset's image-caption cross-covariance close to
    the full data's, minus a redundancy penalty (stages.kernels.coresets.clipcov)."""

    needs = frozenset({"embeddings", "captions"})
    method: Literal["clipcov"]
    parts: Parts = 1
    groups: GROUPS = "kmeans"
    clusters: int | None = Field(None, ge=1)  # kmeans; None: max(10, N // 10,000) (stages/select/pool.py)
    lam: float = Field(1.0, ge=0)  # weight of the redundancy term
    gate: float | None = Field(3.0, ge=0)  # misaligned: CLIP score this many robust stds below the group's median
    pool_factor: float | None = Field(1.5, ge=1)  # picks come from the ceil(pool_factor * k) best-scored pairs first
    device: DEVICE = "auto"


class ClipScoreSpec(SelectSpec):
    """DataComp-style filter: the top `budget` pairs by image-caption cosine, or (budget: null)
    every pair at or above `threshold`."""

    needs = frozenset({"embeddings", "captions"})
    method: Literal["clipscore"]
    budget: Budget | None = None
    threshold: float | None = Field(None, ge=-1, le=1)

    @field_validator("budget", mode="before")
    @classmethod
    def _check(cls, v):  # replaces SelectSpec's check: a budget or a threshold
        return None if v is None else check_budget(v)

    @model_validator(mode="after")
    def _one(self):
        if (self.budget is None) == (self.threshold is None):
            raise ValueError("clipscore takes a budget or a threshold, not both and not neither")
        return self

    @property
    def sel_name(self) -> str:
        return self.name or (f"clipscore-{self.budget}" if self.budget is not None else f"clipscore-t{self.threshold}")


class SasSpec(SelectSpec):
    """SAS: per pseudo-class facility location on the images' mean embedding over augmented
    views (embed/image_views.npy from proxy_clip; the plain image embeddings otherwise)."""

    needs = frozenset({"embeddings", "image_views"})  # image views only: no captions
    method: Literal["sas"]
    parts: Parts = 1
    groups: GROUPS = "kmeans"
    clusters: int | None = Field(None, ge=1)  # kmeans; None: max(10, N // 10,000) (stages/select/pool.py)
    optimizer: Literal["lazy", "stochastic"] = "stochastic"
    eps: float = Field(0.01, gt=0, lt=1)
    device: DEVICE = "auto"


SPEC_TYPES = (RandomSpec, StratifiedSpec, CraigSpec, GradMatchSpec, DifficultySpec, CcsSpec, DedupSpec,
              ClipCovSpec, ClipScoreSpec, SasSpec, CleanSpec)
SELECT_SPECS: dict[str, type[SelectSpec]] = dict(zip(method_names(SPEC_TYPES), SPEC_TYPES))
SELECT_METHODS = tuple(SELECT_SPECS)
CAPTION_METHODS = frozenset(m for m, c in SELECT_SPECS.items() if "captions" in c.needs)
AnySpec = Annotated[Union[SPEC_TYPES], Field(discriminator="method")]
