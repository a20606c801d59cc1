"""Dataset distillation by matching training trajectories (MTT, Cazenavette et al. 2022).

A student network starts at an expert's parameters after epoch s and takes `syn_steps`
SGD steps on the synthetic images; the synthetic images (and the student's lr) are
learned so that these few steps land where the expert was `expert_epochs` epochs later.
The inner steps keep their graph (`create_graph=True`), so the outer loss is
differentiated through the whole unrolled student: memory grows with syn_steps x batch.
The student is a flat parameter vector read through `torch.func.functional_call`, so the
network must not rely on batch statistics (convnet3's instance norm has none).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.func import functional_call
from torch.nn import functional as F

from stages.learn.distill.experts import param_shapes, unflatten

LR_FLOOR = 1e-3  # the learned lr is clamped to >= LR_FLOOR * lr_init after every update


def distill_mtt(buffer: list[torch.Tensor], syn_images: torch.Tensor, syn_labels: torch.Tensor, *,
                model_factory: Callable[[], torch.nn.Module], iterations: int, syn_steps: int, expert_epochs: int,
                max_start_epoch: int, lr_img: float, lr_lr: float, lr_init: float, batch_syn: int | None = None,
                augment: Callable | None = None, seed: int, device: torch.device,
                on_iteration: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Learn `syn_images` (float, normalised, [N, C, H, W]) and the student lr; returns
    (images, lr, history) with history = per-iteration lists "loss", "lr", "expert", "start".

    Each iteration picks expert e and start epoch s < max_start_epoch (one torch.Generator
    seeded by `seed` drives every random choice, augmentation included, so a seed gives the
    same result on a given device), unrolls w_{t+1} = w_t - lr * grad CE(f(w_t, aug(x_t)), y_t)
    from w_0 = buffer[e][s] and minimises ||w_T - buffer[e][s + expert_epochs]||^2 /
    ||w_0 - buffer[e][s + expert_epochs]||^2 (scale-free across epochs and layers) with SGD,
    momentum 0.5, on the images (lr_img) and on lr (lr_lr). The lr is learned raw (not as a
    log) so lr_lr means what it means in the paper, and clamped to >= LR_FLOOR * lr_init to
    stay positive. `batch_syn` (None: all) bounds memory: each inner step takes the next
    chunk of a fresh permutation of the synthetic set. `augment(x, gen)` must be
    differentiable in x (e.g. DSA). `on_iteration(it, loss, lr)` is called after each update.
    A non-finite loss, image or lr raises ValueError naming the iteration.
    """
    if not buffer:
        raise ValueError("mtt: the expert buffer is empty")
    if max_start_epoch < 1 or expert_epochs < 1 or syn_steps < 1:
        raise ValueError("mtt: need max_start_epoch >= 1, expert_epochs >= 1 and syn_steps >= 1")
    shortest = min(len(t) for t in buffer) - 1
    if max_start_epoch - 1 + expert_epochs > shortest:
        raise ValueError(f"mtt: start epochs up to {max_start_epoch - 1} + expert_epochs {expert_epochs} "
                         f"go past the experts' {shortest} epochs")
    if len(syn_images) != len(syn_labels) or len(syn_images) == 0:
        raise ValueError(f"mtt: {len(syn_images)} synthetic images for {len(syn_labels)} labels")
    model = model_factory().to(device)
    shapes = param_shapes(model)
    count = sum(math.prod(s) for s in shapes.values())
    if buffer[0].shape[1] != count:
        raise ValueError(f"mtt: the experts hold {buffer[0].shape[1]} parameters, the student model {count}")
    for p in model.parameters():  # the student lives in the flat vector, not in the module
        p.requires_grad_(False)

    gen = torch.Generator().manual_seed(seed)
    syn = syn_images.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True)
    y = syn_labels.detach().to(device)
    lr = torch.tensor(float(lr_init), device=device, requires_grad=True)
    opt_img = torch.optim.SGD([syn], lr=lr_img, momentum=0.5)
    opt_lr = torch.optim.SGD([lr], lr=lr_lr, momentum=0.5)
    n = len(syn)
    batch = n if batch_syn is None else max(1, min(int(batch_syn), n))
    history = {"loss": [], "lr": [], "expert": [], "start": []}

    for it in range(iterations):
        e = int(torch.randint(len(buffer), (1,), generator=gen))
        s = int(torch.randint(max_start_epoch, (1,), generator=gen))
        w0 = buffer[e][s].to(device=device, dtype=torch.float32)
        target = buffer[e][s + expert_epochs].to(device=device, dtype=torch.float32)
        w = w0.clone().requires_grad_(True)
        order = torch.empty(0, dtype=torch.long)
        for _ in range(syn_steps):
            if batch == n:
                rows = None
            else:
                if len(order) < batch:
                    order = torch.cat([order, torch.randperm(n, generator=gen)])
                rows, order = order[:batch].to(device), order[batch:]
            xb, yb = (syn, y) if rows is None else (syn[rows], y[rows])
            if augment is not None:
                xb = augment(xb, gen)
            ce = F.cross_entropy(functional_call(model, unflatten(w, shapes), (xb,)), yb)
            (g,) = torch.autograd.grad(ce, w, create_graph=True)
            w = w - lr * g
        loss = (w - target).pow(2).sum() / (w0 - target).pow(2).sum()
        if not torch.isfinite(loss):
            raise ValueError(f"mtt: iteration {it}: the matching loss became {loss.item()} (lower lr_img / lr_lr)")
        opt_img.zero_grad(set_to_none=True)
        opt_lr.zero_grad(set_to_none=True)
        loss.backward()
        opt_img.step()
        opt_lr.step()
        with torch.no_grad():
            if not torch.isfinite(syn).all():
                raise ValueError(f"mtt: iteration {it}: synthetic images became NaN/inf (lower lr_img / lr_lr)")
            if not torch.isfinite(lr):
                raise ValueError(f"mtt: iteration {it}: the learned lr became {float(lr)} (lower lr_lr)")
            lr.clamp_(min=LR_FLOOR * float(lr_init))
        history["loss"].append(loss.item())
        history["lr"].append(lr.item())
        history["expert"].append(e)
        history["start"].append(s)
        if on_iteration is not None:
            on_iteration(it, history["loss"][-1], history["lr"][-1])
    return syn.detach(), lr.detach(), history
