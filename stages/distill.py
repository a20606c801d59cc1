"""The `experts` and `distill/<name>` stages: the kernels of this package wired into a run.

experts (one unit, only when an mtt spec exists): `distill.experts.count` expert trajectories
of plain SGD on the training pool, `experts/expert_<e>.safetensors`. They are trained into
`<run>/.experts-cache/<fingerprint>/` (train_experts keeps every finished expert there) and
hard-linked (or copied) into the unit when all are done, so a killed run resumes with the
experts it had finished.

distill/<name> (one unit per spec): init_from_real (ipc real images per class, seeded), then
mtt (matching the experts) or dm; writes
    shards/distill-000000.tar   <key>.npy  float32 (H, W, C) image in the normalised space
                                           ([-1, 1] for pixel values: pixel = (v + 1) * 127.5;
                                           after ZCA, mapped back to that space), <key>.cls
                                           label, <key>.json {"weight": 1.0, "method", "ipc"}
    sizes.json, manifest.parquet (row null, uid, key, shard, offset, label, caption null,
                                  weight, method, ipc), lr.json {"lr": learned lr | null}
The float members are not images `decode_image` accepts (it wants uint8): `read_distilled`
reads them back (np.load without pickle).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.errors import CurateError
from pipeline.manifest import COMMON_SCHEMA, write_parquet
from pipeline.shards import ShardWriter, write_text_atomic
from pipeline.arrays import num_classes_of
from pipeline.stage import Resources, Stage, StageContext

CACHE = ".experts-cache"


def _pool(ctx: StageContext, image_size):
    """uint8 images [N, C, H, W], int64 labels and the class count of the training pool."""
    pool, images = ctx.index_arrays(image_size)
    labels = pool.labels
    if len(labels) == 0 or (labels < 0).any():
        raise CurateError("distillation needs a label on every training sample")
    return images, labels, num_classes_of(ctx.entry, labels)


def _zca(images: np.ndarray):
    """(mean, W, W_inv) fitted on the normalised pool (eps 0.1, the MTT setting)."""
    import torch

    from stages.learn.trainer import normalise
    from stages.learn.distill.zca import fit_zca

    return fit_zca(normalise(torch.from_numpy(images)), 0.1, return_inverse=True)


def _augment(kinds: str):
    from stages.learn import augment as dsa

    if not dsa.parse_kinds(kinds):
        return None
    return lambda x, gen: dsa.augment(x, kinds, gen)


def _dataset_tag(ctx: StageContext, zca: bool) -> str:
    """What the experts were trained on: the index's fingerprint, and whether it was whitened."""
    return ctx.upstream("index").record["fingerprint"] + ("+zca" if zca else "")


class ExpertsStage(Stage):
    name = "experts"
    version = 1
    resources = Resources(cpus=1, gpus=1)  # trains or runs a network

    def units(self, cfg):
        return ["experts"] if cfg.distill.has_mtt else []

    def config(self, cfg, sel, entry=None):
        return {"seed": cfg.seed, **cfg.distill.experts.model_dump(), "zca": cfg.distill.zca,
                "image_size": cfg.verify.image_size}

    def upstream(self, cfg, sel):
        return ["index"]

    def run(self, ctx: StageContext) -> None:
        import torch

        from stages.learn.distill.experts import train_experts

        c = ctx.config
        images, labels, n_classes = _pool(ctx, c["image_size"])
        x = images
        if c["zca"]:
            from stages.learn.trainer import normalise
            from stages.learn.distill.zca import apply_zca

            mean, w, _ = _zca(images)
            x = apply_zca(normalise(torch.from_numpy(images)), mean, w).numpy()
        cache_root = ctx.run_dir / CACHE
        cache = cache_root / ctx.fingerprint
        if cache_root.exists():  # caches of other settings are dead: only this fingerprint resumes
            for old in cache_root.iterdir():
                if old.name != ctx.fingerprint:
                    shutil.rmtree(old, ignore_errors=True)
        before = len(list(cache.glob("expert_*.safetensors"))) if cache.exists() else 0
        try:
            with ctx.progress(c["count"], "experts: trajectories") as step:
                paths = train_experts(x, labels, arch=c["arch"], in_shape=images.shape[1:], num_classes=n_classes,
                                      width=c["width"], experts=c["count"], epochs=c["epochs"], lr=c["lr"],
                                      batch_size=c["batch_size"], seed=c["seed"], device=ctx.device, out_dir=cache,
                                      meta={"dataset": _dataset_tag(ctx, c["zca"]), "dsa": c["dsa"]},
                                      augment=_augment(c["dsa"]), progress=step)
        except ValueError as exc:
            raise CurateError(f"experts: {exc}") from None
        for p in paths:
            try:
                os.link(p, ctx.out / p.name)
            except OSError:
                shutil.copy2(p, ctx.out / p.name)
        shutil.rmtree(cache, ignore_errors=True)
        if cache_root.exists() and not any(cache_root.iterdir()):
            cache_root.rmdir()
        ctx.metrics.update({"experts": len(paths), "resumed": min(before, len(paths)), "epochs": c["epochs"]})


def write_distilled(out: Path, images: np.ndarray, labels: np.ndarray, *, name: str, dataset: str, method: str,
                    ipc: int, shard_size: int, stage: str, stage_version: int, fingerprint: str) -> pa.Table:
    """Shards (through ShardWriter, as materialize writes them), sizes.json and manifest.parquet
    of a synthetic set: images float32 [N, C, H, W] in the normalised space, labels [N]."""
    keys, shards, offsets = [], [], []
    seen: dict[int, int] = {}
    with ShardWriter(out / "shards", "distill", shard_size) as writer:
        for img, lab in zip(images, labels):
            lab = int(lab)
            j = seen[lab] = seen.get(lab, -1) + 1
            key = f"syn-c{lab:04d}-{j:05d}"
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(img.transpose(1, 2, 0), dtype="<f4"), allow_pickle=False)
            meta = json.dumps({"weight": 1.0, "method": method, "ipc": ipc}, sort_keys=True).encode()
            shard, off = writer.write(key, {"npy": buf.getvalue(), "cls": str(lab).encode(), "json": meta})
            keys.append(key)
            shards.append(f"shards/{shard}")
            offsets.append(off)
    n = len(keys)
    table = pa.table({
        "row": pa.nulls(n, pa.int64()), "uid": pa.array([f"{dataset}/{name}/{k}" for k in keys], pa.string()),
        "key": pa.array(keys, pa.string()), "shard": pa.array(shards, pa.string()),
        "offset": pa.array(offsets, pa.int32()), "label": pa.array(np.asarray(labels, np.int32), pa.int32()),
        "caption": pa.nulls(n, pa.string())}, schema=COMMON_SCHEMA)
    table = table.append_column("weight", pa.array(np.ones(n, np.float32), pa.float32()))
    table = table.append_column("method", pa.array([method] * n, pa.string()))
    table = table.append_column("ipc", pa.array(np.full(n, ipc, np.int32), pa.int32()))
    write_parquet(table, out / "manifest.parquet", stage=stage, stage_version=stage_version,
                  fingerprint=fingerprint, extra={"distill": name})
    return table


class IterationTimer:
    """Seconds per distillation iteration, from the end of the first to the end of the last
    (set-up and the first iteration's warm-up excluded), and the peak GPU memory of the loop."""

    def __init__(self, device):
        import torch

        self.device, self.times = device, []
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)

    def tick(self, step):
        def on_iteration(*_):
            if self.cuda:
                import torch

                torch.cuda.synchronize(self.device)
            self.times.append(time.perf_counter())
            step(1)
        return on_iteration

    def per_iteration(self) -> float | None:
        if len(self.times) < 2:
            return None
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)

    @property
    def peak_mib(self) -> float | None:
        import torch

        return torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else None


class DistillStage(Stage):
    name = "distill"
    version = 1
    resources = Resources(cpus=1, gpus=1)  # trains or runs a network

    def units(self, cfg):
        return [f"distill/{s.sel_name}" for s in cfg.distill.specs]

    def item(self, cfg, name):
        return cfg.distilled(name)

    def config(self, cfg, sel, entry=None):
        c = {"seed": cfg.seed, **sel.model_dump(exclude={"name"}), "name": sel.sel_name,
             "image_size": cfg.verify.image_size, "shard_size": cfg.materialize.shard_size}
        if "experts" in sel.needs:  # mtt: the student must be the experts' network
            e = cfg.distill.experts
            c["experts"] = {"arch": e.arch, "width": e.width}
        return c

    def upstream(self, cfg, sel):
        return ["index"] + (["experts"] if "experts" in sel.needs else [])

    def run(self, ctx: StageContext) -> None:
        try:
            self._run(ctx)
        except (CurateError, ValueError) as exc:  # the kernels' ValueErrors are the user's to fix
            raise CurateError(f"distill {ctx.config['name']}: {exc}") from None

    def _run(self, ctx: StageContext) -> None:
        with ctx.progress(ctx.config["iterations"], f"distill {ctx.config['name']}") as step:
            self._distill(ctx, step)

    def _distill(self, ctx: StageContext, step) -> None:
        import torch

        from stages.learn.models import build_model
        from stages.learn.distill.dm import distill_dm, init_from_real

        c = ctx.config
        images, labels, n_classes = _pool(ctx, c["image_size"])
        in_shape = tuple(images.shape[1:])
        gen = torch.Generator().manual_seed(c["seed"])
        syn, syn_y = init_from_real(images, labels, c["ipc"], gen, num_classes=n_classes)
        lr = None
        timer = IterationTimer(ctx.device)
        if c["method"] == "mtt":
            from stages.learn.distill.experts import load_buffer
            from stages.learn.distill.mtt import distill_mtt
            from stages.learn.distill.zca import apply_zca, invert_zca

            e = c["experts"]
            buffer = load_buffer(ctx.input_dir("experts"), arch=e["arch"], in_shape=in_shape, num_classes=n_classes,
                                 width=e["width"], dataset=_dataset_tag(ctx, c["zca"]))
            if c["zca"]:
                mean, w, w_inv = _zca(images)
                syn = apply_zca(syn, mean, w)
            out, lr_t, hist = distill_mtt(
                buffer, syn, syn_y, model_factory=lambda: build_model(e["arch"], in_shape, n_classes, e["width"]),
                iterations=c["iterations"], syn_steps=c["syn_steps"], expert_epochs=c["expert_epochs"],
                max_start_epoch=c["max_start_epoch"], lr_img=c["lr_img"], lr_lr=c["lr_lr"], lr_init=c["lr_init"],
                batch_syn=c["batch_syn"], augment=_augment(c["dsa"]), seed=c["seed"], device=ctx.device,
                on_iteration=timer.tick(step))
            if c["zca"]:
                out = invert_zca(out, mean.to(out.device), w_inv.to(out.device))
            lr = float(lr_t)
            losses = hist["loss"]
        else:
            out, losses = distill_dm((images, labels), syn, syn_y, iterations=c["iterations"], lr_img=c["lr_img"],
                                     batch_real=c["batch_real"], dsa_kinds=c["dsa"],
                                     model_factory=lambda: build_model("convnet3", in_shape, n_classes, c["width"]),
                                     seed=c["seed"], device=ctx.device, on_iteration=timer.tick(step))
        arr = out.detach().float().cpu().numpy()
        if not np.isfinite(arr).all():
            raise CurateError("the distilled images are not finite")
        write_distilled(ctx.out, arr, syn_y.cpu().numpy(), name=c["name"], dataset=ctx.cfg.dataset,
                        method=c["method"], ipc=c["ipc"], shard_size=c["shard_size"], stage=self.name,
                        stage_version=self.version, fingerprint=ctx.fingerprint)
        write_text_atomic(ctx.out / "lr.json", json.dumps({"lr": lr}) + "\n")
        ctx.metrics.update({"images": int(len(arr)), "classes": int(n_classes), "lr": lr,
                            "seconds_per_iteration": timer.per_iteration(), "peak_gpu_mib": timer.peak_mib,
                            "loss_first": float(losses[0]) if losses else None,
                            "loss_last": float(losses[-1]) if losses else None})
