"""Reading curate's output in a downstream trainer: a Dataset and a weighted sampler.

`ManifestDataset` indexes each compact shard's tar headers once and then reads any
sample by seeking to its members, so it supports random access and DataLoader
workers. Pickle members are refused, never decoded.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from .errors import CurateError, ShardError
from .manifest import read_parquet
from .shards import (IMAGE_EXTS, MAX_MEMBER_BYTES, check_safe, decode_image, decode_label, is_pickle_ext, iter_shard,
                     split_member_name)


def index_tar(path: str) -> dict[str, dict[str, tuple[int, int]]]:
    """key -> ext -> (data offset, size) for every file member of a tar."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf.getmembers():
                if m.isfile():
                    key, ext = split_member_name(m.name)
                    out.setdefault(key, {})[ext] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ShardError(f"shard {path}: truncated or corrupt tar: {exc}") from None
    return out


def float_npy(data: bytes, where: str) -> np.ndarray | None:
    """A distilled sample's float32 (H, W, C) image (never unpickled), or None for any other .npy."""
    import io

    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise ShardError(f"{where}: .npy does not load ({type(exc).__name__}: {exc})") from None
    return arr if arr.dtype == np.float32 and arr.ndim == 3 else None


class ManifestDataset:
    """Samples of a manifest.parquet: dict(image=uint8 CHW tensor, label, weight, key, row[, caption]).

    A distilled set's manifest (distill/<name>/) gives float32 CHW images instead (its `.npy`
    members hold the normalised pixel values the set was learned in) and row -1 (the samples
    are synthetic, not index rows). `shard` paths in the manifest are resolved relative to the manifest's folder.
    `transform`, if given, is applied to the image tensor.
    """

    def __init__(self, manifest: str | os.PathLike, transform=None):
        self.path = Path(manifest)
        t = read_parquet(self.path)
        self.keys = t.column("key").to_pylist()
        self.rows = t.column("row").fill_null(-1).to_numpy()
        self.labels = t.column("label").fill_null(-1).to_numpy().astype(np.int64)
        self.weights = (t.column("weight").to_numpy().astype(np.float32) if "weight" in t.column_names
                        else np.ones(t.num_rows, np.float32))
        base = self.path.parent
        self.shards = [s if os.path.isabs(s) else str(base / s) for s in t.column("shard").to_pylist()]
        self.transform = transform
        self._tar_index: dict[str, dict] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def _members(self, i: int) -> dict[str, bytes]:
        shard = self.shards[i]
        if shard not in self._tar_index:
            self._tar_index[shard] = index_tar(shard)
        entry = self._tar_index[shard].get(self.keys[i])
        if entry is None:
            raise ShardError(f"shard {shard}: no sample {self.keys[i]!r}")
        out = {}
        with open(shard, "rb") as fh:
            for ext, (off, size) in entry.items():
                if is_pickle_ext(ext):
                    raise ShardError(f"shard {shard}: sample {self.keys[i]!r} has pickle member .{ext}; not decoded")
                if size > MAX_MEMBER_BYTES:
                    raise ShardError(f"shard {shard}: sample {self.keys[i]!r}: member .{ext} is {size:,} bytes, "
                                     f"over {MAX_MEMBER_BYTES:,}; not read")
                fh.seek(off)
                out[ext] = fh.read(size)
        return out

    def __getitem__(self, i: int) -> dict:
        import torch

        members = self._members(i)
        where = f"shard {self.shards[i]}: sample {self.keys[i]!r}"
        ext = next((e for e in members if e in IMAGE_EXTS), None)
        if ext is None:
            raise ShardError(f"{where}: no image member")
        img = float_npy(members[ext], where) if ext == "npy" else None
        if img is None:
            img = decode_image(members[ext], ext, where=where)
        img = torch.from_numpy(np.array(img[:, :, None] if img.ndim == 2 else img)).permute(2, 0, 1)
        if self.transform is not None:
            img = self.transform(img)
        item = {"image": img, "label": int(self.labels[i]), "weight": float(self.weights[i]),
                "key": self.keys[i], "row": int(self.rows[i])}
        if "txt" in members:  # absent rather than None, so default_collate can batch items
            try:
                item["caption"] = members["txt"].decode("utf-8")
            except UnicodeDecodeError:
                raise ShardError(f"{where}: caption is not UTF-8") from None
        return item


def weighted_sampler(manifest: str | os.PathLike | ManifestDataset, num_samples: int | None = None,
                     seed: int = 0):
    """A WeightedRandomSampler drawing samples in proportion to their coreset weight."""
    import torch
    from torch.utils.data import WeightedRandomSampler

    ds = manifest if isinstance(manifest, ManifestDataset) else ManifestDataset(manifest)
    w = torch.as_tensor(ds.weights, dtype=torch.double)
    if len(w) == 0 or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"manifest {ds.path}: weights must be finite, non-negative and not all zero")
    gen = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(w, num_samples or len(w), replacement=True, generator=gen)


def read_distilled(d: Path) -> tuple[np.ndarray, np.ndarray]:
    """A distill unit's images float32 [N, C, H, W] and labels int64 [N], in manifest order,
    read from its shards (pickle members refused, .npy loaded with allow_pickle=False)."""
    d = Path(d)
    m = read_parquet(d / "manifest.parquet", ["shard", "offset", "label"])
    want: dict[str, dict[int, int]] = {}
    for i, (s, o) in enumerate(zip(m.column("shard").to_pylist(), m.column("offset").to_pylist())):
        want.setdefault(s, {})[int(o)] = i
    labels = m.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
    images: list[np.ndarray | None] = [None] * m.num_rows
    for shard, rows in want.items():
        path = str(d / shard)
        for sample in iter_shard(path):
            i = rows.get(sample.offset)
            if i is None:
                continue
            check_safe(sample, path)
            where = f"shard {path}: sample {sample.key!r}"
            if "npy" not in sample.members or "cls" not in sample.members:
                raise ShardError(f"{where}: a distilled sample needs .npy and .cls members")
            try:
                arr = np.load(io.BytesIO(sample.members["npy"]), allow_pickle=False)
            except Exception as exc:
                raise ShardError(f"{where}: .npy does not load ({type(exc).__name__}: {exc})") from None
            if arr.dtype != np.float32 or arr.ndim != 3:
                raise ShardError(f"{where}: expected a float32 (H, W, C) array, got {arr.dtype} {arr.shape}")
            if decode_label(sample.members["cls"], where=where) != labels[i]:
                raise ShardError(f"{where}: label differs from the manifest's")
            images[i] = arr.transpose(2, 0, 1)
        missing = [o for o, i in rows.items() if images[i] is None]
        if missing:
            raise ShardError(f"shard {path}: sample at offset {missing[0]} named by the manifest is not in it")
    if not images:
        raise CurateError(f"distilled set {d}: the manifest is empty")
    return np.ascontiguousarray(np.stack(images)), labels


def learned_lr(d: Path) -> float | None:
    return json.loads((Path(d) / "lr.json").read_text())["lr"]
