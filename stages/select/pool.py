"""The candidates of one selection unit and lazy access to the upstream arrays a method reads."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from pipeline.errors import CurateError
from pipeline.manifest import read_parquet
from pipeline.methods import VALUE_SCORES
from pipeline.npy import NpyRows, load_checked
from pipeline.sampling import proportional_allocation
from pipeline.stage import StageContext

PAIRS_PER_GROUP = 10_000  # default_clusters: about this many candidates per k-means pseudo-class


def default_clusters(n: int) -> int:
    """k-means pseudo-classes of clipcov and sas where `clusters` is unset: 10, and one per
    PAIRS_PER_GROUP candidates past 100,000, so that a group's greedy (its m x m redundancy
    matrix, its facility gains) stays the same size as the pool grows instead of growing as N^2."""
    return max(10, n // PAIRS_PER_GROUP)


@dataclass
class Pool:
    """The candidates of one selection unit (index rows, ascending) and their labels.

    A selection run in parts (select_part units) hands each part a Pool of its groups' rows, with
    `whole` (the rows of the selection's whole pool) and `split` (the groups and budgets of its rows,
    decided over the whole pool), so that every part chooses exactly what one unit would among them.

    Memory: `embeddings` and the other arrays hold [len(rows), D] (the rows this unit works on);
    statistics of the whole pool (k-means groups, the unrelated-caption score, the cross-covariance
    error) stream it from the .npy in row blocks (pipeline.npy), never holding it.
    """

    ctx: StageContext
    rows: np.ndarray
    labels: np.ndarray
    whole: np.ndarray | None = None  # the selection's whole pool where this is a part
    split: tuple[np.ndarray, np.ndarray] | None = None  # a part's (group per row, picks per group)
    buckets: list[np.ndarray] | None = None  # a clipcov part's buckets of groups (clipcov.bucket_plan's)

    @property
    def whole_rows(self) -> np.ndarray:
        return self.rows if self.whole is None else self.whole

    def _path(self, name: str):
        path = self.ctx.input_dir("embed") / name
        if path.exists():
            return path
        if name.startswith("text_"):
            raise CurateError("needs caption embeddings (embed/text_embeddings.npy): the dataset has no captions, "
                              "or embed.method is proxy (use proxy_clip or open_clip)")
        raise CurateError(f"needs embed/{name}, which embed.method '{self.ctx.cfg.embed.method}' does not write "
                          "(use embed.method: proxy or features: embeddings)")

    def load(self, name: str) -> np.ndarray:
        """[len(rows), D] float32 of this unit's rows, checked finite: a new array each call, the
        caller's to keep or overwrite (`embeddings` caches one)."""
        return load_checked(self._path(name), f"embed/{name}", self.rows)  # reads only the pool's rows

    def stream(self, name: str) -> NpyRows:
        """The whole pool's rows of an embed array, read block by block (not held)."""
        return NpyRows(self._path(name), self.whole_rows)

    def on_disk(self, name: str) -> NpyRows:
        """This unit's rows of an embed array, for a kernel that reads the rows it needs when it needs
        them (clipcov: a bucket of groups at a time) instead of holding [len(rows), D]."""
        return NpyRows(self._path(name), self.rows)

    @cached_property
    def embeddings(self) -> np.ndarray:
        return self.load("embeddings.npy")

    @cached_property
    def text_embeddings(self) -> np.ndarray:
        return self.load("text_embeddings.npy")

    @property
    def knn(self) -> dict | None:
        """The run's `knn:` section as the unit's fingerprint holds it (None where the method uses none)."""
        return self.ctx.config.get("knn")

    def groups(self, spec, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(group per candidate, picks per group) of a per-group method: a part's own split, else the
        classes (craig, and `groups: labels`) or k-means pseudo-classes of the image embeddings."""
        if self.split is not None:
            return self.split
        if getattr(spec, "groups", "labels") == "labels":
            if spec.method in ("clipcov", "sas") and (self.labels < 0).any():
                raise CurateError("groups: labels, but some samples have no label (use groups: kmeans)")
            return self.class_alloc(k)
        from stages.kernels.coresets.clipcov import kmeans_groups

        n = len(self.whole_rows)
        groups = kmeans_groups(self.stream("embeddings.npy"), min(spec.clusters or default_clusters(n), n),
                               seed=self.ctx.cfg.seed, device=self.ctx.device, knn=self.knn)
        return groups, proportional_allocation(np.bincount(groups), k)

    def class_alloc(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(class ids per candidate, picks per class): budget split in proportion to class
        size, at least one per non-empty class. Unlabelled pools are one class."""
        if (self.labels < 0).all():
            groups = np.zeros(len(self.labels), np.int64)
        elif (self.labels < 0).any():
            raise CurateError(f"per-class selection needs a label on every sample "
                              f"(row {int(self.rows[np.flatnonzero(self.labels < 0)[0]])} has none)")
        else:
            groups = self.labels
        return groups, proportional_allocation(np.bincount(groups), k)

    def features(self, kind: str, device):
        """Feature space for similarity / matching: last-layer gradients, p - y, or embeddings."""
        from stages.kernels.coresets.features import last_layer, plain

        if kind == "embeddings":
            return plain(self.embeddings, device)
        err = self.load("grads.npy")
        return plain(err, device) if kind == "bias_gradients" else last_layer(err, self.embeddings, device)

    def difficulty(self, score: str) -> np.ndarray:
        """Higher = harder; value scores (knn_shapley, influence) are negated."""
        table = read_parquet(self.ctx.input_dir("score") / "scores.parquet", [f"score_{score}"])
        s = table.column(0).to_numpy().astype(np.float64)[self.rows]
        bad = np.flatnonzero(~np.isfinite(s))
        if len(bad):
            raise CurateError(f"score_{score} of row {int(self.rows[bad[0]])} is NaN or infinite")
        return -s if score in VALUE_SCORES else s

    def unrelated_score(self) -> float:
        """ClipCov's expected score of an unrelated caption, over the whole pool (streamed)."""
        from stages.kernels.coresets.clipcov import unrelated_score

        img, txt = self.stream("embeddings.npy"), self.stream("text_embeddings.npy")
        return unrelated_score((a, b) for (_, a), (_, b) in zip(img.blocks(), txt.blocks()))

    def matching_error(self, kind: str, chosen_rows: np.ndarray, weights, device) -> float:
        """gradmatch's weighted mean-gradient error of the chosen index rows against this pool."""
        from stages.kernels.coresets.gradmatch import matching_error

        return matching_error(self.features(kind, device), np.searchsorted(self.rows, chosen_rows), weights)

    def cross_cov_error(self, chosen_rows: np.ndarray, weights) -> float:
        """||C_S - C_V|| / ||C_V|| of the chosen index rows against the whole pool (streamed)."""
        from stages.kernels.coresets.clipcov import cross_cov_error

        whole = self.whole_rows
        return cross_cov_error(self.stream("embeddings.npy"), self.stream("text_embeddings.npy"),
                               np.searchsorted(whole, chosen_rows), weights)
