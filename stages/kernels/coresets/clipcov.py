"""Selection kernels for image-caption data: ClipCov, SAS, CLIP-score filtering, k-means
pseudo-classes, and the cross-covariance they are judged by.

Inputs: `img`, `txt` [N, D] L2-normalised embeddings (float16/32; row i = image i and its
caption i), `groups` [N] pseudo-class ids >= 0, `alloc` [G] picks per group. Plain functions of
arrays (numpy in, numpy out), torch on `device` for the heavy parts; no randomness except where
a `seed` says so.

ClipCov (Joshi, Jain, Payani, Mirzasoleiman, AISTATS 2024, arXiv 2403.12267)
------------------------------------------------------------------------------
The paper shows that a subset S generalises like the full data V when its image-caption
cross-covariance C_S = mean_{j in S} x_j^I (x_j^T)^T stays close to C_V, and selects per
latent class V_l (pseudo-labels). Sources used here: the abstract and the authors' released
selection notebook; the method section itself could not be consulted, so its greedy is known
to us as a reading: a candidate gains its alignment with its class's cross-modal statistics
(sum_{i in V_l} <x_i^I, x_j^T>, plus the symmetric term) minus a penalty for similarity to
pairs already chosen (a squared cross-modal inner product), so that near-copies are not both
chosen. The notebook ranks by precomputed class-alignment scores plus twice the pair's own
image-caption cosine ("easiness") and a caption-to-class-name similarity, minus similarities
to centres, and every 200 picks of a class deducts the (positive-part, not squared)
cross-modal similarities to the pairs just chosen.

What we implement, per group l with budget k = alloc[l] (u_j = x_j^I, v_j = x_j^T):

    F_l(S) = sum_{j in S} c_j  -  lam / (2k) * sum_{j != j' in S} K(j, j')

    c_j      = <u_j v_j^T, C_A>_F = (1/|A|) sum_{i in A} <u_i, u_j> <v_i, v_j>
    K(j, j') = <u_j v_j^T, u_j' v_j'^T>_F = <u_j, u_j'> <v_j, v_j'>
    C_A      = (1/|A|) sum_{i in A} u_i v_i^T, A = the group's aligned pairs (below)

c_j is the alignment of pair j's outer product with the class's cross-covariance (the paper's
first term; a pair whose caption belongs to another class lacks it), K is the redundancy of two
pairs (1 for exact copies). With lam = 1 and |S| = k this is exactly

    F_l(S) = k/2 * ||C_A||_F^2 + 1/2 - k/2 * ||C_S - C_A||_F^2     (unit rows),

so the greedy is the exact greedy for the Frobenius error of the group's cross-covariance.
lam > 1 trades fidelity for more diversity, lam = 0 ranks by alignment alone (near-copies of
a well-aligned pair are then all taken).

Where this departs from the paper, and why:
- The paper writes its terms with cross-modal inner products <u_i, v_j> (and a squared one for
  redundancy). We use the exact Frobenius expansion instead, whose inner products are within
  a modality. Where image and caption embeddings coincide (u_j ~ v_j) the two agree; with a
  modality gap (real CLIP: matched pairs at cos ~0.3) cross-modal products are nearly constant
  across candidates. On generated data the cross-modal form (linear alignment, squared
  redundancy, same lam / 2k scaling) kept the cross-covariance worse than a random subset at
  lam = 0.5 and 1 on every set we tried, and better only for some (lam, data) pairs, while the
  expansion above does better than random at lam = 1 throughout (0.6-0.9x its error).
- Quality: preserving the covariance of a group that holds mismatched pairs would keep them
  in proportion. Like the paper (whose point is quality over quantity) we do not. A pair is
  "misaligned" when its CLIP score s_j = <u_j, v_j> is both
    closer to an unrelated caption than to the group's typical pair: s_j < (b + median_l) / 2,
    and an outlier of the group: s_j < median_l - gate * 1.4826 * MAD_l,
  with median_l and MAD_l the group's median pair score and median absolute deviation, and
  b = <mean u, mean v> the expected score of an unrelated caption (the mean over all image-
  caption combinations of the data; it absorbs the modality gap). Misaligned pairs are left
  out of C_A and picked only when a group has too few aligned pairs for its budget (then last,
  in greedy order). No pair is flagged in a group whose median pair is no better than an
  unrelated one; gate=None turns the rule off. This replaces the authors' easiness bonus: as a
  linear bonus it also reorders the well-aligned pairs, which biased the subset's covariance
  on generated data (more so with a modality gap), while the rule above only removes outliers
  and leaves clean data as it is.
- Quality pool (`pool_factor`, off in the kernel, 1.5 in the select spec): with budget to spare
  (30% of data that is 70% clean), the outlier rule alone still lets the ambiguous middle in;
  each group then picks among its ceil(pool_factor * k) best-scored aligned pairs first, close
  to the notebook's ranking by the pair's own similarity, but applied as a pool the covariance
  greedy chooses from rather than as a bonus that reorders it.
- No cross-class terms: groups are independent (selection per class runs in parallel); the
  notebook's centre and class-name terms are left out (class-name text is not an input).

Weights are 1.0: a group's picks are proportional to its size (the caller's alloc), so C_S is
already the unweighted mean, and ClipCov trains on the subset as is.

Computation: groups are batched into buckets of similar size (bucket_plan: padded, at most BLOCK_ELEMS
floats per modality, a group larger than that alone), data on `device` in float32. Per bucket
the linear terms cost one batched product (via C_A [D, D], or the n x n Gram matrices when a
group has fewer than D pairs), then the greedy runs on each group's candidates only: its quality
pool where that holds the group's budget (m = ceil(pool_factor * k) pairs; exact, since the greedy
picks nowhere else then), else all its pairs. Each step takes the best candidate of every group at
once and updates all gains exactly with one redundancy row, read from the candidates' m x m
matrix K (built once, while a bucket's fits in GRAM_ELEMS) or else computed by two batched
mat-vecs: memory O(n D + m^2) per group, never N x N; ties go to the lower row. Time: one
O(n D^2 + m^2 D) pass per group, so 10% of 1M pairs in 10 groups costs seconds, not the
O(k n D) of updating every pair at every step.

SAS (Joshi & Mirzasoleiman, ICML 2023)
--------------------------------------
SAS keeps, per latent class, the examples whose augmentations are most similar to the rest of
the class (the paper proves these contribute most to contrastive SSL, and that they are the
least useful for supervised learning). Its set function, as in the authors' release, is

    F(S) = sum_{j in S} sum_{i in V_l} s_ij  -  sum_{j < j' in S} s_jj'

with s the expected similarity of augmented views (estimated from mean embeddings over views,
which is what the caller passes as `feats`), maximised by a greedy (the paper refines it by a
double greedy, as F can be non-monotone). We use s = (1 + cos) / 2, the cosine similarity of
stages.kernels.coresets.facility, in both terms, where the authors clip the first term at cos > 0 and
use raw cosines in the second: with s >= 0 a candidate's gain is its similarity to the members
not yet chosen (itself included), so F is monotone submodular, the lazy/stochastic greedy of
stages.kernels.coresets.facility apply as they are (1 - 1/e), and no double greedy is needed; both
terms are inner products with summed rows, O(n D) per group, no n x n matrix.
We do not use facility location itself (max over S instead of the sum): it rewards covering a
point nobody covers yet, so it picks isolated outliers early, the opposite of SAS (measured on
generated data: most outliers chosen at a 30% budget, none with the objective above).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.errors import CurateError

ROW_BLOCK = 8192  # rows per block in host-side passes (finiteness, scores, covariances)
BLOCK_ELEMS = 1 << 25  # floats per modality in one bucket of groups (padded [B, n_max, D])
GRAM_ELEMS = 1 << 28  # clipcov keeps a bucket's candidate redundancy matrices (1 GiB float32) up to this size


# ----------------------------------------------------------------- validation
def _matrix(name: str, what: str, x) -> np.ndarray:
    """x checked [N, D], finite, floats. An array-like that reads rows on demand (pipeline.npy.NpyRows:
    x[a:b], x[rows], shape, dtype) is checked block by block and passed on as it is."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "__getitem__")):
        x = np.asarray(x)
    if x.ndim != 2:
        raise CurateError(f"{name}: {what} must be [N, D], got shape {x.shape}")
    if x.dtype.kind != "f":
        x = x.astype(np.float32)
    for s in range(0, len(x), ROW_BLOCK):
        bad = ~np.isfinite(x[s:s + ROW_BLOCK]).all(1)
        if bad.any():
            raise CurateError(f"{name}: {what} row {s + int(np.flatnonzero(bad)[0])} is NaN or infinite")
    return x


def _pairs(name: str, img, txt) -> tuple[np.ndarray, np.ndarray]:
    img, txt = _matrix(name, "img", img), _matrix(name, "txt", txt)
    if img.shape != txt.shape:
        raise CurateError(f"{name}: img {img.shape} and txt {txt.shape} must have the same shape")
    return img, txt


def _groups(name: str, groups, alloc, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(groups, alloc, counts) as int64, checked: one id >= 0 per row, alloc covers every id and
    no group is asked for more than it has."""
    g, a = np.asarray(groups), np.asarray(alloc)
    if g.shape != (n,):
        raise CurateError(f"{name}: groups must be [N] = [{n}], got shape {g.shape}")
    if a.ndim != 1:
        raise CurateError(f"{name}: alloc must be [G], got shape {a.shape}")
    if (n and g.dtype.kind not in "iu") or (len(a) and a.dtype.kind not in "iu"):
        raise CurateError(f"{name}: groups and alloc must be integers, got {g.dtype} and {a.dtype}")
    g, a = g.astype(np.int64), a.astype(np.int64)
    if n and g.min() < 0:
        raise CurateError(f"{name}: group ids must be >= 0, row {int(np.argmax(g < 0))} has {int(g.min())}")
    if (a < 0).any():
        raise CurateError(f"{name}: alloc must be >= 0, group {int(np.argmax(a < 0))} has {int(a.min())}")
    if n and g.max() >= len(a):
        raise CurateError(f"{name}: group {int(g.max())} has no entry in alloc (alloc has {len(a)} groups)")
    counts = np.bincount(g, minlength=len(a))
    over = np.flatnonzero(a > counts)
    if len(over):
        c = int(over[0])
        raise CurateError(f"{name}: group {c} has {counts[c]} samples, fewer than its allocation {a[c]}")
    return g, a, counts


def _members(groups: np.ndarray, n_groups: int) -> list[np.ndarray]:
    """Rows of each group, ascending."""
    order = np.argsort(groups, kind="stable")
    bounds = np.searchsorted(groups[order], np.arange(n_groups + 1))
    return [order[bounds[c]:bounds[c + 1]] for c in range(n_groups)]


# ----------------------------------------------------------------- cross-covariance
def cross_covariance(img, txt, rows=None, weights=None) -> np.ndarray:
    """sum_i w_i x_i^I (x_i^T)^T / sum_i w_i over `rows` (default all; weights default 1), [D, D]
    float64."""
    img, txt = _pairs("cross_covariance", img, txt)
    return _cross_cov(img, txt, rows, weights)


def _cross_cov(img, txt, rows=None, weights=None) -> np.ndarray:
    """cross_covariance of pairs already checked by _pairs."""
    rows = np.arange(len(img)) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(rows) and (rows.min() < 0 or rows.max() >= len(img)):
        raise CurateError(f"cross_covariance: rows must lie in [0, {len(img)})")
    w = np.ones(len(rows)) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(w) != len(rows):
        raise CurateError(f"cross_covariance: {len(w)} weights for {len(rows)} rows")
    if not np.isfinite(w).all() or w.sum() <= 0:
        raise CurateError("cross_covariance: weights must be finite with a positive sum")
    c = np.zeros((img.shape[1], img.shape[1]))
    for s in range(0, len(rows), ROW_BLOCK):
        r = rows[s:s + ROW_BLOCK]
        u = img[r].astype(np.float32) * w[s:s + ROW_BLOCK, None].astype(np.float32)
        c += u.T @ txt[r].astype(np.float32)  # float32 block products, float64 accumulation
    return c / w.sum()


def cross_cov_error(img, txt, rows, weights=None) -> float:
    """||C_S - C_V||_F / ||C_V||_F: how far the subset's cross-covariance is from the full data's."""
    img, txt = _pairs("cross_cov_error", img, txt)  # checked once (a pool on disk is read once for it)
    full = _cross_cov(img, txt)
    norm = np.linalg.norm(full)
    if norm == 0:
        raise CurateError("cross_cov_error: the full data's cross-covariance is zero")
    return float(np.linalg.norm(_cross_cov(img, txt, rows, weights) - full) / norm)


# ----------------------------------------------------------------- CLIP score
def clipscore(img, txt) -> np.ndarray:
    """Cosine similarity of each image with its own caption, [N] float32."""
    img, txt = _pairs("clipscore", img, txt)
    out = np.empty(len(img), np.float32)
    for s in range(0, len(img), ROW_BLOCK):
        u = img[s:s + ROW_BLOCK].astype(np.float32)
        v = txt[s:s + ROW_BLOCK].astype(np.float32)
        nu, nv = np.linalg.norm(u, axis=1), np.linalg.norm(v, axis=1)
        zero = (nu == 0) | (nv == 0)
        if zero.any():
            raise CurateError(f"clipscore: row {s + int(np.flatnonzero(zero)[0])} has a zero-norm embedding")
        out[s:s + ROW_BLOCK] = np.einsum("nd,nd->n", u, v) / (nu * nv)
    return out


def clipscore_filter(scores, *, k: int | None = None, threshold: float | None = None) -> np.ndarray:
    """Rows to keep by score: the top k (ties by row index), or every row with score >= threshold;
    in descending score order either way."""
    if (k is None) == (threshold is None):
        raise CurateError("clipscore_filter: give exactly one of k and threshold")
    s = np.asarray(scores)
    if s.dtype.kind != "f":
        s = s.astype(np.float64)
    if s.ndim != 1:
        raise CurateError(f"clipscore_filter: scores must be [N], got shape {s.shape}")
    if not np.isfinite(s).all():
        raise CurateError(f"clipscore_filter: score of row {int(np.argmax(~np.isfinite(s)))} is NaN or infinite")
    order = np.lexsort((np.arange(len(s)), -s))  # descending score, then ascending row
    if k is not None:
        if int(k) != k or not 0 <= k <= len(s):
            raise CurateError(f"clipscore_filter: k must be an integer in [0, {len(s)}], got {k}")
        return order[:int(k)]
    keep = order[s[order] >= threshold]  # in the scores' own precision: float32 0.9 >= 0.9
    if len(keep) == 0:
        top = f"{s.max():.4f}" if len(s) else "none: no scores"
        raise CurateError(f"clipscore_filter: threshold {threshold} keeps nothing (the highest score is {top})")
    return keep


# ----------------------------------------------------------------- ClipCov
def unrelated_score(blocks) -> float:
    """<mean u, mean v> over every image-caption combination of the data: the expected score of an
    unrelated caption. `blocks` yields (img, txt) row blocks of the data, in row order (float64 sums)."""
    mean_u = mean_v = None
    n = 0
    for img, txt in blocks:
        for s in range(0, len(img), ROW_BLOCK):
            su = img[s:s + ROW_BLOCK].astype(np.float64).sum(0)
            sv = txt[s:s + ROW_BLOCK].astype(np.float64).sum(0)
            mean_u, mean_v = (su, sv) if mean_u is None else (mean_u + su, mean_v + sv)
        n += len(img)
    return 0.0 if n == 0 else float(mean_u @ mean_v) / n ** 2


def bucket_plan(counts: np.ndarray, alloc: np.ndarray, d: int, block_elems: int | None = None) -> list[np.ndarray]:
    """The groups clipcov batches together: ids with a budget, by ascending size (then id), each
    bucket's padded [B, n_max, D] within block_elems (BLOCK_ELEMS; a group larger than that is a
    bucket alone). A caller that splits the groups over units splits this list, so that every
    bucket is computed as one call on the whole pool computes it (same padding, same floats)."""
    block_elems = BLOCK_ELEMS if block_elems is None else block_elems
    ids = np.flatnonzero(np.asarray(alloc))
    order = ids[np.lexsort((ids, np.asarray(counts)[ids]))]
    out, cur = [], []
    for c in order:
        if cur and (len(cur) + 1) * int(counts[c]) * d > block_elems:
            out.append(np.asarray(cur, np.int64))
            cur = []
        cur.append(c)
    if cur:
        out.append(np.asarray(cur, np.int64))
    return out


def _masked_lower_median(s: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    srt = torch.where(valid, s, torch.full_like(s, math.inf)).sort(1).values
    cnt = valid.sum(1)
    return srt.gather(1, ((cnt - 1).clamp(min=0) // 2)[:, None])[:, 0]


def _redundancy(u: torch.Tensor, v: torch.Tensor, block: int = 2048) -> torch.Tensor:
    """K(i, j) = <u_i, u_j> <v_i, v_j> for every pair of each group, [B, m, m], built in row blocks
    so that the peak is one [B, m, m] matrix and two [B, block, m] slices."""
    b, m, _ = u.shape
    out = torch.empty(b, m, m, dtype=u.dtype, device=u.device)
    for s in range(0, m, block):
        e = min(m, s + block)
        torch.mul(u[:, s:e] @ u.transpose(1, 2), v[:, s:e] @ v.transpose(1, 2), out=out[:, s:e])
    return out


def _clipcov_bucket(u: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, k: torch.Tensor, lam: float,
                    gate: float | None, base: float,
                    pool_factor: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact greedy for every group of a bucket at once. u, v [B, n, D] (padding rows zero),
    valid [B, n], k [B]. Returns picks [B, max k] (row positions within each group), objective
    [B] and the number of misaligned pairs [B]."""
    b, n, d = u.shape
    ar = torch.arange(b, device=u.device)
    score = (u * v).sum(-1)
    aligned = valid.clone()
    if gate is not None:
        med = _masked_lower_median(score, valid)
        mad = _masked_lower_median((score - med[:, None]).abs(), valid)
        thr = torch.minimum(0.5 * (base + med), med - gate * 1.4826 * mad)
        aligned &= ~((score < thr[:, None]) & (med > base)[:, None])
    n_aligned = aligned.sum(1)
    misaligned = (valid & ~aligned).sum(1)
    w = aligned.to(u.dtype) / n_aligned.clamp(min=1)[:, None].to(u.dtype)
    eligible = aligned
    if pool_factor is not None:  # quality first: only the group's ceil(pool_factor * k) best-scored aligned pairs
        masked = torch.where(aligned, score, torch.full_like(score, -math.inf))
        rank = torch.argsort(torch.argsort(masked, dim=1, descending=True, stable=True), dim=1)
        eligible = aligned & (rank < torch.ceil(pool_factor * k.to(score.dtype))[:, None])
    n_eligible = eligible.sum(1)
    if n < d:  # small groups: the linear term through the n x n redundancy matrices
        gain = ((u @ u.transpose(1, 2)) * (v @ v.transpose(1, 2)) * w[:, None, :]).sum(-1)
    else:  # through C_A [D, D]
        cov = (u * w[..., None]).transpose(1, 2) @ v
        gain = ((u @ cov) * v).sum(-1)
        del cov
    # The greedy only ever picks among a group's quality pool when that pool holds its budget (the
    # usual case: pool_factor * k pairs); only the others need every pair. Candidates keep row order.
    cand = torch.where((n_eligible >= k)[:, None], eligible, valid)
    m = int(cand.sum(1).max())
    pos = torch.argsort((~cand).to(torch.uint8), dim=1, stable=True)[:, :m]
    u, v = (x.gather(1, pos[..., None].expand(-1, -1, d)) for x in (u, v))
    gain, eligible, aligned, taken = gain.gather(1, pos), eligible.gather(1, pos), aligned.gather(1, pos), \
        ~cand.gather(1, pos)
    kmat = _redundancy(u, v) if b * m * m <= GRAM_ELEMS else None  # K(i, j) among candidates, else per step
    kmax = int(k.max())
    coef = (lam / k.clamp(min=1).to(u.dtype))[:, None]
    picks = torch.zeros(b, kmax, dtype=torch.int64, device=u.device)
    obj = torch.zeros(b, dtype=torch.float64, device=u.device)
    for t in range(kmax):
        # pairs outside the quality pool wait until it is used up, misaligned ones until the aligned are
        blocked = taken | (~eligible & (t < n_eligible)[:, None]) | (~aligned & (t < n_aligned)[:, None])
        j = torch.where(blocked, torch.full_like(gain, -math.inf), gain).argmax(1)  # first max: lowest row
        picks[:, t] = pos[ar, j]
        obj += torch.where(t < k, gain[ar, j], torch.zeros_like(obj, dtype=gain.dtype)).double()
        taken[ar, j] = True
        if lam and t + 1 < kmax:
            if kmat is not None:
                red = kmat[ar, j]
            else:
                red = (u @ u[ar, j, :, None])[..., 0] * (v @ v[ar, j, :, None])[..., 0]
            gain -= coef * red
    return picks.cpu().numpy(), obj.cpu().numpy(), misaligned.cpu().numpy()


def clipcov(img, txt, groups, alloc, *, lam: float = 1.0, gate: float | None = 3.0,
            pool_factor: float | None = None, device="cpu", seed: int = 0, base: float | None = None,
            buckets: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """ClipCov per pseudo-class (objective in the module docstring): alloc[g] pairs of group g.

    pool_factor: group g picks among its ceil(pool_factor * alloc[g]) aligned pairs of highest CLIP
    score first (quality first, as the paper's title says; the greedy then chooses among them
    for the covariance), the rest only when those run out. None: every aligned pair competes.

    Returns (rows, weights, info): rows in selection order (groups by id, greedy order within),
    float32 weights (all 1.0), info with per-group `objective` F_l and `misaligned` counts.
    base: the expected CLIP score of an unrelated caption (`unrelated_score` of the whole pool);
    None: computed from img and txt. A caller that runs the groups in parts passes the pool's, so
    that each part gates its pairs exactly as one call on the whole pool would.
    buckets: the groups to batch together (bucket_plan's, or a run of them: a part of a split
    selection); None: bucket_plan of these groups. Every group with a budget is in exactly one.

    `seed` is accepted for a uniform signature: the greedy is deterministic (ties to the lower
    row) and draws nothing.
    """
    del seed
    img, txt = _pairs("clipcov", img, txt)
    groups, alloc, counts = _groups("clipcov", groups, alloc, len(img))
    if not (lam >= 0 and math.isfinite(lam)):
        raise CurateError(f"clipcov: lam must be >= 0, got {lam}")
    if gate is not None and not (gate >= 0 and math.isfinite(gate)):
        raise CurateError(f"clipcov: gate must be >= 0 or None, got {gate}")
    if pool_factor is not None and not (pool_factor >= 1 and math.isfinite(pool_factor)):
        raise CurateError(f"clipcov: pool_factor must be >= 1 or None, got {pool_factor}")
    dev = torch.device(device)
    info = {"objective": {}, "misaligned": {}, "lam": float(lam), "gate": gate, "pool_factor": pool_factor}
    todo = np.flatnonzero(alloc)
    if len(todo) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), info
    members = _members(groups, len(alloc))
    d = img.shape[1]
    # the expected score of an unrelated caption: mean over all image-caption combinations
    if base is None:
        base = unrelated_score([(img, txt)])
    picked: dict[int, np.ndarray] = {}
    if buckets is None:
        buckets = bucket_plan(counts, alloc, d)
    planned = np.sort(np.concatenate(buckets)) if buckets else np.zeros(0, np.int64)
    if not np.array_equal(planned, todo):
        raise CurateError("clipcov: buckets must hold every group with a budget exactly once")
    for bucket in buckets:
        n = int(counts[bucket].max())
        idx = np.zeros((len(bucket), n), np.int64)
        valid = np.zeros((len(bucket), n), bool)
        for i, c in enumerate(bucket):
            m = members[c]
            idx[i, :len(m)], idx[i, len(m):] = m, m[0]
            valid[i, :len(m)] = True
        vt = torch.as_tensor(valid, device=dev)

        def load(x):
            t = torch.as_tensor(x[idx.reshape(-1)]).to(dev, torch.float32).view(len(bucket), n, d)
            return t.masked_fill_(~vt[..., None], 0)

        u, v = load(img), load(txt)
        kk = torch.as_tensor(alloc[bucket], device=dev)
        picks, obj, bad = _clipcov_bucket(u, v, vt, kk, float(lam), gate, base, pool_factor)
        del u, v
        for i, c in enumerate(bucket):
            picked[int(c)] = members[c][picks[i, :alloc[c]]]
            info["objective"][int(c)] = float(obj[i])
            info["misaligned"][int(c)] = int(bad[i])
    rows = np.concatenate([picked[int(c)] for c in todo])
    info["objective"] = dict(sorted(info["objective"].items()))
    info["misaligned"] = dict(sorted(info["misaligned"].items()))
    return rows, np.ones(len(rows), np.float32), info


# ----------------------------------------------------------------- SAS
class _SasGains:
    """SAS's set function in the form stages.kernels.coresets.facility's greedy maximisers take: `n`,
    `initial_gains()`, `gains(cand, cur)`, `cover(j, cur)`, and `vals` (a tensor on the device,
    which facility reads to place its buffers). `cur` holds sum_{j in S} s_ij for every i, so a
    candidate's gain is sum_{i in V} s_ij - sum_{j' in S} s_jj', with s = (1 + cos) / 2 from unit
    rows x: both terms are inner products with summed rows, O(n D), no n x n matrix."""

    def __init__(self, x: torch.Tensor):
        self.x = x
        self.n = len(x)
        self.vals = 0.5 * (self.n + x @ x.sum(0))  # sum_i s_ij, itself included

    def initial_gains(self) -> torch.Tensor:
        return self.vals.clone()

    def gains(self, cand: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
        return self.vals[cand] - cur[cand]

    def cover(self, j: int, cur: torch.Tensor) -> None:
        cur += 0.5 * (1 + self.x @ self.x[j])

    def objective(self, picks: np.ndarray) -> float:
        """F(S) = sum_{j in S} sum_{i in V} s_ij - sum_{j < j' in S} s_jj'."""
        k = len(picks)
        xs = self.x[torch.as_tensor(picks, device=self.x.device)].double()
        pair_cos = 0.5 * (float((xs.sum(0) ** 2).sum()) - float((xs * xs).sum()))
        return float(self.vals[torch.as_tensor(picks, device=self.x.device)].double().sum()) \
            - 0.5 * (k * (k - 1) / 2 + pair_cos)


def sas(feats, groups, alloc, *, device="cpu", seed: int = 0, optimizer: str = "stochastic",
        eps: float = 0.01) -> tuple[np.ndarray, np.ndarray, dict]:
    """SAS per latent class (see the module docstring): alloc[g] members of group g, those whose
    (augmented-view mean) embeddings are most similar to the rest of their class first, by
    stages.kernels.coresets.facility's lazy or stochastic greedy. Returns (rows in selection order,
    float32 weights of 1.0, info with per-group `objective`)."""
    from stages.kernels.coresets.facility import lazy_greedy, stochastic_greedy
    from stages.kernels.coresets.features import plain

    x = _matrix("sas", "feats", feats)
    groups, alloc, _ = _groups("sas", groups, alloc, len(x))
    if optimizer not in ("lazy", "stochastic"):
        raise CurateError(f"sas: optimizer must be lazy or stochastic, got {optimizer!r}")
    if not 0 < eps < 1:
        raise CurateError(f"sas: eps must be in (0, 1), got {eps}")
    members = _members(groups, len(alloc))
    rows, info = [], {"objective": {}}
    for c in np.flatnonzero(alloc):
        m, k = members[c], int(alloc[c])
        f = plain(x[m], device).x
        f = f / f.norm(dim=1, keepdim=True).clamp(min=1e-12)
        fn = _SasGains(f)
        picks = lazy_greedy(fn, k) if optimizer == "lazy" else stochastic_greedy(fn, k, eps=eps, seed=seed + int(c))
        info["objective"][int(c)] = fn.objective(picks)
        rows.append(m[picks])
        del fn, f
    out = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return out, np.ones(len(out), np.float32), info


# ----------------------------------------------------------------- pseudo-classes
def kmeans_groups(emb, k: int, *, seed: int = 0, device="cpu", iters: int = 20,
                  max_points_per_centroid: int = 256, knn: dict | None = None) -> np.ndarray:
    """Pseudo-class ids [N] int64 in [0, k): k-means of the L2-normalised embeddings (faiss on CPU
    where installed, else torch on `device`), fitted on a seeded sample of at most
    max_points_per_centroid * k rows and assigned to the nearest centroid in row blocks.
    Some ids may be empty. knn: the run's `knn:` section; past its exact_max_n rows (on the CPU) the
    centroids come from stages.kernels.knn.kmeans (faiss, seeded k-means++ start), fitted on the same sample."""
    from stages.kernels.cluster import faiss_kmeans, kmeans
    from stages.kernels.knn import EXACT_MAX_N, choose_backend
    from stages.kernels.knn import kmeans as knn_kmeans

    x = _matrix("kmeans_groups", "emb", emb)
    if int(k) != k or k < 1:
        raise CurateError(f"kmeans_groups: k must be a positive integer, got {k}")
    k = int(k)
    if len(x) == 0:
        return np.zeros(0, np.int64)
    if knn is not None:
        max_points_per_centroid = knn.get("max_points_per_centroid", max_points_per_centroid)
    rng = np.random.default_rng(seed)
    fit = np.sort(rng.choice(len(x), max_points_per_centroid * k, replace=False)) \
        if len(x) > max_points_per_centroid * k else np.arange(len(x))
    xf = x[fit].astype(np.float32)
    norm = np.linalg.norm(xf, axis=1, keepdims=True)
    xf /= np.maximum(norm, 1e-12)
    dev = torch.device(device)
    cent = None
    if knn is not None and choose_backend(len(x), knn.get("backend", "auto"), dev,
                                          knn.get("exact_max_n", EXACT_MAX_N)) == "faiss":  # the rule on all N
        cent = knn_kmeans(xf, k, backend="faiss", iters=iters, seed=seed, with_assignment=False,
                          max_points_per_centroid=max_points_per_centroid)[0]
    if cent is None and dev.type == "cpu":
        cent = faiss_kmeans(xf, k, iters=iters, seed=seed)
    if cent is None:
        cent = kmeans(xf, k, iters=iters, seed=seed, device=dev)
    c = torch.as_tensor(np.asarray(cent, np.float32), device=dev)
    half_sq = 0.5 * (c * c).sum(1)
    out = np.empty(len(x), np.int64)
    step = max(1, min(1 << 16, (1 << 26) // max(len(c), 1)))
    for s in range(0, len(x), step):
        xb = torch.as_tensor(x[s:s + step]).to(dev, torch.float32)
        xb = xb / xb.norm(dim=1, keepdim=True).clamp(min=1e-12)
        out[s:s + step] = (xb @ c.T - half_sq).argmax(1).cpu().numpy()  # nearest centroid
    return out
