"""Distribution Matching (DM; Zhao & Bilen, WACV 2023).

Learn synthetic images whose per-class mean embedding matches the real one, under many
*randomly initialised* networks: a random ConvNet is a cheap, diverse family of feature maps,
so matching means under a fresh one each iteration matches the class distributions in many
embedding spaces at once, with no bi-level optimisation and no network training. Each
iteration draws one network and, per class c, minimises

    || mean(embed(aug(real_c))) - mean(embed(aug(syn_c))) ||^2

with the same DSA transform on both sides (siamese), by SGD (momentum 0.5) on the synthetic
pixels only. Images are normalised floats ([-1, 1] here; uint8 inputs are normalised).
Deterministic for a seed on a given device and thread count: the real batches, DSA
parameters and network initialisations all come from the seed, and the caller's global RNG
state is left as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from stages.learn.models import seeded_init
from stages.learn.trainer import normalise
from stages.learn import augment as dsa


def _tensor(a) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))


def init_from_real(x, y, ipc: int, gen: torch.Generator | None = None, *,
                   num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`ipc` random real images per class as the starting synthetic set (DM and MTT start from
    real samples, not noise: it converges faster and to better sets).

    x: images [N, C, H, W] (uint8 or normalised float), y: labels [N]. Classes are
    0 .. num_classes - 1 (default max(y) + 1); every one must have at least ipc samples.
    Returns (syn float32 [num_classes * ipc, ...], labels int64), grouped by class."""
    x, y = _tensor(x), _tensor(y).long()
    if len(x) != len(y):
        raise ValueError(f"init_from_real: {len(x)} images but {len(y)} labels")
    if ipc < 1:
        raise ValueError(f"init_from_real: ipc must be >= 1, got {ipc}")
    k = num_classes if num_classes is not None else (int(y.max()) + 1 if len(y) else 0)
    if k < 1:
        raise ValueError("init_from_real: no classes (empty labels)")
    picks = []
    for c in range(k):
        idx = torch.nonzero(y == c).flatten()
        if len(idx) == 0:
            raise ValueError(f"init_from_real: class {c} is empty (ipc {ipc})")
        if len(idx) < ipc:
            raise ValueError(f"ipc {ipc} is larger than class {c} ({len(idx)} samples)")
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:ipc].to(idx.device)])
    sel = torch.cat(picks)
    syn = normalise(x[sel]).float().clone()
    return syn, y[sel].clone()


def _by_class(real, classes: list[int], device: torch.device) -> dict[int, torch.Tensor]:
    """{class: normalised float images on device} from a dict or an (x, y) pair."""
    if isinstance(real, Mapping):
        groups = {int(c): _tensor(v) for c, v in real.items()}
    else:
        x, y = real
        x, y = _tensor(x), _tensor(y).long()
        groups = {c: x[(y == c).to(x.device)] for c in classes}
    out = {}
    for c in classes:
        if c not in groups or len(groups[c]) == 0:
            raise ValueError(f"dm: no real images of class {c}, which the synthetic labels use")
        out[c] = normalise(groups[c]).to(device)
    return out


def _fresh_net(model_factory: Callable[[], nn.Module], seed: int, device: torch.device) -> nn.Module:
    """A network initialised from `seed` without touching the caller's global RNG."""
    net = seeded_init(seed, model_factory)  # built on the CPU: only the CPU generator is drawn from
    net.to(device).train()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def distill_dm(real, syn: torch.Tensor, syn_labels: torch.Tensor, *, iterations: int, lr_img: float = 1.0,
               batch_real: int = 256, dsa_kinds: str | list[str] | None = dsa.DEFAULT_KINDS,
               model_factory: Callable[[], nn.Module], seed: int = 0, device: torch.device | str = "cpu",
               momentum: float = 0.5, dsa_per_sample: bool = False,
               on_iteration: Callable[[int, float, torch.Tensor], object] | None = None,
               ) -> tuple[torch.Tensor, list[float]]:
    """Distil `syn` [M, C, H, W] (labels `syn_labels` [M]) towards `real` by distribution matching.

    real: {class: images} or (images, labels); images uint8 or normalised float.
    model_factory() builds a network with `.features(x)` (else the whole network embeds),
    re-initialised every iteration. batch_real real images per class per iteration (all
    of a class if it has fewer). DSA: by default one parameter set per class batch, the same
    for real and synthetic; with few images per class, per-sample transforms make the synthetic
    mean embedding too noisy to match (on digits at IPC 2 the loss stayed at its start, about
    4x the shared-transform loss). dsa_per_sample=True draws per-sample parameters for the
    larger of the two batches and shares them index by index (the DSA code's behaviour).
    on_iteration(it, loss, syn) runs after each step (syn detached: do not modify it).

    Returns (syn, history): the distilled images (detached, on `device`) and the loss of each
    iteration (summed squared mean-embedding gaps, averaged over classes). Raises ValueError
    naming the iteration (0-based) when the loss or the images stop being finite."""
    device = torch.device(device)
    if iterations < 0 or batch_real < 1:
        raise ValueError(f"dm: need iterations >= 0 and batch_real >= 1, got {iterations}, {batch_real}")
    labels = _tensor(syn_labels).long().to(device)
    if len(labels) != len(syn):
        raise ValueError(f"dm: {len(syn)} synthetic images but {len(labels)} labels")
    classes = sorted(int(c) for c in labels.unique())
    real_c = _by_class(real, classes, device)
    for c, r in real_c.items():
        if r.shape[1:] != syn.shape[1:]:
            raise ValueError(f"dm: real class {c} images {tuple(r.shape[1:])} vs synthetic {tuple(syn.shape[1:])}")
    syn_idx = {c: torch.nonzero(labels == c).flatten() for c in classes}
    kinds = dsa.parse_kinds(dsa_kinds)
    gen = torch.Generator().manual_seed(seed)

    img = syn.detach().to(device, torch.float32).clone().requires_grad_(True)
    opt = torch.optim.SGD([img], lr=lr_img, momentum=momentum)
    history: list[float] = []
    for it in range(iterations):
        net_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        net = _fresh_net(model_factory, net_seed, device)
        embed = getattr(net, "features", net)
        reals, syns = [], []
        for c in classes:
            rc = real_c[c]
            pick = torch.randperm(len(rc), generator=gen)[:batch_real].to(device)
            xr, xs = rc[pick], img[syn_idx[c]]
            if kinds:
                n = max(len(xr), len(xs)) if dsa_per_sample else 1
                p = dsa.sample_params(n, kinds, gen, device, per_sample=dsa_per_sample)
                xr, xs = dsa.apply(xr, dsa.take(p, len(xr))), dsa.apply(xs, dsa.take(p, len(xs)))
            reals.append(xr)
            syns.append(xs)
        # one forward per side: instance-norm nets treat samples independently, so batching
        # the classes together changes nothing but the speed
        with torch.no_grad():
            er = embed(torch.cat(reals)).flatten(1)
        es = embed(torch.cat(syns)).flatten(1)
        loss = img.new_zeros(())
        r0 = s0 = 0
        for xr, xs in zip(reals, syns):
            gap = er[r0:r0 + len(xr)].mean(0) - es[s0:s0 + len(xs)].mean(0)
            loss = loss + (gap * gap).sum()
            r0, s0 = r0 + len(xr), s0 + len(xs)
        if not bool(torch.isfinite(loss)):
            raise ValueError(f"dm: iteration {it}: the matching loss became {float(loss.detach())} "
                             "(a non-finite embedding: check the model factory and lr_img)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not bool(torch.isfinite(img).all()):
            raise ValueError(f"dm: iteration {it}: synthetic images became NaN or inf "
                             f"(lr_img={lr_img} is likely too large)")
        history.append(float(loss.detach()) / len(classes))
        if on_iteration is not None:
            on_iteration(it, history[-1], img.detach())
    return img.detach(), history
