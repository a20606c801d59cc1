"""A run config's CLIP sections (embed.clip, verify.clip) as the package's ClipArch / ClipRecipe,
and the caption column every CLIP consumer reads: one place for both stages that train a CLIP."""

from __future__ import annotations

from pipeline.errors import CurateError


def clip_arch(c: dict):
    """The ClipArch of a ClipConfig dump (embed.clip or verify.clip)."""
    from stages.learn.clip.model import ClipArch

    return ClipArch(embed_dim=c["embed_dim"], vision_layers=c["vision_layers"], vision_width=c["vision_width"],
                    patch_size=c["patch"], text_layers=c["text_layers"], text_width=c["text_width"],
                    context=c["context"])


def clip_recipe(c: dict):
    from stages.learn.clip.train import ClipRecipe

    return ClipRecipe(epochs=c["epochs"], batch_size=c["batch_size"], lr=c["lr"], weight_decay=c["weight_decay"],
                      bf16=c["bf16"])


def captions_of(table, where: str) -> list[str]:
    """The caption column (the index of an image-text run has refused or skipped rows without one)."""
    caps = table.column("caption").to_pylist()
    missing = [i for i, t in enumerate(caps) if t is None or not t.strip()]
    if len(missing) == len(caps):
        raise CurateError(f"{where}: the dataset has no captions (an image-text run needs a caption field)")
    if missing:
        raise CurateError(f"{where}: row {missing[0]} has no caption ({len(missing)} rows in all): rerun index "
                          f"(an image-text run refuses them, or skips them with index.on_error: skip)")
    return caps
