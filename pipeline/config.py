"""Run configuration: one YAML per run, validated; `--set a.b=v` overrides (v parsed as YAML).

Unknown keys are errors. `select` is one spec or a list; a list of budgets expands into
one spec per budget, each named `<method>-<budget>` unless it sets `name`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError, field_validator, model_validator

from .errors import CurateError

DEVICE = str  # "auto" | "cpu" | "cuda" | "cuda:1" ...


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def expand_budgets(v, key: str = "budget"):
    """One spec or a list; a spec whose `key` (budget, ipc) is a list becomes one spec per value."""
    specs = v if isinstance(v, list) else [v]
    out = []
    for spec in specs:
        if isinstance(spec, dict) and isinstance(spec.get(key), list):
            if spec.get("name"):
                raise ValueError(f"a spec with a list of {'budgets' if key == 'budget' else key} cannot set one 'name'")
            out += [{**spec, key: b} for b in spec[key]]
        else:
            out.append(spec)
    return out


class IndexConfig(Section):
    on_error: Literal["raise", "skip"] = "raise"
    # held out of train when a validated score needs it and the catalog has no `val` split
    val_fraction: float = Field(0.1, gt=0, lt=1)
    # hostile input: a member larger than this is never read (64 MiB = pipeline.shards.MAX_MEMBER_BYTES),
    # an image whose header declares more pixels is never decoded (2**25: 8K UHD fits; PIL warns at 89M)
    max_member_bytes: int = Field(67_108_864, ge=1)
    max_pixels: int = Field(33_554_432, ge=1)


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


Budget = StrictInt | StrictFloat


def check_budget(budget: Budget) -> Budget:
    """Range checks that need no dataset: 0 < fraction <= 1, count >= 1."""
    if isinstance(budget, bool):
        raise ValueError("budget must be a fraction in (0, 1] or a positive count")
    if isinstance(budget, float):
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget {budget} is out of range: a fraction must be in (0, 1] (an integer is a count)")
    elif budget < 1:
        raise ValueError(f"budget {budget} selects nothing: a count must be >= 1")
    return budget


SCORE_METHODS = ("el2n", "grand", "forgetting", "loss", "margin", "knn_shapley", "prototype", "influence", "clip")
VALUE_SCORES = frozenset({"knn_shapley", "influence", "clip"})  # higher = more valuable, not harder
VALIDATED_SCORES = frozenset({"knn_shapley", "influence"})


class SelectSpec(Section):
    """One selection. Budget: a fraction of the training pool (index) or a count.

    `pool` names an earlier selection of the run whose selected rows are the candidates
    (e.g. craig after dedup); the budget still counts against the whole training pool, so
    that verify compares subsets of equal size.
    """

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
    method: Literal["stratified"]


FEATURES = Literal["gradients", "bias_gradients", "embeddings"]  # last-layer grads, p - y, embed/embeddings.npy


class CraigSpec(SelectSpec):
    method: Literal["craig"]
    features: FEATURES = "gradients"
    metric: Literal["euclidean", "cosine"] = "euclidean"
    optimizer: Literal["lazy", "stochastic"] = "stochastic"
    eps: float = Field(0.01, gt=0, lt=1)  # stochastic greedy: (1 - 1/e - eps) in expectation
    graph: Literal["auto", "dense", "sparse"] = "auto"
    dense_max: int = Field(10000, ge=1)  # auto: a class larger than this gets the sparse k-NN graph
    knn: int = Field(32, ge=1)
    device: DEVICE = "auto"


class GradMatchSpec(SelectSpec):
    method: Literal["gradmatch"]
    features: FEATURES = "gradients"
    per: Literal["class", "batch"] = "class"
    batch_size: int = Field(32, ge=1)  # per: batch
    lam: float = Field(0.05, ge=0)  # ridge on the weights, for gradients scaled to unit mean norm
    tol: float = Field(1e-5, gt=0)  # stop when ||residual|| / ||target|| <= tol (small: OMP usually fills the budget)
    device: DEVICE = "auto"


class DifficultySpec(SelectSpec):
    method: Literal["difficulty"]
    score: Literal[SCORE_METHODS]
    keep: Literal["hard", "easy", "auto"] = "hard"
    class_balanced: bool = False
    auto_threshold: float = Field(0.3, gt=0, le=1)  # auto: keep hard from this kept fraction up


class CcsSpec(SelectSpec):
    method: Literal["ccs"]
    score: Literal[SCORE_METHODS]
    beta: float = Field(0.1, ge=0, lt=1)  # hardest fraction pruned first
    bins: int = Field(50, ge=1)


class DedupSpec(SelectSpec):
    method: Literal["dedup"]
    budget: None = None  # keeps whatever is not a near-duplicate
    eps: float = Field(0.05, gt=0, lt=2)  # drop when cosine similarity to a kept sample > 1 - eps
    clusters: int | None = Field(None, ge=1)  # k-means clusters; default N // 1000
    center: bool = True  # subtract the mean embedding before cosine (see stages.kernels.coresets.dedup)
    device: DEVICE = "auto"

    @field_validator("budget", mode="before")
    @classmethod
    def _check(cls, v):  # replaces SelectSpec's budget check
        if v is not None:
            raise ValueError("dedup takes no budget: eps decides what it keeps (set a budget on a selection whose pool is this one)")
        return v

    @property
    def sel_name(self) -> str:
        return self.name or f"dedup-eps{self.eps}"


GROUPS = Literal["kmeans", "labels"]  # pseudo-classes of image-caption data: k-means on embeddings, or labels


class ClipCovSpec(SelectSpec):
    """Per pseudo-class greedy that keeps the subset's image-caption cross-covariance close to
    the full data's, minus a redundancy penalty (stages.kernels.coresets.clipcov)."""

    method: Literal["clipcov"]
    groups: GROUPS = "kmeans"
    clusters: int = Field(10, ge=1)  # kmeans
    lam: float = Field(1.0, ge=0)  # weight of the redundancy term
    gate: float | None = Field(3.0, ge=0)  # misaligned: CLIP score this many robust stds below the group's median
    pool_factor: float | None = Field(1.5, ge=1)  # picks come from the ceil(pool_factor * k) best-scored pairs first
    device: DEVICE = "auto"


class ClipScoreSpec(SelectSpec):
    """DataComp-style filter: the top `budget` pairs by image-caption cosine, or (budget: null)
    every pair at or above `threshold`."""

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

    method: Literal["sas"]
    groups: GROUPS = "kmeans"
    clusters: int = Field(10, ge=1)
    optimizer: Literal["lazy", "stochastic"] = "stochastic"
    eps: float = Field(0.01, gt=0, lt=1)
    device: DEVICE = "auto"


CAPTION_METHODS = frozenset({"clipcov", "clipscore"})  # sas reads image views only
SPEC_TYPES = (RandomSpec, StratifiedSpec, CraigSpec, GradMatchSpec, DifficultySpec, CcsSpec, DedupSpec,
              ClipCovSpec, ClipScoreSpec, SasSpec)
SELECT_METHODS = tuple(c.model_fields["method"].annotation.__args__[0] for c in SPEC_TYPES)
AnySpec = Annotated[Union[SPEC_TYPES], Field(discriminator="method")]


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


class MaterializeConfig(Section):
    shard_size: int = Field(10000, ge=1)


ONLINE_METHODS = ("craig", "gradmatch", "crest", "adaselection", "uniform", "big_loss", "small_loss", "grad_norm",
                  "adaboost", "coreset_center", "coreset_cover")


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

    @field_validator("budget")
    @classmethod
    def _fraction(cls, v):
        if not 0.0 < v <= 1.0:
            raise ValueError(f"budget {v} is out of range: an online budget is a fraction in (0, 1]")
        return v

    @property
    def sel_name(self) -> str:
        prefix = "adaptive-" if self.method in ("craig", "gradmatch") else ""
        return self.name or f"{prefix}{self.method}-{self.budget}"


class VerifyConfig(Section):
    """The fixed training protocol every training set gets (defaults: the DD ConvNet recipe)."""

    recipe: Literal["convnet3", "resnet18", "mlp", "small_cnn", "clip"] = "convnet3"
    epochs: int = Field(20, ge=1)
    seeds: int = Field(3, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["step", "cosine"] = "step"
    milestones: list[int] | None = None  # step: epochs where lr is multiplied by gamma (default: half-way)
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

    @model_validator(mode="after")
    def _check(self):
        for m in self.milestones or []:
            if not 0 < m < self.epochs:
                raise ValueError(f"milestone {m} is outside the training (1..{self.epochs - 1})")
        if self.recipe == "clip" and self.online:
            raise ValueError("online selection trains classifiers; recipe clip trains a CLIP on pairs (drop verify.online)")
        check_names("online", [s.sel_name for s in self.online])
        return self


DSA_KINDS = ("color", "crop", "cutout", "flip", "scale", "rotate")
DSA_DEFAULT = "color_crop_cutout_flip_scale_rotate"


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
DISTILL_METHODS = ("mtt", "dm")
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
            if s.method == "mtt" and s.max_start_epoch + s.expert_epochs > self.experts.epochs:
                raise ValueError(f"specs.{i}: max_start_epoch {s.max_start_epoch} + expert_epochs {s.expert_epochs} "
                                 f"exceeds experts.epochs {self.experts.epochs}")
        zcas = {s.zca for s in self.specs if s.method == "mtt"}
        if len(zcas) > 1:
            raise ValueError("mtt specs disagree on zca, but share one set of experts (trained on whitened "
                             "images or not): use one zca setting")
        return self

    @property
    def has_mtt(self) -> bool:
        return any(s.method == "mtt" for s in self.specs)

    @property
    def zca(self) -> bool:
        return any(getattr(s, "zca", False) for s in self.specs)


class FlowConfig(Section):
    task_runner: Literal["default", "dask"] = "default"
    n_workers: int = Field(2, ge=1)


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

    @property
    def needs_validation(self) -> bool:
        return bool(VALIDATED_SCORES & set(self.score.methods))

    @property
    def uses_captions(self) -> bool:
        """An image-text run: captions are embedded, scored, selected on or trained on, so the
        index requires one per sample (missing / empty ones are bad input, raised or skipped)."""
        return (self.embed.method == "proxy_clip" or self.verify.recipe == "clip" or "clip" in self.score.methods
                or any(s.method in CAPTION_METHODS for s in self.select))

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
        weighted = [s.sel_name for s in self.select if s.method in ("craig", "gradmatch")]
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


SAFE_NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]*")


def check_names(kind: str, names: list[str]) -> None:
    """Unit names become one directory name each (`select/<name>`): unique, letters, digits and
    _ . + - only, and no leading dot, so `.` and `..` (the parent!) and hidden names cannot occur."""
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{kind} names repeat: {', '.join(dup)} (set 'name' to tell them apart)")
    bad = [n for n in names if not SAFE_NAME.fullmatch(n)]
    if bad:
        raise ValueError(f"{kind} name {bad[0]!r} must be one path component: letters, digits and _ . + -, "
                         "not starting with a dot")


DEMO_CONFIG: dict[str, Any] = {
    "run": "runs/demo",
    "dataset": "digits",
    "seed": 0,
    "embed": {"method": "proxy", "epochs": 5},
    "select": [{"method": "stratified", "budget": [0.1, 0.3]}],
    "verify": {"epochs": 15, "seeds": 2, "batch_size": 64, "lr": 0.05},
}


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` (list items by index: `select.0.budget=0.2`) in place."""
    if "=" not in assignment:
        raise CurateError(f"--set {assignment!r}: expected key=value")
    path, _, text = assignment.partition("=")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise CurateError(f"--set {assignment!r}: value is not valid YAML") from None
    keys = path.strip().split(".")
    node: Any = raw
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise CurateError(f"--set {path}: '{k}' is not an index of a {len(node)}-item list")
            k = int(k)
            if last:
                node[k] = value
            else:
                node = node[k]
        elif isinstance(node, dict):
            if last:
                node[k] = value
            else:
                node = node.setdefault(k, {})
        else:
            raise CurateError(f"--set {path}: '{keys[i - 1]}' is not a section")


def load_config(source: str | Path | dict | None = None, overrides: list[str] = ()) -> RunConfig:
    """Config from a YAML path, a dict, or the embedded demo; then `--set` overrides."""
    if source is None:
        raw = yaml.safe_load(yaml.safe_dump(DEMO_CONFIG))
    elif isinstance(source, dict):
        raw = yaml.safe_load(yaml.safe_dump(source))
    else:
        p = Path(source)
        if not p.exists():
            raise CurateError(f"config {p}: no such file")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise CurateError(f"config {p}: not valid YAML: {str(exc).splitlines()[0]}") from None
    for assignment in overrides:
        apply_override(raw, assignment)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        parts = list(err["loc"])
        if len(parts) > 2 and parts[0] == "select" and parts[2] in SELECT_METHODS:
            del parts[2]  # the union's tag: select.0.craig.eps reads select.0.eps
        if len(parts) > 3 and parts[:2] == ["distill", "specs"] and parts[3] in DISTILL_METHODS:
            del parts[3]  # distill.specs.0.mtt.ipc reads distill.specs.0.ipc
        loc = "".join(f"{p}: " if i == len(parts) - 1 else f"{p}." for i, p in enumerate(parts))
        msg = err["msg"].removeprefix("Value error, ")
        raise CurateError(f"config: {loc}{msg}") from None
