"""embed: per-sample embeddings, row i = index row i.

Method `proxy`: train a small CNN on the training split for a few epochs over
`seeds` seeds and keep seed 0's penultimate activations, float32 [N, D], as
`embeddings.npy` (and `val_embeddings.npy`, `val_probs.npy` for index/val.parquet when
it exists).
Also written, for the scores and the gradient-based selections:
- `probs.npy` [S, E, N, C] float16 softmax per seed and epoch, and `hnorm.npy`
  [S, E, N] penultimate-feature norms (training dynamics);
- `grads.npy`: [N, C] float32 last-layer bias gradients p - onehot(y) of seed 0's final
  model (`stages.kernels.gradients.bias_gradients`); the full last-layer gradient is their
  outer product with the embeddings.

Method `precomputed` (stages.embed.precomputed): embeddings the user already has, from a .npy
plus keys or Parquet, aligned to the index by key and checked, written as the others write theirs.
"""

from __future__ import annotations

import json
import os

import numpy as np

from pipeline.arrays import num_classes_of
from pipeline.errors import CurateError
from pipeline.fingerprint import hash_file
from pipeline.manifest import read_parquet
from pipeline.stage import Resources, Stage, StageContext

from stages.kernels.gradients import bias_gradients
from stages.learn.models import proxy_arch
from stages.embed.proxy import train_proxy
from stages.embed.precomputed import FIELDS as PRECOMPUTED_FIELDS, count_rows, stage_config, write_precomputed


class EmbedStage(Stage):
    name = "embed"
    version = 4  # 4: the selector-driven trainer (numpy shuffling, per-batch lr)
    resources = Resources(cpus=1, gpus=1)  # trains or runs a network

    def config(self, cfg, sel, entry=None):
        """Only the settings the chosen method reads (num_workers changes no output)."""
        if cfg.embed.method == "precomputed":
            return stage_config(cfg.embed, cfg.index.on_error)  # with the sha256 of every file it reads
        unused = {"open_clip": {"epochs", "seeds", "lr", "width", "image_size", "arch", "clip", "views"},
                  "proxy": {"model", "pretrained", "shard_groups", "clip", "views"},
                  "proxy_clip": {"epochs", "seeds", "lr", "width", "arch", "model", "pretrained", "shard_groups"},
                  }[cfg.embed.method] | {"num_workers", *PRECOMPUTED_FIELDS}
        c = {"seed": cfg.seed, **cfg.embed.model_dump(exclude=unused)}
        if cfg.embed.method == "open_clip":
            c["num_workers"] = cfg.embed.num_workers  # the loader needs it; harmless in the fingerprint
            if c["pretrained"] and os.path.isfile(c["pretrained"]):
                c["pretrained_sha256"] = hash_file(c["pretrained"])  # a replaced checkpoint makes embed stale
        return c

    def upstream(self, cfg, sel):
        return ["index", *part_units(cfg)]

    def unit_resources(self, cfg, sel):
        return Resources(cpus=1) if cfg.embed.method == "precomputed" else self.resources  # reads files only

    def run(self, ctx: StageContext) -> None:
        if ctx.config["method"] == "precomputed":
            return self.run_precomputed(ctx)
        if ctx.config["method"] == "open_clip":
            return self.run_open_clip(ctx)
        if ctx.config["method"] == "proxy_clip":
            return self.run_proxy_clip(ctx)
        c = ctx.config
        pool, images = ctx.index_arrays(c["image_size"])
        labels = pool.labels
        if (labels < 0).any():
            raise CurateError("embed proxy: the proxy network trains on labels; some samples have none")
        has_val = ctx.has_val()
        val_images = ctx.index_arrays(c["image_size"], "val")[1] if has_val else None
        n_classes = num_classes_of(ctx.entry, labels)
        arch = proxy_arch(c["arch"], min(images.shape[2:]))
        with ctx.progress(c["epochs"] * c["seeds"], "embed: proxy epochs") as step:
            out = train_proxy(images, labels, num_classes=n_classes, epochs=c["epochs"], seeds=c["seeds"],
                              width=c["width"], batch_size=c["batch_size"], lr=c["lr"], seed=c["seed"],
                              device=ctx.device, arch=arch, extra_images=val_images, progress=step)
        feats = out["feats"].astype(np.float32)
        if not np.isfinite(feats).all() or not np.isfinite(out["probs"]).all():
            raise CurateError("embed proxy: training diverged (non-finite outputs); lower embed.lr")
        np.save(ctx.out / "embeddings.npy", feats)
        if has_val:
            np.save(ctx.out / "val_embeddings.npy", out["extra_feats"].astype(np.float32))
            np.save(ctx.out / "val_probs.npy", out["extra_probs"].astype(np.float32))
        np.save(ctx.out / "probs.npy", out["probs"])  # .npy, not .npz: zip headers hold timestamps
        np.save(ctx.out / "hnorm.npy", out["hnorm"])
        final = out["probs"][0, -1].astype(np.float32)
        np.save(ctx.out / "grads.npy", bias_gradients(final, labels))
        meta = {"method": "proxy", "model": arch, "shape": list(feats.shape), "dtype": "float32",
                "layer": "penultimate", "epochs": c["epochs"], "seeds": c["seeds"], "seed": c["seed"],
                "val_embeddings": has_val}
        (ctx.out / "embeddings.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        ctx.metrics.update({"dim": feats.shape[1], "train_seconds": round(out["seconds"], 3),
                            "train_accuracy": float((final.argmax(1) == labels).mean())})

    def run_precomputed(self, ctx: StageContext) -> None:
        """Embeddings the user brought (stages.embed.precomputed), aligned to the index by key."""
        c = ctx.config
        tables = {p: read_parquet(ctx.input_dir("index") / f"{p}.parquet", ["key", "uid"])
                  for p in ("index", "val") if p == "index" or ctx.has_val()}
        index, val = tables["index"], tables.get("val")
        total = sum(count_rows(p, c["keys"]) for p in (c["path"], c["text_path"]) if p is not None)
        with ctx.progress(total, "embed: precomputed", unit=" rows") as step:
            ctx.metrics.update(write_precomputed(c, index, val, ctx.out, progress=step))

    def run_proxy_clip(self, ctx: StageContext) -> None:
        """Train a small CLIP on the pool's pairs (stages.learn.clip), then embed both towers with it:
        embeddings.npy (images), text_embeddings.npy (captions), image_views.npy (mean over
        `views` augmented views, for SAS), the same for val; clip.safetensors + .json keep it."""
        from stages.learn.clip import build_clip, embed_images, embed_texts, save_clip, tokenize, train_clip
        from stages.learn.clip.settings import captions_of, clip_arch, clip_recipe

        c = ctx.config
        pool, images = ctx.index_arrays(c["image_size"])
        tokens, truncated = tokenize(captions_of(pool.table, "embed proxy_clip"), c["clip"]["context"])
        arch = clip_arch(c["clip"])
        model = build_clip(arch, tuple(images.shape[2:]), seed=c["seed"])
        with ctx.progress(c["clip"]["epochs"], "embed: proxy CLIP epochs") as step:
            fit = train_clip(model, images, tokens, recipe=clip_recipe(c["clip"]), seed=c["seed"], device=ctx.device,
                             progress=step)
        if not np.isfinite(fit["final_loss"]):
            raise CurateError("embed proxy_clip: training diverged (non-finite loss); lower embed.clip.lr")
        model.eval()
        kw = {"device": ctx.device, "batch_size": c["batch_size"], "bf16": c["clip"]["bf16"]}
        outputs = {"embeddings.npy": embed_images(model, images, **kw),
                   "text_embeddings.npy": embed_texts(model, tokens, **kw),
                   "image_views.npy": embed_images(model, images, views=c["views"], seed=c["seed"], **kw)}
        if ctx.has_val():
            vpool, vimages = ctx.index_arrays(c["image_size"], "val")
            vtokens, _ = tokenize(captions_of(vpool.table, "embed proxy_clip (val)"), c["clip"]["context"])
            outputs["val_embeddings.npy"] = embed_images(model, vimages, **kw)
            outputs["val_text_embeddings.npy"] = embed_texts(model, vtokens, **kw)
        meta = {"method": "proxy_clip", "clip": c["clip"], "views": c["views"], "dtype": "float16", "normalised": True}
        for name, arr in outputs.items():
            if not np.isfinite(arr).all():
                raise CurateError(f"embed proxy_clip: {name} row {int(np.flatnonzero(~np.isfinite(arr).all(1))[0])} "
                                  "is not finite")
            np.save(ctx.out / name, arr.astype(np.float16))
            meta[name] = list(arr.shape)
        save_clip(model, arch, ctx.out / "clip.safetensors")
        (ctx.out / "embeddings.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        ctx.metrics.update({"dim": int(outputs["embeddings.npy"].shape[1]), "train_seconds": round(fit["seconds"], 3),
                            "final_loss": float(fit["final_loss"]), "captions_truncated": int(truncated)})

    def run_open_clip(self, ctx: StageContext) -> None:
        """Encode the pool (or concatenate the embed_part/<g> units that did) and the val split."""
        from stages.embed.open_clip import load_clip

        c = ctx.config
        model = preprocess = tokenizer = None
        meta = {"method": "open_clip", "model": c["model"], "pretrained": c["pretrained"], "dtype": "float16",
                "normalised": True, "shard_groups": c["shard_groups"]}
        for table_name, img_out, txt_out in (("index.parquet", "embeddings.npy", "text_embeddings.npy"),
                                             ("val.parquet", "val_embeddings.npy", "val_text_embeddings.npy")):
            path = ctx.input_dir("index") / table_name
            if not path.exists():
                continue
            parts = part_units(ctx.cfg) if table_name == "index.parquet" else []
            if parts:
                emb = np.concatenate([np.load(ctx.input_dir(u) / "embeddings.npy") for u in parts])
                has_txt = (ctx.input_dir(parts[0]) / "text_embeddings.npy").exists()
                txt = np.concatenate([np.load(ctx.input_dir(u) / "text_embeddings.npy") for u in parts]) if has_txt else None
            else:
                if model is None:
                    model, preprocess, tokenizer = load_clip(c["model"], c["pretrained"], ctx.device)
                emb, txt = encode_table(model, preprocess, tokenizer, path, c, ctx.device)
            np.save(ctx.out / img_out, emb)
            meta[img_out] = list(emb.shape)
            if txt is not None:
                np.save(ctx.out / txt_out, txt)
                meta[txt_out] = list(txt.shape)
        (ctx.out / "embeddings.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        ctx.metrics.update({"dim": meta["embeddings.npy"][1], "samples": meta["embeddings.npy"][0]})


def encode_table(model, preprocess, tokenizer, path, c: dict, device):
    """(image embeddings, text embeddings or None) of the rows of one parquet table."""
    from pipeline.progress import progress

    from stages.embed.open_clip import encode_images, encode_texts

    n = read_parquet(path, ["row"]).num_rows
    with progress(n, f"embed: open_clip {path.parent.name}/{path.name}", unit=" img") as step:
        emb = encode_images(model, preprocess, path, device=device, batch_size=c["batch_size"],
                            num_workers=c["num_workers"], progress=step)
    captions = read_parquet(path, ["caption"]).column("caption").to_pylist()
    txt = None
    if any(cap is not None for cap in captions):
        txt = encode_texts(model, tokenizer, [cap or "" for cap in captions], device=device, batch_size=c["batch_size"])
        txt[[cap is None for cap in captions]] = 0  # no caption: a zero vector, never a fake one
    return emb, txt


def part_units(cfg) -> list[str]:
    """open_clip with shard_groups > 1: one embed_part unit per contiguous group of index rows."""
    if cfg.embed.method != "open_clip" or cfg.embed.shard_groups < 2:
        return []
    return [f"embed_part/{g:03d}" for g in range(cfg.embed.shard_groups)]


class EmbedPartStage(Stage):
    """One group of the pool's rows (whole shards, in order), encoded by open_clip.

    The flow maps these units over workers (Dask or threads); `embed` concatenates them.
    """

    name = "embed_part"
    version = 1
    resources = Resources(cpus=1, gpus=1)  # trains or runs a network

    def units(self, cfg):
        return part_units(cfg)

    def config(self, cfg, sel, entry=None):
        return EmbedStage().config(cfg, sel, entry)

    def upstream(self, cfg, sel):
        return ["index"]

    def run(self, ctx: StageContext) -> None:
        from pipeline.manifest import write_parquet

        from stages.embed.open_clip import load_clip

        c = ctx.config
        g, groups = int(ctx.unit.split("/")[1]), c["shard_groups"]
        index = ctx.index().table
        rows = np.array_split(np.arange(index.num_rows), groups)[g]
        part = index.slice(int(rows[0]), len(rows)) if len(rows) else index.slice(0, 0)
        write_parquet(part, ctx.out / "rows.parquet", stage=self.name, stage_version=self.version,
                      fingerprint=ctx.fingerprint)
        model, preprocess, tokenizer = load_clip(c["model"], c["pretrained"], ctx.device)
        emb, txt = encode_table(model, preprocess, tokenizer, ctx.out / "rows.parquet", c, ctx.device)
        np.save(ctx.out / "embeddings.npy", emb)
        if txt is not None:
            np.save(ctx.out / "text_embeddings.npy", txt)
        ctx.metrics.update({"rows": [int(rows[0]), int(rows[-1]) + 1] if len(rows) else [0, 0]})
