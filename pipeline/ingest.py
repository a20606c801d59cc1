"""Turn raw datasets into WebDataset shards plus a catalog entry (`curate ingest`).

Sources: `digits` (scikit-learn's bundled copy, no download), `idx` (MNIST-format
.gz files), `cifar` (CIFAR-10/100 python batches, read with a restricted unpickler
that only rebuilds plain containers and numpy arrays) and `imagefolder`
(`train/<class>/*`, optional `test/<class>/*`, optional `.txt` caption per image).
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .catalog import Catalog, DatasetEntry, Fields
from .errors import CurateError
from .shards import IMAGE_EXTS, ShardWriter, decode_image, encode_png, shard_pattern, update_sizes


@dataclass
class RawSample:
    label: int
    image: np.ndarray | None = None  # encoded to PNG when written
    data: bytes | None = None  # already-encoded image bytes ...
    ext: str = "png"  # ... and their extension
    caption: str | None = None


@dataclass
class RawDataset:
    splits: dict[str, Iterable[RawSample]]
    num_classes: int
    image_exts: list[str]
    has_caption: bool = False
    class_names: list[str] | None = None
    description: str = ""


# ---------------------------------------------------------------- sources
def read_digits(src: str | None = None) -> RawDataset:
    """scikit-learn's 1,797 8x8 digits, split 80/20 stratified with a fixed seed."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
    labels = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    test_mask = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        test_mask[rng.choice(idx, size=round(0.2 * len(idx)), replace=False)] = True

    def part(mask):
        return [RawSample(label=int(labels[i]), image=images[i]) for i in np.flatnonzero(mask)]

    return RawDataset({"train": part(~test_mask), "test": part(test_mask)}, 10, ["png"],
                      description="scikit-learn digits (8x8 grey), 80/20 stratified split, seed 0")


def _read_idx(path: Path, magic: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise CurateError(f"idx file {path}: cannot read ({exc})") from None
    if len(raw) < 8 or struct.unpack(">I", raw[:4])[0] != magic:
        raise CurateError(f"idx file {path}: bad magic number (expected {magic:#010x})")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4: 4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise CurateError(f"idx file {path}: expected {int(np.prod(dims))} values, found {body.size}")
    return body.reshape(dims)


def _find(src: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (src / name).exists():
            return src / name
    raise CurateError(f"idx source {src}: missing {stem}[.gz]")


def read_idx_arrays(src: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images [N,H,W] uint8, labels [N]) of an MNIST-format split ('train' or 't10k')."""
    root = Path(src)
    images = _read_idx(_find(root, f"{split}-images-idx3-ubyte"), 0x00000803)
    labels = _read_idx(_find(root, f"{split}-labels-idx1-ubyte"), 0x00000801)
    if len(images) != len(labels):
        raise CurateError(f"idx source {src}: {len(images)} {split} images but {len(labels)} labels")
    return images, labels


def read_idx(src: str | None) -> RawDataset:
    if not src:
        raise CurateError("ingest idx: --src DIR with the *-idx?-ubyte.gz files is required")
    splits = {}
    for split, name in (("train", "train"), ("test", "t10k")):
        images, labels = read_idx_arrays(src, name)
        splits[split] = (RawSample(label=int(y), image=x) for x, y in zip(images, labels))
    return RawDataset(splits, 10, ["png"], description=f"IDX files from {Path(src).name}")


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists, bytes and numpy arrays; refuses every other global."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def _load_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = _ArrayOnlyUnpickler(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise CurateError(f"cifar batch {path}: refused or unreadable ({exc})") from None
    if not isinstance(obj, dict):
        raise CurateError(f"cifar batch {path}: expected a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_cifar(src: str | None) -> RawDataset:
    """CIFAR-10 (`data_batch_*`, `test_batch`) or CIFAR-100 (`train`, `test`) python batches."""
    if not src:
        raise CurateError("ingest cifar: --src DIR with the python batches is required")
    root = Path(src)
    train_files = sorted(root.glob("data_batch_*")) or ([root / "train"] if (root / "train").exists() else [])
    test_files = [p for p in (root / "test_batch", root / "test") if p.exists()]
    if not train_files or not test_files:
        raise CurateError(f"cifar source {src}: expected data_batch_* + test_batch (CIFAR-10) or train + test (CIFAR-100)")
    num_classes = 10

    def load(files):
        nonlocal num_classes
        for path in files:
            batch = _load_cifar_batch(path)
            key = "labels" if "labels" in batch else "fine_labels"
            if key == "fine_labels":
                num_classes = 100
            if "data" not in batch or key not in batch:
                raise CurateError(f"cifar batch {path}: missing 'data' or labels")
            data = np.asarray(batch["data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(batch[key]):
                raise CurateError(f"cifar batch {path}: data must be [N, 3072] with N labels")
            images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            yield from (RawSample(label=int(y), image=x) for x, y in zip(images, batch[key]))

    # materialise to learn num_classes before the catalog entry is written
    splits = {"train": list(load(train_files)), "test": list(load(test_files))}
    return RawDataset(splits, num_classes, ["png"], description=f"CIFAR-{num_classes} python batches")


def read_imagefolder(src: str | None) -> RawDataset:
    if not src:
        raise CurateError("ingest imagefolder: --src DIR holding train/<class>/* is required")
    root = Path(src)
    if not (root / "train").is_dir():
        raise CurateError(f"imagefolder {src}: no train/ folder")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise CurateError(f"imagefolder {src}: train/ holds no class folders")
    exts: set[str] = set()
    has_caption = False

    def files(split):
        nonlocal has_caption
        out = []
        for label, cls in enumerate(classes):
            folder = root / split / cls
            if not folder.is_dir():
                continue
            for f in sorted(folder.iterdir()):
                ext = f.suffix.lower().lstrip(".")
                if ext not in IMAGE_EXTS:
                    continue
                data = f.read_bytes()
                decode_image(data, ext, where=f"imagefolder file {f}")
                cap = f.with_suffix(".txt")
                try:
                    caption = cap.read_text(encoding="utf-8").strip() if cap.exists() else None
                except UnicodeDecodeError:
                    raise CurateError(f"imagefolder caption {cap}: not UTF-8 text") from None
                has_caption |= caption is not None
                exts.add(ext)
                out.append(RawSample(label=label, data=data, ext=ext, caption=caption))
        return out

    splits = {"train": files("train")}
    if (root / "test").is_dir():
        splits["test"] = files("test")
    return RawDataset(splits, len(classes), sorted(exts), has_caption, classes,
                      description=f"image folder {root.name}")


SOURCES: dict[str, Callable[[str | None], RawDataset]] = {
    "digits": read_digits, "idx": read_idx, "cifar": read_cifar, "imagefolder": read_imagefolder,
}


# ---------------------------------------------------------------- writing
def write_split(samples: Iterable[RawSample], out: Path, split: str, shard_size: int,
                progress: Callable[[int], None] | None = None) -> dict[str, int]:
    with ShardWriter(out, split, shard_size) as writer:
        for i, s in enumerate(samples):
            members = {"cls": str(s.label).encode()}
            if s.image is not None:
                members["png"] = encode_png(s.image)
            else:
                members[s.ext] = s.data
            if s.caption is not None:
                members["txt"] = s.caption.encode()
            writer.write(f"{split}_{i:07d}", members)
            if progress:
                progress(1)
    return writer.sizes


def ingest(source: str, out: str | os.PathLike, name: str, src: str | None = None,
           catalog: str | None = None, shard_size: int = 10000) -> DatasetEntry:
    """Write train/test shards of `source` into `out` and add catalog entry `name`."""
    if source not in SOURCES:
        raise CurateError(f"ingest: unknown source '{source}' (choose from {', '.join(SOURCES)})")
    if src and not Path(src).exists():
        raise CurateError(f"ingest {source}: --src {src} does not exist")
    raw = SOURCES[source](src)
    out = Path(out).absolute()
    cat = Catalog.load(catalog, missing_ok=True)
    from tqdm import tqdm

    # write everything beside `out` first: a killed ingest leaves the old shards untouched
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-ingest-{out.name}-{uuid.uuid4().hex[:8]}"
    all_sizes = {}
    try:
        for split, samples in raw.splits.items():
            with tqdm(desc=f"ingest {split}", unit=" samples", disable=None) as bar:
                all_sizes[split] = write_split(samples, tmp, split, shard_size, bar.update)
            if not all_sizes[split]:
                raise CurateError(f"ingest {source}: split '{split}' has no samples")
        out.mkdir(exist_ok=True)
        for split, sizes in all_sizes.items():
            for old in out.glob(f"{split}-*.tar"):
                if old.name not in sizes:
                    old.unlink()
            for shard in sizes:
                os.replace(tmp / shard, out / shard)
            update_sizes(out, sizes, prefix=split)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    splits = {}
    rel = os.path.relpath(out, cat.path.parent)
    for split, sizes in all_sizes.items():
        splits[split] = f"{rel}/{shard_pattern(split, len(sizes))}"
    entry = DatasetEntry(
        description=raw.description, splits=splits, num_classes=raw.num_classes,
        fields=Fields(image=raw.image_exts, label="cls", caption="txt" if raw.has_caption else None),
        class_names=raw.class_names,
    )
    cat.set_entry(name, entry)
    return entry
