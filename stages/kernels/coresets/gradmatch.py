"""GRAD-MATCH (Killamsetty et al. 2021): a weighted subset whose gradient matches the full data's.

Orthogonal matching pursuit (OMP) picks samples one at a time and gives them weights
w >= 0 so that sum_j w_j g_j approximates the target gradient, with a ridge term
lam * ||w||^2 that keeps weights bounded when picked gradients are nearly collinear.
Weights must be non-negative because the trainer uses them as per-sample loss weights.

The greedy loop solves the unconstrained ridge problem on the support (an incremental
inverse Cholesky factor, O(m^2) per pick); non-negativity is then enforced exactly with an
active-set NNLS. Atoms NNLS sets to zero are dropped and barred, and the greedy loop
resumes from the new residual, so the budget is spent on atoms that keep a weight.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.errors import CurateError

_MAX_ROUNDS = 10  # greedy + NNLS rounds in omp_nonneg; each round bars the atoms NNLS dropped
_PDAS_STEPS = 30  # primal-dual warm-start steps in _nnls_gram (0: plain Lawson-Hanson)
MAX_SUPPORT = 32768  # atoms one OMP run holds (its k x k float64 factor is 8 GiB); the rest is topped up


def _check_finite(x: np.ndarray, what: str) -> None:
    ok = np.isfinite(x)
    if not ok.all():
        bad = int(np.flatnonzero(~ok.reshape(len(x), -1).all(1))[0])
        raise CurateError(f"gradmatch: {what} row {bad} is NaN or infinite")


def _check_settings(lam: float, tol: float) -> None:
    if not lam >= 0:
        raise CurateError(f"gradmatch: lam must be >= 0, got {lam}")
    if not tol >= 0:
        raise CurateError(f"gradmatch: tol must be >= 0, got {tol}")


def _spd_solve(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Solve g x = h for symmetric positive (semi)definite g; least squares if it is singular."""
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return torch.cholesky_solve(h[:, None], chol)[:, 0]
    # singular (lam = 0 and dependent atoms): gelsd handles rank deficiency; CUDA's gels does not
    return torch.linalg.lstsq(g.cpu(), h[:, None].cpu(), driver="gelsd").solution[:, 0].to(g.device)


def _nnls_gram(g: torch.Tensor, h: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """Exact argmin_{w >= 0} 1/2 w^T g w - h^T w for positive definite g (float64).

    A few primal-dual active-set steps from the unconstrained solution w0 usually find the
    optimal free set at once (they swap many indices per solve, unlike Lawson-Hanson's one);
    a primal active-set method (Lawson-Hanson from a feasible start) then finishes and
    certifies the result by the KKT conditions, so PDAS cycling can never give a wrong answer.
    """
    m = h.shape[0]
    x = torch.zeros_like(h)
    if m == 0:
        return x
    free = w0 > 0
    for _ in range(_PDAS_STEPS):
        x = torch.zeros_like(h)
        if free.any():
            x[free] = _spd_solve(g[free][:, free], h[free])
        new = (x - (g @ x - h)) > 0
        if torch.equal(new, free):
            break
        free = new
    x = x.clamp_min(0)
    passive = x > 0
    tol_g = 1e-10 * float(h.abs().max() + g.abs().max() * x.abs().max())
    for _ in range(3 * m + 20):
        added = None
        while True:
            # minimise on the passive set; if that leaves the feasible set, step to its edge
            z = torch.zeros_like(h)
            if passive.any():
                z[passive] = _spd_solve(g[passive][:, passive], h[passive])
            bad = passive & (z <= 0)
            if not bad.any():
                x = z
                break
            if added is not None and bool(bad[added]) and float(x[added]) == 0.0:
                return x  # numerically at the optimum: the entering index cannot move
            ratio = torch.full_like(h, math.inf)
            ratio[bad] = x[bad] / (x[bad] - z[bad])
            j = int(torch.argmin(ratio))
            x = x + ratio[j] * (z - x)
            x[j] = 0.0
            passive &= x > 0
            x[~passive] = 0.0
            added = None
        grad = h - g @ x  # minus the gradient: > 0 means raising w_j lowers the objective
        grad[passive] = -math.inf
        j = int(torch.argmax(grad))
        if float(grad[j]) <= tol_g:
            return x
        passive[j] = True
        added = j
    return x


class _Omp:
    """Greedy state: float32 atoms on `device` for correlations; float64 support rows and the
    inverse Cholesky factor of their ridge Gram matrix (preallocated k x k).

    With G = L L^T, the factor is kept as Linv = L^-1: each pick then costs three
    matrix-vector products, O(m^2), and works on the leading block of the buffer in place
    (torch's triangular solve copies such strided blocks, which costs more than the solve).
    """

    def __init__(self, a_np: np.ndarray, b_np: np.ndarray, k: int, lam: float, device):
        self.dev = torch.device(device)
        self.a_np = a_np
        self.lam = float(lam)
        self.at = torch.as_tensor(a_np, dtype=torch.float32, device=self.dev)
        self.b = torch.as_tensor(b_np, dtype=torch.float64, device=self.dev)
        self.bnorm = float(torch.linalg.vector_norm(self.b))
        n, d = a_np.shape
        self.k = min(k, MAX_SUPPORT)
        self.barred = torch.zeros(n, dtype=torch.bool, device=self.dev)  # picked or dropped
        self._alloc(min(self.k, 256), d)
        self.idx: list[int] = []
        self.w = torch.zeros(0, dtype=torch.float64, device=self.dev)
        self.r = self.b.clone()

    def _alloc(self, cap: int, d: int) -> None:
        """(Re)allocate the support buffers for `cap` atoms, keeping what they hold: they grow
        by doubling, so memory follows the support OMP actually reaches, not the budget."""
        f64 = dict(dtype=torch.float64, device=self.dev)
        old = getattr(self, "rows", None)
        new = {"rows": torch.zeros(cap, d, **f64), "linv": torch.zeros(cap, cap, **f64),  # L^-1, lower triangular
               "y": torch.zeros(cap, **f64), "h": torch.zeros(cap, **f64)}  # L^-1 h, rows @ b
        if old is not None:
            m = len(old)
            new["rows"][:m] = self.rows
            new["linv"][:m, :m] = self.linv
            new["y"][:m], new["h"][:m] = self.y, self.h
        self.rows, self.linv, self.y, self.h = new["rows"], new["linv"], new["y"], new["h"]

    @property
    def m(self) -> int:
        return len(self.idx)

    def rel_residual(self) -> float:
        return float(torch.linalg.vector_norm(self.r)) / self.bnorm

    def _add(self, j: int) -> bool:
        """Extend the factor of rows rows^T + lam I by atom j; False if j is (numerically) dependent."""
        m = self.m
        if m == len(self.rows):
            self._alloc(min(self.k, 2 * m), self.rows.shape[1])
        a = torch.as_tensor(self.a_np[j], dtype=torch.float64, device=self.dev)
        diag = float(a @ a) + self.lam
        li = self.linv[:m, :m]
        l = li @ (self.rows[:m] @ a)  # L^-1 g, g = Gram column of a
        d2 = diag - float(l @ l)
        if not d2 > 1e-10 * diag:
            return False
        d = math.sqrt(d2)
        hj = a @ self.b
        # [[L, 0], [l^T, d]]^-1 = [[L^-1, 0], [-l^T L^-1 / d, 1 / d]]
        self.linv[m, :m] = (l @ li) / -d
        self.linv[m, m] = 1.0 / d
        self.y[m] = (hj - l @ self.y[:m]) / d
        self.h[m] = hj
        self.rows[m] = a
        self.idx.append(j)
        return True

    def _solve(self) -> None:
        m = self.m
        self.w = self.y[:m] @ self.linv[:m, :m]  # L^-T L^-1 h = G^-1 h
        self.r = self.b - self.w @ self.rows[:m]

    def greedy(self, tol: float) -> int:
        """Pick atoms until k are held, the relative residual is <= tol, or none correlates positively."""
        added = 0
        while self.m < self.k and self.rel_residual() > tol:
            corr = self.at @ self.r.to(torch.float32)
            corr.masked_fill_(self.barred, -math.inf)
            while True:
                j = int(torch.argmax(corr))
                if not float(corr[j]) > 0:
                    return added
                self.barred[j] = True
                if self._add(j):
                    break
                corr[j] = -math.inf  # numerically dependent on the support: try the next best
            added += 1
            self._solve()
        return added

    def gram(self) -> torch.Tensor:
        m = self.m
        g = self.rows[:m] @ self.rows[:m].T
        g.diagonal().add_(self.lam)
        return g

    def nonneg(self) -> torch.Tensor:
        """Exact NNLS weights on the support (float64)."""
        return _nnls_gram(self.gram(), self.h[:self.m].clone(), self.w)

    def keep(self, mask: torch.Tensor) -> None:
        """Shrink the support to `mask` (dropped atoms stay barred) and refactor from scratch."""
        sel = torch.nonzero(mask).flatten()
        self.idx = [self.idx[i] for i in sel.tolist()]
        m = len(self.idx)
        self.rows[:m] = self.rows[sel].clone()
        self.h[:m] = self.h[sel].clone()
        self.linv.zero_()
        if m:
            chol = torch.linalg.cholesky(self.gram())
            eye = torch.eye(m, dtype=torch.float64, device=self.dev)
            self.linv[:m, :m] = torch.linalg.solve_triangular(chol, eye, upper=False)
            self.y[:m] = self.linv[:m, :m] @ self.h[:m]
        self._solve()


def omp_nonneg(A, b, k: int, *, lam: float = 0.05, tol: float = 1e-5,
               device="cpu") -> tuple[np.ndarray, np.ndarray, float]:
    """Non-negative OMP: sparse w >= 0 with A[idx].T @ w ~ b, ridge penalty lam ||w||^2.

    A: [n, D] atoms (rows), b: [D] target. Returns (idx int64 [m] in pick order, weights
    float32 [m] all > 0, relative residual ||A[idx].T @ w - b|| / ||b||), m <= k. Each
    step picks the unpicked atom most positively correlated with the residual; the loop
    stops at k atoms, at relative residual <= tol (judged on the unconstrained ridge fit),
    or when no atom correlates positively. The returned weights are the exact ridge NNLS
    solution on the returned support.
    """
    a_np, b_np = np.asarray(A), np.asarray(b)
    if a_np.ndim != 2 or b_np.ndim != 1 or a_np.shape[1] != b_np.shape[0]:
        raise CurateError(f"gradmatch: atoms must be [n, D] and target [D], got {a_np.shape} and {b_np.shape}")
    if k < 0:
        raise CurateError(f"gradmatch: k must be >= 0, got {k}")
    _check_settings(lam, tol)
    _check_finite(a_np, "atom")
    if not np.isfinite(b_np).all():
        raise CurateError("gradmatch: the target gradient is NaN or infinite")
    empty = np.zeros(0, np.int64), np.zeros(0, np.float32)
    k = min(int(k), len(a_np))
    if not np.any(b_np):
        return *empty, 0.0
    if k == 0:
        return *empty, 1.0
    st = _Omp(a_np, b_np, k, lam, device)
    w = st.w
    for _ in range(_MAX_ROUNDS):
        added = st.greedy(tol)
        w = st.nonneg()
        # weights too small to matter (or to survive float32) count as zero
        keep = w > (1e-12 * float(w.max()) if len(w) else 0.0)
        if bool(keep.all()):
            break
        st.keep(keep)
        w = w[keep]
        if added == 0 or st.m >= k:
            break
    idx = np.asarray(st.idx, np.int64)
    r = st.b - (w @ st.rows[:st.m] if st.m else 0.0)
    res = float(torch.linalg.vector_norm(r)) / st.bnorm
    return idx, w.cpu().numpy().astype(np.float32), res


def _augment(g: np.ndarray, count: int, total: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Atoms [g / s, 1] and target [total / s, count] (total defaults to sum g): matching the extra coordinate makes the
    weights sum to about `count`. s is the mean gradient norm (1 if that is 0): atoms of
    typical norm 1 make the count coordinate weigh like a typical gradient and make `lam`
    mean the same whatever the gradients' scale (scaling both sides leaves w unchanged)."""
    s = float(np.sqrt(np.einsum("ij,ij->i", g, g, dtype=np.float64)).mean()) if len(g) else 0.0
    s = s if s > 0 else 1.0
    atoms = np.empty((len(g), g.shape[1] + 1), np.float32)
    atoms[:, :-1] = g / s
    atoms[:, -1] = 1.0
    total = g.sum(0, dtype=np.float64) if total is None else np.asarray(total, np.float64)
    target = np.append(total / s, float(count))
    return atoms, target


def _class_rows(grads, members: np.ndarray) -> np.ndarray:
    """One class's gradients as an array: a slice of an array, or built from a factored
    feature space (stages.kernels.coresets.features), so the full N x D matrix never has to exist."""
    if isinstance(grads, np.ndarray):
        return grads[members]
    g = grads.take(members).dense().cpu().numpy()
    bad = ~np.isfinite(g).all(1)
    if bad.any():
        raise CurateError(f"gradmatch: gradient row {int(members[np.flatnonzero(bad)[0]])} is NaN or infinite")
    return g


def gradmatch_per_class(grads, labels: np.ndarray, alloc: np.ndarray, *, lam: float = 0.05,
                        tol: float = 1e-5, seed: int = 0, device="cpu") -> tuple[np.ndarray, np.ndarray, dict]:
    """GRAD-MATCH per class: alloc[c] rows of class c whose weighted gradients match the class's sum.

    grads: [N, D] per-sample gradients (e.g. of the last layer), or a feature space from
    stages.kernels.coresets.features that builds them one class at a time; labels int64 [N] in 0..C-1,
    alloc int64 [C] rows to pick per class. Returns (rows int64 [sum(alloc)], weights
    float32, info).

    The trainer minimises the weight-normalised loss sum(w_i l_i) / sum(w_i), so a
    subset only follows the full gradient if the weights also carry the class's size:
    every atom gets an extra constant coordinate s and the target n_c * s, so OMP
    matches the gradient sum and the count together, and a class's weights sum to
    about n_c (classes keep their relative influence).

    When OMP stops short (tolerance reached, NNLS dropped atoms, or MAX_SUPPORT atoms held),
    the class is topped up with random unpicked rows of weight 1.0, drawn with
    np.random.default_rng(seed + c), so every class returns exactly alloc[c] rows (and a class's
    picks do not depend on the other classes: select_part units run classes apart). The class's
    weights are then scaled to sum exactly to n_c, as CRAIG's do: random top-ups are
    unbiased, so this keeps the class's mean gradient and its share of the total. Order:
    class by class (ascending id), within a class OMP pick order, then the top-ups.

    info: omp_selected (rows picked by OMP), topped_up (random top-ups), omp_per_class
    {c: rows OMP picked}, residual_per_class {c: relative residual of the augmented
    (gradient, count) target}.
    """
    labels, alloc = np.asarray(labels), np.asarray(alloc)
    if isinstance(grads, np.ndarray):
        if grads.ndim != 2 or labels.shape != (len(grads),):
            raise CurateError(f"gradmatch: gradients must be [N, D] with N labels, got {grads.shape} and {labels.shape}")
        _check_finite(grads, "gradient")
    elif labels.shape != (len(grads),):
        raise CurateError(f"gradmatch: {len(grads)} gradients but labels of shape {labels.shape}")
    _check_settings(lam, tol)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(alloc)):
        raise CurateError(f"gradmatch: labels must be in 0..{len(alloc) - 1} (one alloc entry per class), "
                          f"got {int(labels.min())}..{int(labels.max())}")
    sizes = np.bincount(labels, minlength=len(alloc)) if len(labels) else np.zeros(len(alloc), np.int64)
    for c, (want, have) in enumerate(zip(alloc.tolist(), sizes.tolist())):
        if not 0 <= want <= have:
            raise CurateError(f"gradmatch: alloc for class {c} is {want} but the class has only {have} samples"
                              if want > have else f"gradmatch: alloc for class {c} must be >= 0, got {want}")
    out_rows, out_w = [], []
    info = {"omp_selected": 0, "topped_up": 0, "omp_per_class": {}, "residual_per_class": {}}
    for c, want in enumerate(alloc.tolist()):
        if want == 0:
            continue
        members = np.flatnonzero(labels == c)
        atoms, target = _augment(_class_rows(grads, members), len(members))
        idx, w, res = omp_nonneg(atoms, target, want, lam=lam, tol=tol, device=device)
        rest = np.setdiff1d(np.arange(len(members)), idx)
        extra = np.random.default_rng(seed + c).choice(rest, want - len(idx), replace=False) \
            if want > len(idx) else np.zeros(0, np.int64)  # seeded per class: a class's rows do not depend on the others
        cw = np.concatenate([w, np.ones(len(extra), np.float32)]).astype(np.float64)
        out_rows += [members[idx], members[extra]]
        out_w.append((cw * (len(members) / cw.sum())).astype(np.float32))
        info["omp_selected"] += len(idx)
        info["topped_up"] += len(extra)
        info["omp_per_class"][c] = len(idx)
        info["residual_per_class"][c] = res
    if not out_rows:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), info
    return np.concatenate(out_rows).astype(np.int64), np.concatenate(out_w).astype(np.float32), info


def gradmatch_per_batch(grads: np.ndarray, k: int, *, batch_size: int, lam: float = 0.05, tol: float = 1e-5,
                        seed: int = 0, device="cpu") -> tuple[np.ndarray, np.ndarray, dict]:
    """GRAD-MATCHPB: match the full gradient with weighted whole mini-batches, k rows in all.

    A seeded permutation splits the N rows into mini-batches of batch_size (the last may be
    smaller: batch i is np.random.default_rng(seed).permutation(N)[i * batch_size:][:batch_size]);
    atoms are batch mean gradients and the target is the full mean gradient times the number
    of batches B, with the same count coordinate as gradmatch_per_class, so batch weights sum
    to about B (and row weights to about N). OMP picks up to ceil(k / batch_size) batches; each
    contributes its rows with its weight repeated (times batch_size / its size for a short
    batch, since OMP weighed its mean). A shortfall is topped up with random unpicked whole
    batches, rows at weight 1.0. The list (OMP batches heaviest first, so a cut falls on the
    lightest, then top-ups) is cut to exactly k rows: only the last batch may be partial.
    Row weights are then scaled to sum exactly to N (a uniform factor: the weighted mean
    gradient the trainer follows is unchanged).

    info: omp_selected / topped_up (rows returned from each), omp_batches / topped_up_batches
    (batches contributing rows), residual (relative, of the augmented target).
    """
    grads = np.asarray(grads)
    if grads.ndim != 2:
        raise CurateError(f"gradmatch: gradients must be [N, D], got {grads.shape}")
    n = len(grads)
    if not 0 <= k <= n:
        raise CurateError(f"gradmatch: k must be in 0..{n} (the number of samples), got {k}")
    if batch_size < 1:
        raise CurateError(f"gradmatch: batch_size must be >= 1, got {batch_size}")
    _check_settings(lam, tol)
    _check_finite(grads, "gradient")
    info = {"omp_selected": 0, "topped_up": 0, "omp_batches": 0, "topped_up_batches": 0, "residual": 0.0}
    if k == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), info
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    batches = [perm[s:s + batch_size] for s in range(0, n, batch_size)]
    means = np.stack([grads[bt].mean(0, dtype=np.float64) for bt in batches]).astype(np.float32)
    atoms, target = _augment(means, len(batches), total=len(batches) * grads.mean(0, dtype=np.float64))
    idx, w, res = omp_nonneg(atoms, target, math.ceil(k / batch_size), lam=lam, tol=tol, device=device)
    info["residual"] = res
    heavy = np.argsort(-w, kind="stable")  # heaviest first, so a cut falls on the lightest batch
    order = [(int(idx[i]), float(w[i]), True) for i in heavy]
    rest = np.setdiff1d(np.arange(len(batches)), idx)
    order += [(int(j), 1.0, False) for j in rng.permutation(rest)]
    rows, weights, total = [], [], 0
    for j, wj, by_omp in order:
        if total >= k:
            break
        part = batches[j][:k - total]
        rows.append(part)
        # OMP weighs batch means, so a row of the short last batch stands for more of it
        weights.append(np.full(len(part), wj * batch_size / len(batches[j]) if by_omp else 1.0, np.float32))
        total += len(part)
        info["omp_selected" if by_omp else "topped_up"] += len(part)
        info["omp_batches" if by_omp else "topped_up_batches"] += 1
    weights = np.concatenate(weights).astype(np.float64)
    return np.concatenate(rows).astype(np.int64), (weights * (n / weights.sum())).astype(np.float32), info


def matching_error(grads, rows: np.ndarray, weights: np.ndarray, block: int = 65536) -> float:
    """|| sum_j w_j g_j / sum_j w_j - mean_i g_i ||: how far the weighted subset's mean gradient
    (what weight-normalised training follows) is from the full data's mean gradient.
    grads: an [N, D] array or a feature space (built a block of rows at a time)."""
    w = np.asarray(weights, np.float64)
    rows = np.asarray(rows, np.int64)
    if len(rows) != len(w) or not w.sum() > 0:
        raise CurateError("gradmatch: matching_error needs one weight per row and a positive weight sum")

    def part(idx):
        return _class_rows(grads, idx).astype(np.float64)

    n = len(grads)
    full = sum(part(np.arange(s, min(n, s + block))).sum(0) for s in range(0, n, block)) / n
    sub = sum(w[s:s + block] @ part(rows[s:s + block]) for s in range(0, len(rows), block)) / w.sum()
    return float(np.linalg.norm(sub - full))
