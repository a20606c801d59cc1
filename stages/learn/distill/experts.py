"""Expert trajectories for trajectory matching (MTT): a buffer of per-epoch parameter snapshots.

An expert is a network trained on the real data by plain SGD at a constant lr; MTT needs
its parameters after every epoch, so expert e is one array [epochs + 1, P] (row 0 is the
initialisation) of parameters flattened in `named_parameters()` order. Each expert is
one `expert_<e>.safetensors` file ("params" plus string metadata, no pickle) written
under a temporary name and renamed when complete, so a killed run leaves only whole
experts behind and a rerun trains just the missing or stale ones. Expert e is seeded by
`seed + e` alone, so a resumed buffer is bitwise the one a single run would have written
(on a given device and thread count).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn
from torch.nn import functional as F

from stages.learn.models import build_model, seeded_init
from stages.learn.trainer import normalise

FORMAT = "curate-mtt-experts/1"


def flat_params(model: nn.Module) -> torch.Tensor:
    """All parameters as one detached float32 vector, in `named_parameters()` order."""
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


def param_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """name -> shape of each parameter, in the order `flat_params` concatenates them."""
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def unflatten(vec: torch.Tensor, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Split a flat vector back into name -> tensor views (differentiable: MTT's student is a
    vector that `torch.func.functional_call` reads through these views)."""
    sizes = [math.prod(s) for s in shapes.values()]
    if vec.ndim != 1 or vec.numel() != sum(sizes):
        raise ValueError(f"flat vector has {vec.numel()} values, the model has {sum(sizes)} parameters")
    return {name: chunk.view(shape) for (name, shape), chunk in zip(shapes.items(), torch.split(vec, sizes))}


def _expert_meta(*, arch, in_shape, num_classes, width, lr, momentum, weight_decay, batch_size,
                 epochs, seed, expert, param_count, meta) -> dict[str, str]:
    """safetensors metadata is str -> str: scalars as text, structures as canonical JSON."""
    return {
        "format": FORMAT, "arch": arch, "in_shape": json.dumps(list(in_shape)),
        "num_classes": str(int(num_classes)), "width": str(int(width)), "lr": repr(float(lr)),
        "momentum": repr(float(momentum)), "weight_decay": repr(float(weight_decay)),
        "batch_size": str(int(batch_size)), "epochs": str(int(epochs)), "seed": str(int(seed)),
        "expert": str(int(expert)), "param_count": str(int(param_count)),
        "dataset": str((meta or {}).get("dataset", "")),
        "meta": json.dumps(meta or {}, sort_keys=True, separators=(",", ":"), default=str),
    }


def _param_count(arch: str, in_shape, num_classes: int, width: int) -> int:
    """Parameter count of the network, built under a forked RNG (the caller's stream is untouched)."""
    with torch.random.fork_rng(devices=[]):
        return sum(p.numel() for p in build_model(arch, tuple(in_shape), num_classes, width).parameters())


def _read_meta(path: Path) -> dict[str, str] | None:
    """A file's metadata, or None when it is not a readable safetensors file."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception:  # a damaged or foreign file counts as missing: it gets retrained
        return None


def train_expert(images: np.ndarray, labels: np.ndarray, *, arch: str, in_shape, num_classes: int, width: int,
                 epochs: int, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, batch_size: int,
                 seed: int, device: torch.device, augment: Callable | None = None) -> torch.Tensor:
    """One expert's trajectory, float32 [epochs + 1, P] on the CPU.

    A plain loop rather than `train_classifier`: MTT's student replays unscheduled SGD, so
    the expert must be constant-lr, full precision (no bf16) and snapshot after each epoch.
    `augment(x, gen)` (e.g. DSA) sees each normalised batch.
    """
    model = seeded_init(seed, lambda: build_model(arch, tuple(in_shape), num_classes, width))
    model.to(device).train()
    gen = torch.Generator().manual_seed(seed + 1_000_003)
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    snaps = [flat_params(model).cpu()]
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen).to(device)
        for i in range(0, len(y), batch_size):
            rows = perm[i:i + batch_size]
            xb = normalise(x[rows])
            if augment is not None:
                xb = augment(xb, gen)
            loss = F.cross_entropy(model(xb), y[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        snaps.append(flat_params(model).cpu())
    return torch.stack(snaps)


def train_experts(images: np.ndarray, labels: np.ndarray, *, arch: str, in_shape, num_classes: int, width: int,
                  experts: int, epochs: int, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                  batch_size: int, seed: int, device: torch.device, out_dir: Path, meta: dict,
                  augment: Callable | None = None, progress: Callable[[int], None] | None = None) -> list[Path]:
    """Train `experts` trajectories into `out_dir`; returns the paths of expert_0 .. expert_{E-1}.
    `progress(1)` is called after each expert (kept or trained).

    `meta` is stored with each expert; its "dataset" entry (the training data's fingerprint)
    is what `load_buffer(dataset=...)` checks. A file whose metadata equals this call's
    (architecture, optimiser, epochs, seed, meta) is kept; a missing, damaged or stale one
    is (re)trained and replaced atomically. `augment` is not recorded: pass the same one
    on a rerun (or use a new out_dir).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    in_shape = tuple(int(s) for s in in_shape)
    count = _param_count(arch, in_shape, num_classes, width)
    paths = []
    for e in range(experts):
        path = out_dir / f"expert_{e}.safetensors"
        want = _expert_meta(arch=arch, in_shape=in_shape, num_classes=num_classes, width=width, lr=lr,
                            momentum=momentum, weight_decay=weight_decay, batch_size=batch_size, epochs=epochs,
                            seed=seed + e, expert=e, param_count=count, meta=meta)
        if path.exists() and _read_meta(path) == want:
            paths.append(path)
            if progress:
                progress(1)
            continue
        traj = train_expert(images, labels, arch=arch, in_shape=in_shape, num_classes=num_classes, width=width,
                            epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                            batch_size=batch_size, seed=seed + e, device=device, augment=augment)
        if not torch.isfinite(traj).all():
            raise ValueError(f"expert {e} diverged (non-finite parameters): lower lr {lr}")
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        try:
            tmp.write_bytes(_canonical(save({"params": traj.contiguous()}, metadata=want)))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        paths.append(path)
        if progress:
            progress(1)
    return paths


def _canonical(data: bytes) -> bytes:
    """safetensors bytes with the JSON header's keys sorted: the library writes its metadata
    map in hash order, which differs between runs, and a rerun must give the same bytes.
    Tensor offsets are relative to the data section, so only the header is rewritten (padded
    with spaces to a multiple of 8, as the format recommends)."""
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-(8 + len(header)) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + n:]


def _expert_index(path: Path) -> int:
    return int(path.name[len("expert_"):-len(".safetensors")])


def load_buffer(out_dir: Path, *, arch: str, in_shape, num_classes: int, width: int,
                dataset: str | None = None) -> list[torch.Tensor]:
    """Every expert in `out_dir` as float32 [epochs + 1, P] (CPU), checked against the student.

    Trajectory matching compares raw parameter vectors, so an expert for another network
    (arch, input shape, classes, width) or other data is useless: raise ValueError naming
    the first mismatch instead of matching garbage. `dataset` (a fingerprint) is checked
    when given.
    """
    out_dir = Path(out_dir)
    files = sorted((p for p in out_dir.glob("expert_*.safetensors") if p.name[7:-12].isdigit()), key=_expert_index)
    if not files:
        raise ValueError(f"expert buffer {out_dir} holds no experts (expert_<e>.safetensors): run train_experts first")
    in_shape = [int(s) for s in in_shape]
    count = _param_count(arch, in_shape, num_classes, width)
    buffer = []
    for path in files:
        m = _read_meta(path)
        if m is None or m.get("format") != FORMAT:
            raise ValueError(f"expert buffer {out_dir}: {path.name} is not an expert trajectory file")
        checks = [("arch", m["arch"], arch), ("input shape", json.loads(m["in_shape"]), in_shape),
                  ("num_classes", int(m["num_classes"]), int(num_classes)), ("width", int(m["width"]), int(width)),
                  ("param count", int(m["param_count"]), count)]
        if dataset is not None:
            checks.append(("dataset fingerprint", m["dataset"], str(dataset)))
        for what, got, want in checks:
            if got != want:
                raise ValueError(f"expert buffer {out_dir} was trained for {what} {got}, not {want} ({path.name})")
        with safe_open(str(path), framework="pt") as fh:
            traj = fh.get_tensor("params")
        if traj.ndim != 2 or traj.shape[1] != count:
            raise ValueError(f"expert buffer {out_dir}: {path.name} holds params {tuple(traj.shape)}, "
                             f"not [epochs + 1, {count}]")
        buffer.append(traj.float())
    return buffer
