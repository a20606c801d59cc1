"""verify for image-caption runs (`verify.recipe: clip`): train a CLIP from scratch on each set.

Every training set (full pairs, each selection, random subsets of the same sizes) trains the
same small CLIP (`verify.clip`) over the same seeds. The reported accuracy is zero-shot on the
test split: each class's prompts (`verify.prompts` with the catalog's `class_names`) against
the image embeddings. Beside it, a linear probe: logistic regression on the trained image
tower's features of the whole training pool (labels where the data has them), tested on the
test split: how good the representation is, apart from its alignment with the class names.
"""

from __future__ import annotations

import numpy as np

from pipeline.energy import EnergyMeter
from pipeline.errors import CurateError

from stages.learn.clip.settings import captions_of, clip_arch, clip_recipe


class ClipTrainer:
    """Trains verify's CLIP on one set of pairs and evaluates it; holds what every training shares."""

    def __init__(self, ctx, images: np.ndarray, labels: np.ndarray, test: tuple[np.ndarray, np.ndarray]):
        from stages.learn.clip import tokenize

        c = ctx.config
        entry = ctx.catalog.entry(ctx.cfg.dataset)
        if not entry.class_names:
            raise CurateError(f"verify recipe clip: dataset '{ctx.cfg.dataset}' has no class_names in the catalog "
                              "to build zero-shot prompts from")
        if len(test[1]) == 0:
            raise CurateError(f"verify recipe clip: dataset '{ctx.cfg.dataset}' has an empty test split")
        if len(entry.class_names) <= int(test[1].max()):
            raise CurateError(f"verify recipe clip: {len(entry.class_names)} class_names, but test labels reach "
                              f"{int(test[1].max())}")
        index = ctx.index().table
        self.tokens, self.truncated = tokenize(captions_of(index, "verify"), c["clip"]["context"])
        self.ctx, self.c, self.images, self.labels, self.test = ctx, c, images, labels, test
        self.class_names = list(entry.class_names)
        self.meter = EnergyMeter(ctx.device)

    def __call__(self, ts, x: np.ndarray, y: np.ndarray, rows: np.ndarray | None, seed: int) -> dict:
        """Train on images x with the captions of index `rows` (None: all); zero-shot and probe."""
        import torch

        from stages.learn.clip import build_clip, embed_images, linear_probe_accuracy, train_clip, zero_shot_accuracy

        c, device = self.c, self.ctx.device
        tokens = self.tokens if rows is None else self.tokens[torch.from_numpy(np.array(rows, dtype=np.int64))]
        model = build_clip(clip_arch(c["clip"]), tuple(x.shape[2:]), seed=seed)
        e0 = self.meter.read()
        fit = train_clip(model, x, tokens, recipe=clip_recipe(c["clip"]), seed=seed, device=device)
        e1 = self.meter.read()
        if not np.isfinite(fit["final_loss"]):
            raise CurateError(f"verify {ts.name if ts is not None else 'clip'}, seed {seed}: CLIP training diverged "
                              f"(loss {fit['final_loss']}); lower verify.clip.lr")
        model.eval()
        bf16 = c["clip"]["bf16"]
        fit["acc"] = zero_shot_accuracy(model, self.test[0], self.test[1], self.class_names,
                                        templates=tuple(c["prompts"]), device=device, bf16=bf16)
        fit["probe"] = None
        if (self.labels >= 0).all():
            feats = embed_images(model, self.images, device=device, bf16=bf16)
            fit["probe"] = linear_probe_accuracy(feats, self.labels,
                                                 embed_images(model, self.test[0], device=device, bf16=bf16),
                                                 self.test[1], device=device)
        fit["energy_j"] = None if e0 is None or e1 is None else e1 - e0
        fit["backprop_samples"] = int(fit["samples"])
        fit["probe_samples"] = 0
        return fit
