"""What each score and online method needs and yields, stated once; the DSA kinds.

Plain data without pydantic: the config models (pipeline.config) build their choices from
these registries, and the training code (stages.learn), which runs on machines without
pydantic, reads them too. Selection methods state their facts on their spec classes
(pipeline.config.select: `needs`, `weights`).
"""

from __future__ import annotations

from dataclasses import dataclass

# What a method may read, and the unit that writes it: a unit's upstream follows from its needs.
NEEDS = {
    "labels": "index",       # a label on every sample
    "images": "index",       # the decoded training images (the index's shards): for scores that train models
    "validation": "index",   # the validation split (index/val.parquet)
    "embeddings": "embed",   # embed/embeddings.npy
    "gradients": "embed",    # embed/grads.npy: the proxy's last-layer p - y (x [h, 1] with the embeddings)
    "dynamics": "embed",     # the proxy's outputs over its epochs (probs.npy, hnorm.npy)
    "captions": "embed",     # embed/text_embeddings.npy, so a caption on every sample at index
    "image_views": "embed",  # embed/image_views.npy (proxy_clip's augmented views; else the embeddings)
    "scores": "score",       # score/scores.parquet
    "experts": "experts",    # the expert trajectories that mtt matches
}


def providers(needs: frozenset[str]) -> set[str]:
    """The units that write what `needs` names."""
    return {NEEDS[n] for n in needs}


@dataclass(frozen=True)
class ScoreMethod:
    needs: frozenset[str]
    value: bool = False  # higher = more valuable (difficulty negated), not harder


_DYNAMICS = frozenset({"labels", "dynamics"})
SCORES = {
    "el2n": ScoreMethod(_DYNAMICS),
    "grand": ScoreMethod(_DYNAMICS),
    "forgetting": ScoreMethod(_DYNAMICS),
    "loss": ScoreMethod(_DYNAMICS),
    "margin": ScoreMethod(_DYNAMICS),
    "knn_shapley": ScoreMethod(frozenset({"labels", "embeddings", "validation"}), value=True),
    "prototype": ScoreMethod(frozenset({"labels", "embeddings"})),
    "influence": ScoreMethod(frozenset({"labels", "dynamics", "embeddings", "validation"}), value=True),
    "clip": ScoreMethod(frozenset({"embeddings", "captions"}), value=True),
    # confident learning on out-of-fold probabilities of models trained here (score.label_issues)
    "label_issues": ScoreMethod(frozenset({"labels", "images"})),
}
SCORE_METHODS = tuple(SCORES)
VALUE_SCORES = frozenset(m for m, s in SCORES.items() if s.value)
VALIDATED_SCORES = frozenset(m for m, s in SCORES.items() if "validation" in s.needs)


def scores_needing(need: str, methods) -> list[str]:
    """Those of `methods` (in their order) that need `need`."""
    return [m for m in methods if need in SCORES[m].needs]


@dataclass(frozen=True)
class OnlineMethod:
    """A method of verify.online: which selector runs it (stages.learn.online), the spec keys
    it takes beyond the budget, and whether it trains on weighted samples."""

    selector: str  # "adaptive", "crest", "adaselection", or "per_batch" (one baseline score per batch)
    options: tuple[str, ...] = ()
    weights: bool = False

    @property
    def label_prefix(self) -> str:
        return "adaptive-" if self.selector == "adaptive" else ""


_ADAPTIVE = OnlineMethod("adaptive", ("kappa", "every"), weights=True)
_BASELINE = OnlineMethod("per_batch")
ONLINE = {
    "craig": _ADAPTIVE,
    "gradmatch": _ADAPTIVE,
    "crest": OnlineMethod("crest", weights=True),
    "adaselection": OnlineMethod("adaselection"),
    "uniform": _BASELINE,
    "big_loss": _BASELINE,
    "small_loss": _BASELINE,
    "grad_norm": _BASELINE,
    "adaboost": _BASELINE,
    "coreset_center": _BASELINE,
    "coreset_cover": _BASELINE,
}
ONLINE_METHODS = tuple(ONLINE)


def online_methods(*selectors: str) -> tuple[str, ...]:
    """The online methods run by any of `selectors`, in registry order."""
    return tuple(m for m, o in ONLINE.items() if o.selector in selectors)


# Differentiable Siamese Augmentation kinds (stages.learn.augment), joined by _ in configs
DSA_KINDS = ("color", "crop", "cutout", "flip", "scale", "rotate")
DSA_DEFAULT = "_".join(DSA_KINDS)
