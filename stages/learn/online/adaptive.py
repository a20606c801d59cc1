"""Adaptive coresets: CRAIG or GRAD-MATCH re-selected from the model being trained.

The schedule follows GRAD-MATCH (Killamsetty et al. 2021). With T = view.epochs, k =
round(fraction * N) and a warm start of T_w epochs:

- epochs 0 .. T_w - 1 train on the full data (one shuffled pass each);
- at epoch T_w and every `every` epochs after it, the whole training set is probed
  (one forward each, no gradients), its last-layer gradients (p - y) x [h, 1] are built
  in factored form, and per-class CRAIG or GRAD-MATCH picks a weighted subset of k rows
  (classes get k in proportion to their size; a class's weights sum to its size);
- every other epoch after T_w is one shuffled, weighted pass over the current subset.

Warm start, two readings of "warm start on the full data for a fraction kappa":
- warm="budget" (default, the GRAD-MATCH paper's): T_w = round(kappa * T * fraction)
  full epochs, i.e. the backprop cost of kappa * T subset epochs;
- warm="epochs": T_w = round(kappa * T), kappa of the epochs literally on the full data.
Either way the run still has T epochs, so it backpropagates T_w * N + (T - T_w) * k
samples, more than a static subset's T * k whenever T_w > 0 (with warm="budget",
about k * T * (1 + kappa - kappa * fraction)). kappa = 0 selects at epoch 0 from the
untrained model and costs exactly T * k. Probing costs N forwards per re-selection
(`probe_samples` in the trainer's result).
"""

from __future__ import annotations

import inspect
import time
from typing import Iterator

import numpy as np

from stages.kernels.coresets.facility import craig
from stages.kernels.coresets.features import last_layer, plain
from stages.kernels.coresets.gradmatch import gradmatch_per_class
from stages.kernels.gradients import bias_gradients
from pipeline.sampling import budget_count, budget_problem, proportional_allocation
from stages.learn.online.base import Batch, ModelView, Probe, Selector, shuffled_batches

METHODS = {"craig": craig, "gradmatch": gradmatch_per_class}
FEATURES = ("last_layer", "bias_gradients", "embeddings")
# the kernels' own keywords that the selector fills in, so a user may not set them
_FILLED = {"seed", "device"}


def gradient_features(probe: Probe, labels: np.ndarray, device, kind: str = "last_layer"):
    """The feature space a coreset kernel measures: last-layer gradients (p - y) x [h, 1]
    (factored, never N x C(D+1) at once), bias gradients p - y, or the penultimate features."""
    if kind == "embeddings":
        return plain(probe.feats, device)
    err = bias_gradients(probe.probs, labels)
    return plain(err, device) if kind == "bias_gradients" else last_layer(err, probe.feats, device)


def warm_epochs(epochs: int, fraction: float, kappa: float, warm: str = "budget") -> int:
    """Full-data epochs before the first selection (see the module docstring for the two readings)."""
    share = kappa * fraction if warm == "budget" else kappa
    return min(epochs, int(round(share * epochs)))


def reselection_epochs(epochs: int, fraction: float, kappa: float, every: int, warm: str = "budget") -> list[int]:
    """Epochs at whose start a subset is (re-)selected: T_w, T_w + every, ... below T."""
    return list(range(warm_epochs(epochs, fraction, kappa, warm), epochs, every))


def require(ok: bool, message: str) -> None:
    """Bad settings fail at construction, in one line naming the setting."""
    if not ok:
        raise ValueError(message)


def _require_kernel_opts(opts: dict) -> None:
    """The kernels' own settings, checked now rather than at the first selection (after the warm start)."""
    checks = {"metric": (lambda v: v in ("euclidean", "cosine"), "euclidean or cosine"),
              "optimizer": (lambda v: v in ("lazy", "stochastic"), "lazy or stochastic"),
              "eps": (lambda v: isinstance(v, float) and 0 < v < 1, "in (0, 1)"),
              "lam": (lambda v: isinstance(v, (int, float)) and v >= 0, ">= 0"),
              "tol": (lambda v: isinstance(v, (int, float)) and v >= 0, ">= 0")}
    for key, (ok, what) in checks.items():
        if key in opts:
            require(ok(opts[key]), f"adaptive: {key} must be {what}, got {opts[key]!r}")


class AdaptiveCoreset(Selector):
    """CRAIG / GRAD-MATCH subsets re-selected every `every` epochs after a full-data warm start.

    method_opts go to the kernel: craig's metric, optimizer, eps, graph, dense_max, knn;
    gradmatch_per_class's lam, tol. `features` picks the space they work in.
    """

    name = "adaptive"
    streams = False  # the subset is chosen when an epoch starts

    def __init__(self, method: str, fraction: float, kappa: float = 0.5, every: int = 5, *,
                 warm: str = "budget", features: str = "last_layer", **method_opts):
        require(method in METHODS, f"adaptive: method must be craig or gradmatch, got {method!r}")
        problem = budget_problem(fraction, counts=False, what="fraction")
        require(not problem, f"adaptive: {problem}")
        require(isinstance(kappa, (int, float)) and 0 <= kappa <= 1,
                f"adaptive: kappa must be in [0, 1], got {kappa!r}")
        require(isinstance(every, int) and every >= 1, f"adaptive: every must be an integer >= 1, got {every!r}")
        require(warm in ("budget", "epochs"), f"adaptive: warm must be budget or epochs, got {warm!r}")
        require(features in FEATURES, f"adaptive: features must be one of {', '.join(FEATURES)}, got {features!r}")
        allowed = set(inspect.signature(METHODS[method]).parameters) - {"feats", "grads", "labels", "alloc"} - _FILLED
        for key in method_opts:
            require(key in allowed, f"adaptive: {method} has no setting {key!r} (has {', '.join(sorted(allowed))})")
        _require_kernel_opts(method_opts)
        self.method, self.fraction, self.kappa, self.every = method, float(fraction), float(kappa), every
        self.warm, self.features, self.method_opts = warm, features, method_opts
        self.name = f"adaptive-{method}"
        self._reset()

    def _reset(self) -> None:
        self.rows: np.ndarray | None = None  # None: the full data
        self.weights: np.ndarray | None = None
        self.selection_epochs: list[int] = []
        self.changed: list[float] = []
        self.seconds = 0.0
        self._ready = False

    def setup(self, view: ModelView) -> None:
        super().setup(view)
        self._reset()
        self.k = budget_count(self.fraction, view.n)
        self.schedule = set(reselection_epochs(view.epochs, self.fraction, self.kappa, self.every, self.warm))
        self._ready = True

    def subset(self, epoch: int, view: ModelView) -> tuple[np.ndarray, np.ndarray] | None:
        """The new weighted subset (rows, weights) if `epoch` is a selection epoch, else None
        (keep training on the full data before the first selection, on the current subset after).
        Call once per epoch, before training it; a loop of one's own may call it directly."""
        if not self._ready:
            self.setup(view)
        if epoch not in self.schedule:
            return None
        start = time.perf_counter()
        rows, weights = self._select(view, seed=int(np.random.SeedSequence([view.seed, epoch]).generate_state(1)[0]))
        self.seconds += time.perf_counter() - start
        if self.rows is not None:
            self.changed.append(1.0 - len(np.intersect1d(rows, self.rows)) / len(rows))
        self.rows, self.weights = rows, weights
        self.selection_epochs.append(epoch)
        return rows, weights

    def _select(self, view: ModelView, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Probe every row with the current model and run the per-class kernel on its gradients."""
        probe = view.probe(np.arange(view.n))
        feats = gradient_features(probe, view.labels, view.device, self.features)
        alloc = proportional_allocation(np.bincount(view.labels, minlength=view.num_classes), self.k)
        if self.method == "craig":
            rows, weights, _ = craig(feats, view.labels, alloc, seed=seed, **self.method_opts)
        else:
            rows, weights, _ = gradmatch_per_class(feats, view.labels, alloc, seed=seed, device=view.device,
                                                   **self.method_opts)
        return np.asarray(rows, np.int64), np.asarray(weights, np.float32)

    def batches(self, epoch: int, view: ModelView) -> Iterator[Batch]:
        self.subset(epoch, view)
        rows = np.arange(view.n) if self.rows is None else self.rows
        yield from shuffled_batches(rows, self.weights, view.batch_size, self.rng)

    def stats(self) -> dict:
        """Re-selections, the epochs they ran at, their seconds, and the share of rows each
        re-selection after the first replaced (1 = a disjoint subset; the mean is 0 with
        fewer than two selections)."""
        return {"reselections": len(self.selection_epochs), "selection_epochs": list(self.selection_epochs),
                "selection_seconds": self.seconds,
                "changed_fraction": float(np.mean(self.changed)) if self.changed else 0.0,
                "changed_per_reselection": list(self.changed)}
