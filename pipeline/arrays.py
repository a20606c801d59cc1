"""Decode samples named by a manifest (shard + offset) into arrays for training.

Images come back as uint8 [N, C, H, W]; grey images have C=1. Where sizes differ, an
`image_size` must be given and every image is resized (bilinear) to a square of it.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Sequence

import numpy as np

from .errors import CurateError, ShardError
from .shards import MAX_MEMBER_BYTES, check_safe, decode_image, iter_shard


def to_chw(img: np.ndarray, size: int | None, channels: int) -> np.ndarray:
    """(H, W) or (H, W, C) uint8 -> (channels, size, size) uint8."""
    if img.ndim == 2:
        img = img[:, :, None]
    if size is not None and img.shape[:2] != (size, size):
        from PIL import Image

        pil = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
        img = np.asarray(pil.resize((size, size), Image.BILINEAR))
        if img.ndim == 2:
            img = img[:, :, None]
    if img.shape[2] != channels:
        img = np.repeat(img[:, :, :1], channels, axis=2) if channels == 3 else img.mean(2, keepdims=True).astype(np.uint8)
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def find_image(members: dict[str, bytes], exts: Sequence[str]) -> tuple[str, bytes] | None:
    for ext in exts:
        if ext in members:
            return ext, members[ext]
    return None


def decode_samples(shards: Sequence[str], offsets: Sequence[int], image_exts: Sequence[str],
                   max_member_bytes: int = MAX_MEMBER_BYTES, max_pixels: int | None = None
                   ) -> tuple[list[np.ndarray], list[str]]:
    """The images at (shard, offset) pairs as decoded, uint8 (H, W) or (H, W, C), and their keys,
    in the given order (each shard is read once)."""
    wanted: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, (s, o) in enumerate(zip(shards, offsets)):
        wanted[s][int(o)].append(i)
    decoded: list[np.ndarray | None] = [None] * len(shards)
    keys: list[str] = [""] * len(shards)
    for shard, by_offset in wanted.items():
        remaining = len(by_offset)
        for sample in iter_shard(shard, max_member_bytes):
            rows = by_offset.get(sample.offset)
            if rows is None:
                continue
            check_safe(sample, shard)
            where = f"shard {shard}: sample {sample.key!r}"
            found = find_image(sample.members, image_exts)
            if found is None:
                raise ShardError(f"{where}: no image member ({'/'.join(image_exts)})")
            img = decode_image(found[1], found[0], where=where, max_pixels=max_pixels)
            for r in rows:
                decoded[r], keys[r] = img, sample.key
            remaining -= 1
            if remaining == 0:
                break
        if remaining:
            raise ShardError(f"shard {shard}: {remaining} sample(s) named by the manifest are not in it")
    return decoded, keys


def mixed_sizes(decoded: Sequence[np.ndarray], keys: Sequence[str], shards: Sequence[str]) -> str | None:
    """The one-line error for images of several sizes (None if they share one): each size with the
    first sample that has it, and the config keys that resize them."""
    first: dict[tuple[int, int], int] = {}
    counts: dict[tuple[int, int], int] = defaultdict(int)
    for i, d in enumerate(decoded):
        first.setdefault(d.shape[:2], i)
        counts[d.shape[:2]] += 1
    if len(first) < 2:
        return None
    shown = [f"{h}x{w} ({counts[(h, w)]}, first {keys[i]!r} in {os.path.basename(shards[i])}, shape "
             f"{tuple(decoded[i].shape)})" for (h, w), i in list(first.items())[:3]]
    more = f" and {len(first) - 3} more" if len(first) > 3 else ""
    side = max(max(counts, key=counts.get))
    return (f"images have {len(first)} different sizes: {'; '.join(shown)}{more}. Set embed.image_size and "
            f"verify.image_size (e.g. --set embed.image_size={side} --set verify.image_size={side}): every image "
            "is then resized to that square")


def load_images(shards: Sequence[str], offsets: Sequence[int], image_exts: Sequence[str],
                image_size: int | None = None, channels: int | None = None,
                max_member_bytes: int = MAX_MEMBER_BYTES, max_pixels: int | None = None) -> np.ndarray:
    """Images at (shard, offset) pairs, in the given order, as uint8 [N, C, H, W].

    `channels` fixes C (grey repeated to RGB, RGB averaged to grey); pass the training
    pool's count so that train, validation, test and subsets agree. Default: the most
    channels among these images. `max_member_bytes` / `max_pixels`: the run's `index.` limits,
    for shards the index stage did not check (verify's test split).
    """
    decoded, keys = decode_samples(shards, offsets, image_exts, max_member_bytes, max_pixels)
    if not decoded:
        return np.zeros((0, 1, 1, 1), np.uint8)
    channels = channels or max(1 if d.ndim == 2 else d.shape[2] for d in decoded)
    if image_size is None:
        problem = mixed_sizes(decoded, keys, shards)
        if problem:
            raise CurateError(problem)
    return np.stack([to_chw(d, image_size, channels) for d in decoded])


def label_array(table) -> np.ndarray:
    """A manifest's labels as int64, -1 where missing."""
    return table.column("label").fill_null(-1).to_numpy().astype(np.int64)


def num_classes_of(entry, labels: np.ndarray) -> int:
    """The catalog entry's num_classes, else one more than the largest label (index checked them dense)."""
    return entry.num_classes or int(labels.max()) + 1
