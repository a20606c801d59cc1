"""Per-mini-batch online selection: selective backprop baselines and AdaSelection.

Each epoch a selector walks all N samples once in a random order, in candidate batches
of round(B / fraction) samples (B: the trainer's batch size). For every candidate batch
it probes the current model (per-sample loss, softmax, penultimate features; no
gradients), scores the candidates and backpropagates only the top k = round(fraction *
candidates) ~ B of them. An epoch then takes as many steps of B samples as a static
subset of fraction * N (the same batch size and step count, so one recipe fits both),
plus a no-grad forward over all N samples.

Baseline scores are plain kernels of numpy arrays, "higher = keep first": `uniform`,
`big_loss`, `small_loss`, `grad_norm`, AdaBoost weights (`AdaBoostWeights`) and two
within-batch coreset proxies on the exact last-layer gradients, which only need their
Gram matrix (`last_layer_gram`, then `coreset_center`, `coreset_cover`).
`AdaSelection` (Zhong et al. 2023, arXiv 2306.10728) mixes them with method weights
learnt online from the change of the training loss.

The selection is usable from any training loop, without `train_classifier`:

    sel = AdaSelection(0.25)                    # or PerBatch("big_loss", 0.25)
    for step, rows in enumerate(candidate_batches):   # rows: int64 numpy positions
        k = keep_count(len(rows), 0.25)
        with torch.no_grad():
            h = model.features(x[rows]); logits = model.head(h)
        losses = F.cross_entropy(logits, y[rows], reduction="none")
        probs = logits.softmax(1)
        sel.observe(float(losses.mean()), progress=step / total_steps)  # AdaSelection only
        pos = sel.select(losses.numpy(), probs.numpy(), h.numpy(), y[rows].numpy(), rows, k)
        train_step(rows[pos])
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Iterator

import numpy as np

from pipeline.errors import CurateError
from pipeline.methods import online_methods
from pipeline.sampling import budget_problem

from stages.kernels.gradients import bias_gradients
from stages.learn.online.base import Batch, ModelView, Selector

BASELINES = online_methods("per_batch")  # the single scores that AdaSelection mixes
_GRAM_METHODS = ("coreset_center", "coreset_cover")
_BASELINE_RATE = 0.1  # AdaSelection: EMA rate of the loss-drop mean and variance
_SCALE_FLOOR = 0.1  # AdaSelection: the drop's scale is at least this share of its mean


class SelectionError(CurateError, ValueError):
    """A bad per-batch setting or input, told in one line (a ValueError and a CurateError)."""


# ---------------------------------------------------------------- score kernels


def uniform(n: int, rng: np.random.Generator) -> np.ndarray:
    """Random scores: the top k is a uniform sample of the batch."""
    return rng.random(n)


def big_loss(losses: np.ndarray) -> np.ndarray:
    """Hard samples first (selective backprop's signal)."""
    return np.asarray(losses, np.float64)


def small_loss(losses: np.ndarray) -> np.ndarray:
    """Easy samples first (robust to label noise, a curriculum's start)."""
    return -np.asarray(losses, np.float64)


def grad_norm(probs: np.ndarray, labels: np.ndarray, feats: np.ndarray) -> np.ndarray:
    """Norm of each sample's cross-entropy gradient on the last linear layer (weight and bias).

    d loss / d W = (p - y) h^T and d loss / d b = p - y, so the norm is
    ||p - y|| * sqrt(||h||^2 + 1) without forming the gradient.
    """
    e = bias_gradients(probs, labels, np.float64)
    h = np.asarray(feats, np.float64).reshape(len(e), -1)
    return np.linalg.norm(e, axis=1) * np.sqrt((h * h).sum(1) + 1.0)


def last_layer_gram(probs: np.ndarray, labels: np.ndarray, feats: np.ndarray) -> np.ndarray:
    """Exact Gram matrix of the last-layer gradients g_i = (p_i - y_i) (x) [h_i, 1], [B, B].

    <g_i, g_j> = <e_i, e_j> * (<h_i, h_j> + 1), so the C * (D + 1)-dimensional gradients
    are never formed: O(B^2 (C + D)) time and O(B^2) memory.
    """
    e = bias_gradients(probs, labels, np.float64).astype(np.float32)
    h = np.asarray(feats, np.float32).reshape(len(e), -1)
    return (e @ e.T).astype(np.float64) * ((h @ h.T).astype(np.float64) + 1.0)


def _sq_dists(gram: np.ndarray) -> np.ndarray:
    d = np.diag(gram)
    return np.maximum(d[:, None] + d[None, :] - 2.0 * gram, 0.0)


def coreset_center(gram: np.ndarray) -> np.ndarray:
    """-||g_i - mean(g)|| from the batch's gradient Gram matrix: samples whose gradient
    is closest to the batch's mean gradient first (a one-step gradient-matching proxy)."""
    gram = np.asarray(gram, np.float64)
    sq = np.diag(gram) - 2.0 * gram.mean(1) + gram.mean()
    return -np.sqrt(np.maximum(sq, 0.0))


def coreset_cover(gram: np.ndarray, k: int) -> np.ndarray:
    """k-center greedy (farthest-first) order of the batch in gradient space.

    Starts at the sample nearest the mean gradient, then repeatedly picks the sample
    farthest from everything picked, so k picks cover the batch's gradient directions.
    Scores are the reverse pick order (first pick highest); the samples left after k
    picks follow, farthest from the picked set first. O(B^2) time and memory.
    """
    gram = np.asarray(gram, np.float64)
    n = len(gram)
    k = min(max(int(k), 1), n)
    d2 = _sq_dists(gram)
    first = int(np.argmax(coreset_center(gram)))
    picked = [first]
    near = d2[first].copy()
    near[first] = -1.0
    for _ in range(k - 1):
        nxt = int(np.argmax(near))  # first index on ties: deterministic
        picked.append(nxt)
        near = np.minimum(near, d2[nxt])
        near[nxt] = -1.0  # picked samples stay at -1: min() keeps them there
    rest = np.setdiff1d(np.arange(n), picked)
    rest = rest[np.argsort(-near[rest], kind="stable")]
    order = np.concatenate([np.asarray(picked, np.int64), rest])
    scores = np.empty(n)
    scores[order] = np.arange(n, 0, -1, dtype=np.float64)
    return scores


class AdaBoostWeights:
    """AdaBoost-style sample weights over the whole training set, kept in log space.

    Each probe is one boosting round on the batch: with weighted error err of the
    current model's predictions, alpha = 0.5 * (log((1 - err) / err) + log(C - 1))
    (SAMME's multi-class form, so alpha > 0 while the model beats chance), clipped to
    [0, max_alpha]; misclassified samples' weights are multiplied by exp(alpha), correct
    ones by exp(-alpha). Log weights are clipped so they never overflow.
    """

    def __init__(self, n: int, num_classes: int = 2, max_alpha: float = 3.0, max_log: float = 30.0):
        self.logw = np.zeros(int(n))
        self.num_classes, self.max_alpha, self.max_log = num_classes, max_alpha, max_log

    def _grow(self, rows: np.ndarray) -> None:
        """Rows beyond the table (a user's loop that never sized it) start at weight 1."""
        need = int(rows.max()) + 1 if len(rows) else 0
        if need > len(self.logw):
            self.logw = np.concatenate([self.logw, np.zeros(need - len(self.logw))])

    def scores(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        self._grow(rows)
        return np.exp(self.logw[rows])

    def update(self, rows: np.ndarray, correct: np.ndarray) -> float:
        """One boosting round on `rows`; returns the round's alpha."""
        rows, correct = np.asarray(rows, np.int64), np.asarray(correct, bool)
        self._grow(rows)
        w = np.exp(self.logw[rows] - self.logw[rows].max())
        err = float(np.clip(w[~correct].sum() / w.sum(), 1e-3, 1 - 1e-3))
        alpha = 0.5 * (np.log((1 - err) / err) + np.log(max(self.num_classes - 1, 1)))
        alpha = float(np.clip(alpha, 0.0, self.max_alpha))
        self.logw[rows] = np.clip(self.logw[rows] + np.where(correct, -alpha, alpha), -self.max_log, self.max_log)
        return alpha


# ---------------------------------------------------------------- helpers


def keep_count(m: int, fraction: float) -> int:
    """How many of m candidates to keep: max(1, round(fraction * m)), half rounding up."""
    return min(m, max(1, int(np.floor(fraction * m + 0.5))))


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k highest scores; ties keep the earlier position (stable)."""
    return np.argsort(-np.asarray(scores, np.float64), kind="stable")[:k]


def normalised_ranks(scores: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1] (1 = highest score); tied scores share their average rank,
    so a method that cannot tell samples apart adds the same to all of them."""
    s = np.asarray(scores, np.float64)
    n = len(s)
    if n == 1:
        return np.ones(1)
    order = np.argsort(s, kind="stable")
    sorted_s = s[order]
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], n]
    avg = (starts + ends - 1) / 2.0  # average 0-based rank of each tie group
    ranks = np.empty(n)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks / (n - 1)


def _check_fraction(fraction) -> float:
    problem = budget_problem(fraction, counts=False, what="fraction")
    if problem:
        raise SelectionError(f"per-batch {problem}")
    return float(fraction)


def _check_methods(methods, what: str) -> tuple[str, ...]:
    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    bad = [m for m in methods if m not in BASELINES]
    if bad or not methods or len(set(methods)) != len(methods):
        why = f"unknown {bad[0]!r}" if bad else ("empty" if not methods else "repeated")
        raise SelectionError(f"{what} {list(methods)} is invalid ({why}): choose from {', '.join(BASELINES)}")
    return methods


def _check_batch(losses, probs, feats, labels, rows, k) -> tuple:
    losses = np.asarray(losses, np.float64).reshape(-1)
    n = len(losses)
    if not np.isfinite(losses).all():
        raise SelectionError("probe losses contain NaN or inf: training diverged (lower the learning rate)")
    probs = np.asarray(probs, np.float64)
    feats = np.asarray(feats).reshape(n, -1) if n else np.zeros((0, 0))
    labels, rows = np.asarray(labels, np.int64).reshape(-1), np.asarray(rows, np.int64).reshape(-1)
    if probs.shape[0] != n or len(labels) != n or len(rows) != n:
        raise SelectionError(f"per-batch select: losses, probs, feats, labels and rows disagree in length ({n} losses)")
    if not 1 <= int(k) <= n:
        raise SelectionError(f"per-batch select: k {k} is out of range for a batch of {n}")
    return losses, probs, feats, labels, rows, int(k)


class _Scorer:
    """Runs the baseline kernels on one probed batch; owns the random stream and AdaBoost table."""

    def __init__(self, methods: tuple[str, ...], seed: int = 0, n: int = 0):
        self.methods = methods
        self.start(n, seed)

    def start(self, n: int, seed: int) -> None:
        self.rng = np.random.default_rng((seed, 1))  # apart from the selector's shuffling stream
        self.boost = AdaBoostWeights(n)

    def __call__(self, losses, probs, feats, labels, rows, k) -> dict[str, np.ndarray]:
        out = {}
        gram = last_layer_gram(probs, labels, feats) if set(self.methods) & set(_GRAM_METHODS) else None
        for m in self.methods:
            if m == "uniform":
                out[m] = uniform(len(losses), self.rng)
            elif m == "big_loss":
                out[m] = big_loss(losses)
            elif m == "small_loss":
                out[m] = small_loss(losses)
            elif m == "grad_norm":
                out[m] = grad_norm(probs, labels, feats)
            elif m == "adaboost":
                self.boost.num_classes = probs.shape[1]
                out[m] = self.boost.scores(rows)  # weights from earlier visits, then this round
                self.boost.update(rows, probs.argmax(1) == labels)
            elif m == "coreset_center":
                out[m] = coreset_center(gram)
            elif m == "coreset_cover":
                out[m] = coreset_cover(gram, k)
        return out


# ---------------------------------------------------------------- selectors


class _PerBatchSelector(Selector):
    """One pass per epoch in probed candidate batches; subclasses implement `select`."""

    def __init__(self, fraction: float, methods: tuple[str, ...]):
        self.fraction = _check_fraction(fraction)
        self.scorer = _Scorer(methods)
        self.selected = self.candidates = 0

    def setup(self, view: ModelView) -> None:
        super().setup(view)
        self.scorer.start(view.n, view.seed)

    @abstractmethod
    def select(self, losses, probs, feats, labels, rows, k: int) -> np.ndarray:
        """Positions (into this batch) of the k candidates to backpropagate."""

    def _count(self, n: int, k: int) -> None:
        self.candidates += n
        self.selected += k

    def _before_select(self, losses: np.ndarray, progress: float) -> None:
        """Hook run on each probed batch before `select`."""

    def _after_step(self, view: ModelView, kept: np.ndarray, before: np.ndarray, progress: float) -> None:
        """Hook run after the step on the kept rows (AdaSelection's weight update)."""

    def candidate_size(self, view: ModelView) -> int:
        """round(B / fraction): keeping `fraction` of it backpropagates about B samples."""
        return max(1, int(round(view.batch_size / self.fraction)))

    def steps_per_epoch(self, view: ModelView) -> int:
        return -(-view.n // self.candidate_size(view))

    def batches(self, epoch: int, view: ModelView) -> Iterator[Batch]:
        order = self.rng.permutation(view.n)
        bs = self.candidate_size(view)
        n_batches = self.steps_per_epoch(view)
        for b in range(n_batches):
            rows = order[b * bs:(b + 1) * bs]
            probe = view.probe(rows)
            self._before_select(probe.losses, (epoch + b / n_batches) / max(view.epochs, 1))
            pos = self.select(probe.losses, probe.probs, probe.feats, view.labels[rows], rows,
                              keep_count(len(rows), self.fraction))
            yield Batch(rows[pos])
            self._after_step(view, rows[pos], probe.losses[pos], (epoch + (b + 1) / n_batches) / max(view.epochs, 1))

    def stats(self) -> dict:
        return {"selector": self.name, "fraction": self.fraction, "selected_samples": self.selected,
                "candidate_samples": self.candidates}


class PerBatch(_PerBatchSelector):
    """Keep each candidate batch's top k under one baseline score (`score` in BASELINES)."""

    def __init__(self, score: str, fraction: float):
        if score not in BASELINES:
            raise SelectionError(f"score {score!r} is unknown: choose from {', '.join(BASELINES)}")
        self.score = score
        super().__init__(fraction, (self.score,))
        self.name = self.score

    def select(self, losses, probs, feats, labels, rows, k: int) -> np.ndarray:
        """Positions (into this batch) of the k candidates to backpropagate."""
        losses, probs, feats, labels, rows, k = _check_batch(losses, probs, feats, labels, rows, k)
        pos = top_k(self.scorer(losses, probs, feats, labels, rows, k)[self.score], k)
        self._count(len(losses), k)
        return pos


class AdaSelection(_PerBatchSelector):
    """AdaSelection: a learnt mixture of the baseline scores, per candidate batch.

    Keep the top k of sum_m alpha_m * rank_m (each method's within-batch ranks in [0, 1]).
    After the step (`observe`): d = relative drop of the kept rows' mean loss, re-probed, a = (d -
    running mean) / running std (EMAs, rate 0.1; std >= 0.1 |mean|; a in [-3, 3]); o_m =
    share of the kept set in method m's own top k; h_m = mean loss rank of m's top k - 0.5;
    r_m = a * o_m + curriculum * (2 t - 1) * h_m at training progress t in [0, 1];
    log alpha <- (1 - decay) * log alpha + eta * r, renormalised.

    So a better-than-usual step credits the methods that agreed with it (the baseline
    stops whichever method dominates the kept set being reinforced merely because the
    loss usually falls), easy-picking methods gain early and hard-picking ones late, and
    the forgetting lets alpha follow the phase of training. This follows the paper's idea
    (method weights from the loss change plus a curriculum reward), not its exact update.
    """

    name = "adaselection"

    def __init__(self, fraction: float, methods=BASELINES, eta: float = 0.5, decay: float = 0.01,
                 curriculum: float = 0.01):
        methods = _check_methods(methods, "methods")
        if not (np.isfinite(eta) and eta > 0):
            raise SelectionError(f"eta {eta!r} is out of range: the weight step size must be > 0")
        if not 0 <= decay < 1:
            raise SelectionError(f"decay {decay!r} is out of range: it is in [0, 1)")
        if not np.isfinite(curriculum):
            raise SelectionError(f"curriculum {curriculum!r} is not a finite number")
        super().__init__(fraction, methods)
        self.methods, self.eta, self.decay, self.curriculum = methods, float(eta), float(decay), float(curriculum)
        self._log_alpha = np.zeros(len(methods))
        self._prev_loss: float | None = None
        self._drop_mean, self._drop_var = None, 0.0  # running statistics of the loss drop
        self._pending: tuple[np.ndarray, np.ndarray] | None = None  # (overlap, hardness) of the last select
        self.updates = 0

    @property
    def alpha(self) -> np.ndarray:
        """Current method weights (on the simplex), in `methods` order."""
        a = np.exp(self._log_alpha - self._log_alpha.max())
        return a / a.sum()

    def select(self, losses, probs, feats, labels, rows, k: int) -> np.ndarray:
        """Positions (into this batch) of the k candidates to backpropagate; remembers
        each method's agreement with them for the next `observe`."""
        losses, probs, feats, labels, rows, k = _check_batch(losses, probs, feats, labels, rows, k)
        scores = self.scorer(losses, probs, feats, labels, rows, k)
        ranks = np.stack([normalised_ranks(scores[m]) for m in self.methods])
        keep = top_k(self.alpha @ ranks, k)
        kept = np.zeros(len(losses), bool)
        kept[keep] = True
        loss_rank = normalised_ranks(losses)
        own = [top_k(scores[m], k) for m in self.methods]
        overlap = np.array([kept[o].mean() for o in own])
        hardness = np.array([loss_rank[o].mean() - 0.5 for o in own])
        self._pending = (overlap, hardness)
        self._count(len(losses), k)
        return keep

    def observe(self, avg_loss: float, progress: float, before: float | None = None) -> np.ndarray:
        """Credit the last selection with a loss change; `progress` in [0, 1] is how far training is.

        With `before` (the kept rows' mean loss before the step) and `avg_loss` the same rows'
        loss after it, the change is the step's own effect (what the trainer passes); without
        it, the change since the previous observe's average. Returns the new alpha."""
        avg_loss = float(avg_loss)
        if not np.isfinite(avg_loss):
            raise SelectionError("AdaSelection.observe: the average loss is NaN or inf: training diverged")
        prev = self._prev_loss if before is None else float(before)
        if prev is not None and self._pending is not None:
            overlap, hardness = self._pending
            drop = (prev - avg_loss) / max(abs(prev), 1e-12)
            gamma = self.curriculum * (2.0 * float(np.clip(progress, 0.0, 1.0)) - 1.0)
            reward = self._advantage(drop) * overlap + gamma * hardness
            self._log_alpha = (1.0 - self.decay) * self._log_alpha + self.eta * reward
            self._log_alpha -= self._log_alpha.max()
            self.updates += 1
        self._prev_loss, self._pending = avg_loss, None
        return self.alpha

    def _advantage(self, drop: float) -> float:
        """How much better than usual this loss drop is, in running standard deviations."""
        if self._drop_mean is None:
            self._drop_mean = drop
            return 0.0
        dev = drop - self._drop_mean
        # the floor keeps a near-constant drop (selection settled) from amplifying rounding noise
        scale = np.sqrt(self._drop_var + (_SCALE_FLOOR * self._drop_mean) ** 2 + 1e-12)
        adv = float(np.clip(dev / scale, -3.0, 3.0)) if self._drop_var > 0 else 0.0
        self._drop_mean += _BASELINE_RATE * dev
        self._drop_var = (1 - _BASELINE_RATE) * (self._drop_var + _BASELINE_RATE * dev * dev)
        return adv

    def _before_select(self, losses: np.ndarray, progress: float) -> None:
        if not np.isfinite(losses).all():
            raise SelectionError("probe losses contain NaN or inf: training diverged (lower the learning rate)")

    def _after_step(self, view: ModelView, kept: np.ndarray, before: np.ndarray, progress: float) -> None:
        """Re-probe the kept rows: the step's effect on the same samples, not on the next random
        batch (whose sampling noise would swamp one step's loss change)."""
        self.observe(float(view.probe(kept).losses.mean(dtype=np.float64)), progress,
                     before=float(np.mean(before, dtype=np.float64)))

    def stats(self) -> dict:
        return {**super().stats(), "alpha": {m: float(a) for m, a in zip(self.methods, self.alpha)},
                "alpha_updates": self.updates}


def make_per_batch(name: str, fraction: float, **opts) -> Selector:
    """A per-batch selector by name: "adaselection" (opts: methods, eta, decay, curriculum) or a baseline."""
    if name == "adaselection":
        return AdaSelection(fraction, **opts)
    if name in BASELINES:
        if opts:
            raise SelectionError(f"per-batch method {name!r} takes no options (got {', '.join(opts)})")
        return PerBatch(name, fraction)
    raise SelectionError(f"per-batch method {name!r} is unknown: choose from adaselection, {', '.join(BASELINES)}")
