"""A small CLIP we train ourselves (open_clip towers), embed with and evaluate."""

from stages.learn.clip.evaluate import (TEMPLATES, class_text_embeddings, embed_images, embed_texts, linear_probe_accuracy,
                       zero_shot_accuracy)
from stages.learn.clip.model import ClipArch, build_clip, load_clip_checkpoint, prepare_images, save_clip, tokenize
from stages.learn.clip.train import ClipRecipe, clip_loss, train_clip

__all__ = ["ClipArch", "ClipRecipe", "TEMPLATES", "build_clip", "class_text_embeddings", "clip_loss", "embed_images",
           "embed_texts", "linear_probe_accuracy", "load_clip_checkpoint", "prepare_images", "save_clip", "tokenize",
           "train_clip", "zero_shot_accuracy"]
