"""embed: per-sample embeddings, row i = index row i.

Method `proxy`: train a small CNN on the training split for a few epochs (seeded) and
keep its penultimate activations, float32 [N, D], as `embeddings.npy`;
`embeddings.json` says how they were made.
"""

from __future__ import annotations

import json

import numpy as np

from pipeline.arrays import load_images
from pipeline.errors import CurateError
from pipeline.manifest import read_parquet
from pipeline.stage import Stage, StageContext

from .models import SmallCNN
from .select import label_array
from .training import accuracy, predict, train_classifier


def num_classes_of(entry, labels: np.ndarray) -> int:
    return entry.num_classes or int(labels.max()) + 1


def load_index_arrays(ctx: StageContext, image_size: int | None):
    """Index table, uint8 images [N, C, H, W] and int64 labels of the training split."""
    index = read_parquet(ctx.input_dir("index") / "index.parquet")
    entry = ctx.catalog.entry(ctx.cfg.dataset)
    images = load_images(index.column("shard").to_pylist(), index.column("offset").to_pylist(),
                         entry.fields.image, image_size)
    return index, images, label_array(index)


class EmbedStage(Stage):
    name = "embed"
    version = 1
    resources = {"cpu": 1, "gpu": "optional"}

    def config(self, cfg, sel):
        return {"seed": cfg.seed, **cfg.embed.model_dump()}

    def upstream(self, cfg, sel):
        return ["index"]

    def run(self, ctx: StageContext) -> None:
        import torch
        from tqdm import tqdm

        c = ctx.config
        _, images, labels = load_index_arrays(ctx, c["image_size"])
        if (labels < 0).any():
            raise CurateError("embed proxy: the proxy network trains on labels; some samples have none")
        torch.manual_seed(c["seed"])
        model = SmallCNN(images.shape[1], num_classes_of(ctx.catalog.entry(ctx.cfg.dataset), labels), width=c["width"])
        with tqdm(total=c["epochs"], desc="embed: proxy epochs", disable=None) as bar:
            fit = train_classifier(model, images, labels, epochs=c["epochs"], batch_size=c["batch_size"],
                                   lr=c["lr"], seed=c["seed"], device=ctx.device, progress=bar.update)
        feats = predict(model, images, device=ctx.device, features=True).astype(np.float32)
        if not np.isfinite(feats).all():
            raise CurateError("embed proxy: training diverged (non-finite features); lower embed.lr")
        np.save(ctx.out / "embeddings.npy", feats)
        meta = {"method": "proxy", "model": "small_cnn", "shape": list(feats.shape), "dtype": "float32",
                "layer": "penultimate", "epochs": c["epochs"], "seed": c["seed"]}
        (ctx.out / "embeddings.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        ctx.metrics.update({"dim": feats.shape[1], "train_seconds": round(fit["seconds"], 3),
                            "train_accuracy": accuracy(model, images, labels, device=ctx.device)})
