"""CREST: mini-batch coresets re-selected when a local quadratic model of the loss stops
holding (Yang, Kang & Mirzasoleiman, ICML 2023, "Towards Sustainable Learning: Coresets
for Data-efficient Deep Learning").

Each epoch takes ceil(fraction * N / B) steps of B samples, the backprop budget of a
static subset of fraction * N. Each step trains on a weighted mini-batch coreset:

- Selection: P random subsets of r = min(N_active, round(B / fraction)) rows are drawn
  from the active pool and probed; from each, per-class facility location (CRAIG) on
  last-layer gradients picks B rows, weighted by their cluster sizes scaled to average 1
  (classes get B in proportion to their counts in the subset). The P coresets are then
  trained on in turn.
- When to re-select: at selection, the loss on the union V of the random subsets gets a
  second-order model in the LAST LAYER's parameters (view.model.head): loss L0, gradient g
  and Hessian diagonal h. Restricting it to the head keeps it cheap (from the probe
  already made, no backward through the body) and the body's drift is exactly what the
  check should notice: every `check_every` steps V is re-probed, and when
  |actual - (L0 + g.d + 1/2 sum h d^2)| > tau * |L0|, d the head's move since selection,
  or every coreset has been used `max_reuse` times, the next step re-selects.
  hessian="exact" uses the closed form of a linear softmax head's Hessian diagonal;
  "hutchinson" estimates it with Rademacher probes through autograd's double backward
  (any head, noisier: off-diagonal terms leak in with few probes).
- Dropping learned samples: at each selection probe, a sample of V whose loss is below
  `drop_threshold` (an absolute cross-entropy: 0.05 means p(label) > 0.95) gets one more
  consecutive "learned" count, any other sample's count resets; samples counted
  `drop_after` times in a row leave the active pool at once (this selection's coresets
  skip them, unless that leaves a subset short of B rows). Only selection probes count
  (each follows more training, on a fresh random draw), not the quadratic checks; the
  pool never shrinks below B * P samples.

Forwards spent on probing are counted in the trainer's `probe_samples`: a selection and
each check probe |V| <= P * B / fraction rows, so with check_every=1 probing costs up to
P / fraction forwards per backpropagated sample; the default check_every = 4 (= P,
once per round of the coresets) brings that to about 1 / fraction, what a per-batch
selector spends, trading some responsiveness for fewer forwards.

Deterministic given view.seed: one np.random.default_rng(view.seed) draws the subsets,
the greedy maximisers' seeds and the Hutchinson probes.
"""

from __future__ import annotations

import math
import time
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from stages.kernels.coresets.facility import craig
from stages.kernels.gradients import bias_gradients_torch
from pipeline.sampling import budget_problem, proportional_allocation
from stages.learn.online.adaptive import FEATURES, gradient_features, require
from stages.learn.online.base import Batch, ModelView, Probe, Selector


# ----------------------------------------------------------------- quadratic model
def quadratic_loss_change(g: torch.Tensor, h: torch.Tensor, delta: torch.Tensor) -> float:
    """Predicted loss change g.d + 1/2 sum h d^2 of a move d: second-order Taylor with a
    diagonal Hessian h (exact for a separable quadratic)."""
    g, h, d = (torch.as_tensor(t, dtype=torch.float64) for t in (g, h, delta))
    return float(g @ d + 0.5 * (h * d * d).sum())


def head_vector(head: nn.Module) -> torch.Tensor:
    """The head's parameters as one detached float64 vector (weight row-major, then bias)."""
    return torch.cat([p.detach().reshape(-1).double() for p in head.parameters()])


def linear_head_curvature(probs: np.ndarray, feats: np.ndarray, labels: np.ndarray, *, bias: bool = True,
                          device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Exact gradient and Hessian diagonal of the mean cross-entropy of a linear softmax head
    z = W h + b w.r.t. [W.flatten(), b], from the softmax outputs and features (float64).

    dL/dW = mean (p - y) h^T and d2L/dW_cd^2 = mean p_c (1 - p_c) h_d^2 (bias: h_d = 1)."""
    p = torch.as_tensor(probs, dtype=torch.float64, device=device)
    x = torch.as_tensor(feats, dtype=torch.float64, device=device)
    n = len(p)
    e = bias_gradients_torch(p, labels)
    s = p * (1 - p)
    g, h = [(e.T @ x / n).reshape(-1)], [(s.T @ (x * x) / n).reshape(-1)]
    if bias:
        g.append(e.mean(0))
        h.append(s.mean(0))
    return torch.cat(g), torch.cat(h)


def hutchinson_diagonal(loss: torch.Tensor, params: list[torch.Tensor], probes: int,
                        gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient and a Hutchinson estimate E[v * Hv] of the Hessian diagonal (Rademacher v,
    Hv by double backward) of `loss` w.r.t. `params`, flattened like head_vector (float64)."""
    grads = torch.autograd.grad(loss, params, create_graph=True)
    est = [torch.zeros(p.numel(), dtype=torch.float64, device=p.device) for p in params]
    for _ in range(probes):
        vs = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p.device, p.dtype) for p in params]
        hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
        for e, v, hvi in zip(est, vs, hv):
            e += (v * hvi).reshape(-1).double()
    g = torch.cat([gi.detach().reshape(-1).double() for gi in grads])
    return g, torch.cat(est) / probes


# ----------------------------------------------------------------- selector
class Crest(Selector):
    """CREST mini-batch coresets (see the module docstring).

    subsets: P random subsets per selection; tau: tolerated deviation of the actual loss
    on V from the quadratic model, relative to |L0|; check_every: steps between checks;
    max_reuse: re-select after each coreset has been trained on this many times;
    drop_threshold / drop_after: learned samples leave the pool (drop_after=0: never);
    metric / optimizer / eps: the facility location's (stages.kernels.coresets.facility.craig);
    hessian: exact (linear head) or hutchinson, with hutchinson_probes probes.
    Use in a loop of one's own: `batch = crest.next_batch(view)`, one step, `crest.after_step(view)`.
    """

    name = "crest"

    def __init__(self, fraction: float, *, subsets: int = 4, tau: float = 0.05, check_every: int = 4,
                 max_reuse: int = 4, drop_threshold: float = 0.05, drop_after: int = 2,
                 metric: str = "euclidean", optimizer: str = "stochastic", eps: float = 0.01,
                 features: str = "last_layer", hessian: str = "exact", hutchinson_probes: int = 8):
        problem = budget_problem(fraction, counts=False, what="fraction")
        require(not problem, f"crest: {problem}")
        for key, val, low in (("subsets", subsets, 1), ("check_every", check_every, 1), ("max_reuse", max_reuse, 1),
                              ("drop_after", drop_after, 0), ("hutchinson_probes", hutchinson_probes, 1)):
            require(isinstance(val, int) and not isinstance(val, bool) and val >= low,
                    f"crest: {key} must be an integer >= {low}, got {val!r}")
        for key, val in (("tau", tau), ("drop_threshold", drop_threshold)):
            require(isinstance(val, (int, float)) and math.isfinite(val) and val >= 0,
                    f"crest: {key} must be a finite number >= 0, got {val!r}")
        require(metric in ("euclidean", "cosine"), f"crest: metric must be euclidean or cosine, got {metric!r}")
        require(optimizer in ("lazy", "stochastic"), f"crest: optimizer must be lazy or stochastic, got {optimizer!r}")
        require(isinstance(eps, float) and 0 < eps < 1, f"crest: eps must be in (0, 1), got {eps!r}")
        require(features in FEATURES, f"crest: features must be one of {', '.join(FEATURES)}, got {features!r}")
        require(hessian in ("exact", "hutchinson"), f"crest: hessian must be exact or hutchinson, got {hessian!r}")
        self.fraction, self.subsets, self.tau, self.check_every = float(fraction), subsets, float(tau), check_every
        self.max_reuse, self.drop_threshold, self.drop_after = max_reuse, float(drop_threshold), drop_after
        self.facility = {"metric": metric, "optimizer": optimizer, "eps": eps}
        self.features, self.hessian, self.hutchinson_probes = features, hessian, hutchinson_probes
        self._ready = False

    # ------------------------------------------------------------- state
    def setup(self, view: ModelView) -> None:
        super().setup(view)
        if self.hessian == "exact" and not isinstance(view.model.head, nn.Linear):
            raise ValueError(f"crest: hessian=exact needs an nn.Linear head, got {type(view.model.head).__name__} "
                             f"(use hessian=hutchinson)")
        self.gen = torch.Generator().manual_seed(int(self.rng.integers(2 ** 63)))
        self.active = np.ones(view.n, bool)
        self.batch_size = view.batch_size
        self.floor = view.batch_size * self.subsets  # the pool never shrinks below this
        self.low = np.zeros(view.n, np.int64)  # consecutive selection probes below drop_threshold
        self.coresets: list[Batch] = []
        self.cursor = 0  # steps since the last selection
        self.due = True  # re-select before the next step
        self.counts = {"selections": 0, "steps": 0, "dropped": 0, "checks": 0}
        self.seconds = {"selection_seconds": 0.0, "check_seconds": 0.0}
        self._ready = True

    def steps_per_epoch(self, view: ModelView) -> int:
        """ceil(fraction * N / B): a static fraction-subset's backprop budget, whatever is dropped."""
        return max(1, math.ceil(self.fraction * view.n / view.batch_size))

    # ------------------------------------------------------------- loop-free API
    def next_batch(self, view: ModelView) -> Batch:
        """The next weighted mini-batch coreset, re-selecting first when the last check asked for it."""
        if not self._ready:
            self.setup(view)
        if self.due:
            self._select(view)
        batch = self.coresets[self.cursor % len(self.coresets)]
        self.cursor += 1
        return batch

    def after_step(self, view: ModelView) -> None:
        """Call after the optimiser step on next_batch's batch: counts reuse and checks the quadratic model."""
        self.counts["steps"] += 1
        if self.cursor >= self.max_reuse * len(self.coresets):
            self.due = True
        elif self.cursor % self.check_every == 0:
            start = time.perf_counter()
            actual = float(view.probe(self.v_rows).losses.mean(dtype=np.float64))
            predicted = self.l0 + quadratic_loss_change(self.g, self.h, head_vector(view.model.head) - self.w0)
            self.due = abs(actual - predicted) > self.tau * abs(self.l0)
            self.counts["checks"] += 1
            self.seconds["check_seconds"] += time.perf_counter() - start

    def batches(self, epoch: int, view: ModelView) -> Iterator[Batch]:
        left = max(1, round(self.fraction * view.n))  # a static subset's backprops per epoch, not a batch more
        for _ in range(self.steps_per_epoch(view)):
            batch = self.next_batch(view)
            if left < len(batch.rows):
                batch = Batch(batch.rows[:left], None if batch.weights is None else batch.weights[:left])
            left -= len(batch.rows)
            yield batch
            self.after_step(view)

    def stats(self) -> dict:
        """Selections, steps, samples dropped as learned, quadratic checks, seconds spent on each."""
        if not self._ready:
            return {}
        return {**self.counts, **self.seconds, "active": int(self.active.sum())}

    # ------------------------------------------------------------- selection
    def _select(self, view: ModelView) -> None:
        """Draw P random subsets, probe them, pick a coreset from each, fit the quadratic model on their union."""
        start = time.perf_counter()
        pool = np.flatnonzero(self.active)
        r = min(len(pool), max(1, round(view.batch_size / self.fraction)))
        draws = [np.sort(self.rng.choice(pool, r, replace=False)) for _ in range(self.subsets)]
        self.v_rows = np.unique(np.concatenate(draws))
        probe = view.probe(self.v_rows)
        self._drop_learned(self.v_rows, probe.losses)
        self.coresets = [self._coreset(view, rows, _take(probe, np.searchsorted(self.v_rows, rows)))
                         for rows in map(self._still_active, draws)]
        self._fit_quadratic(view, probe)
        self.cursor, self.due = 0, False
        self.counts["selections"] += 1
        self.seconds["selection_seconds"] += time.perf_counter() - start

    def _still_active(self, rows: np.ndarray) -> np.ndarray:
        """A draw without the rows just dropped, unless too few would be left for a full mini-batch."""
        keep = rows[self.active[rows]]
        return keep if len(keep) >= min(self.batch_size, len(rows)) else rows

    def _coreset(self, view: ModelView, rows: np.ndarray, probe: Probe) -> Batch:
        """B rows of one random subset by per-class facility location, weights = cluster sizes with mean 1."""
        labels = view.labels[rows]
        size = min(view.batch_size, len(rows))
        alloc = proportional_allocation(np.bincount(labels, minlength=view.num_classes), size)
        feats = gradient_features(probe, labels, view.device, self.features)
        picks, w, _ = craig(feats, labels, alloc, seed=int(self.rng.integers(2 ** 31)), **self.facility)
        w = w.astype(np.float64)
        return Batch(rows[picks], (w * (len(w) / w.sum())).astype(np.float32))

    def _fit_quadratic(self, view: ModelView, probe: Probe) -> None:
        """L0, g and the Hessian diagonal of the mean loss on V w.r.t. the head, at the head's current value."""
        head, labels = view.model.head, view.labels[self.v_rows]
        self.l0 = float(probe.losses.mean(dtype=np.float64))
        self.w0 = head_vector(head)
        if self.hessian == "exact":
            self.g, self.h = linear_head_curvature(probe.probs, probe.feats, labels, bias=head.bias is not None,
                                                   device=self.w0.device)
            return
        feats = torch.as_tensor(probe.feats, device=view.device)
        params = [p for p in head.parameters()]
        loss = F.cross_entropy(head(feats).float(), torch.as_tensor(labels, device=view.device))
        self.g, self.h = hutchinson_diagonal(loss, params, self.hutchinson_probes, self.gen)

    def _drop_learned(self, rows: np.ndarray, losses: np.ndarray) -> None:
        """Count consecutive low-loss probes; rows low for drop_after probes leave the pool (lowest loss first)."""
        if self.drop_after == 0:
            return
        low = losses < self.drop_threshold
        self.low[rows] = np.where(low, self.low[rows] + 1, 0)
        done = (self.low[rows] >= self.drop_after) & self.active[rows]
        room = int(self.active.sum()) - self.floor
        if room <= 0 or not done.any():
            return
        cand = rows[done][np.argsort(losses[done], kind="stable")][:room]
        self.active[cand] = False
        self.counts["dropped"] += len(cand)


def _take(probe: Probe, idx: np.ndarray) -> Probe:
    return Probe(probe.losses[idx], probe.probs[idx], probe.feats[idx])
