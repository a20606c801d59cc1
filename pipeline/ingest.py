"""Turn raw datasets into WebDataset shards plus a catalog entry (`curate ingest`).

Sources: `digits` (scikit-learn's bundled copy, no download), `idx` (MNIST-format
.gz files), `cifar` (CIFAR-10/100 python batches, read with a restricted unpickler
that only rebuilds plain containers and numpy arrays), `imagefolder`
(`train/<class>/*`, optional `test/<class>/*`, optional `.txt` caption per image; the
images without one are counted and reported, since the index stage refuses or skips
them once the catalog declares captions) and `fmnist-pairs`.

`fmnist-pairs` generates an image-caption benchmark from the Fashion-MNIST idx files
in `--src`. Class names (also the catalog's `class_names`): t-shirt, trouser,
pullover, dress, coat, sandal, shirt, sneaker, bag, ankle boot. Each train image gets
a caption from `pair_captions`: "a photo of a {name}" or "a {adjective} {name}"
(template and adjective drawn with a seeded numpy Generator), and exactly
round(noise * N) randomly chosen images (`--noise`, default 0.3) get a caption naming
a wrong class, drawn uniformly among the other nine. `.cls` keeps the TRUE class;
`.json` records `{"caption_class": c}`, the class the caption names. Test images get
their true class and the clean caption "a photo of a {name}". `--train-size N` keeps a
seeded, class-stratified subset of the 60,000 train images (in their original order);
`--seed` (default 0) seeds both the subset and the captions. A benchmark recomputes
which pairs are clean from the index's labels (row order) alone:
`pair_captions(labels, FMNIST_CLASSES, noise, seed)`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import re
import shutil
import struct
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .catalog import Catalog, DatasetEntry, Fields
from .errors import CurateError
from .shards import IMAGE_EXTS, ShardWriter, decode_image, encode_png, shard_pattern, write_text_atomic


@dataclass
class RawSample:
    label: int
    image: np.ndarray | None = None  # encoded to PNG when written
    data: bytes | None = None  # already-encoded image bytes ...
    ext: str = "png"  # ... and their extension
    caption: str | None = None
    meta: dict | None = None  # written as the .json member
    key: str | None = None  # None: `<split>_<7-digit position>`
    source: str | None = None  # the original file, relative to --src: recorded as `source` in the .json member


@dataclass
class RawDataset:
    splits: dict[str, Iterable[RawSample]]
    num_classes: int
    image_exts: list[str]
    has_caption: bool = False
    class_names: list[str] | None = None
    description: str = ""
    notes: list[str] = field(default_factory=list)  # printed once the shards are written


# ---------------------------------------------------------------- sources
def read_digits(src: str | None = None, noise: float | None = None, seed: int | None = None) -> RawDataset:
    """scikit-learn's 1,797 8x8 digits, split 80/20 stratified with a fixed seed.

    `noise` (default 0) plants label noise in the training split: exactly round(noise * N)
    samples, drawn with `seed` (default 0), get a label drawn uniformly among the other nine
    classes, and their `.json` records `{"true_label": y}` (the test split stays clean). The demo
    trains on `digits-noisy` (noise 0.1, seed 0), so data valuation has something real to find.
    """
    from sklearn.datasets import load_digits

    noise = 0.0 if noise is None else float(noise)
    seed = 0 if seed is None else int(seed)
    if not 0.0 <= noise < 1.0:
        raise CurateError(f"ingest digits: --noise {noise} is outside [0, 1)")
    if seed < 0:
        raise CurateError(f"ingest digits: --seed {seed} must be >= 0")
    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
    labels = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    test_mask = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        test_mask[rng.choice(idx, size=round(0.2 * len(idx)), replace=False)] = True
    train_rows = np.flatnonzero(~test_mask)
    given = labels.copy()
    flipped = planted_flips(len(train_rows), noise, seed)
    given[train_rows[flipped]] = flip_labels(labels[train_rows[flipped]], 10, seed)

    def part(mask):
        return [RawSample(label=int(given[i]), image=images[i],
                          meta={"true_label": int(labels[i])} if given[i] != labels[i] else None)
                for i in np.flatnonzero(mask)]

    planted = f", label noise {noise} in train ({len(flipped)} flipped), seed {seed}" if len(flipped) else ""
    return RawDataset({"train": part(~test_mask), "test": part(test_mask)}, 10, ["png"],
                      description=f"scikit-learn digits (8x8 grey), 80/20 stratified split, seed 0{planted}")


def planted_flips(n: int, noise: float, seed: int) -> np.ndarray:
    """The sorted positions (of n) whose label a `noise` ingest moves: exactly round(noise * n)."""
    return np.sort(np.random.default_rng(seed).choice(n, size=int(round(noise * n)), replace=False))


def flip_labels(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Each label moved to one of the other k - 1 classes, uniformly (seeded)."""
    rng = np.random.default_rng([seed, 1])
    return (labels + rng.integers(1, k, size=len(labels))) % k


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


_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
MAX_KEY_CHARS = 150


def _source_text(rel: str) -> str:
    """A relative path as text: a non-UTF-8 file name keeps its bytes as \\x escapes."""
    return os.fsencode(rel).decode("utf-8", "backslashreplace")


def path_keys(rel_paths: Iterable[str]) -> dict[str, str]:
    """A WebDataset key for each relative file path: key-safe, unique, stable.

    The key is the path without its extension, every run of characters other than ASCII letters,
    digits, `_` and `-` replaced by `_` (`train/square/square_005.jpg` -> `train_square_square_005`):
    no dots, no slashes. Paths whose keys would clash (`a b.jpg` and `a_b.jpg`, `x.jpg` and
    `x.png`), and keys over MAX_KEY_CHARS, get `-` and 12 hex digits of the path's sha256 instead.
    The result depends only on the set of paths, not on the order they are listed in.
    """
    def plain(rel: str) -> str:
        stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
        return _UNSAFE_KEY_CHARS.sub("_", stem) or "_"

    def hashed(rel: str) -> str:
        return f"{plain(rel)[:MAX_KEY_CHARS - 13]}-{hashlib.sha256(os.fsencode(rel)).hexdigest()[:12]}"

    keys = {rel: plain(rel) for rel in sorted(set(rel_paths))}
    keys.update({rel: hashed(rel) for rel, k in keys.items() if len(k) > MAX_KEY_CHARS})
    while True:  # each round hashes every key of a clash; hashed keys never clash again
        owners: dict[str, list[str]] = defaultdict(list)
        for rel, k in keys.items():
            owners[k].append(rel)
        clashes = [rels for rels in owners.values() if len(rels) > 1]
        if not clashes:
            return keys
        for rels in clashes:
            if all(keys[r] == hashed(r) for r in rels):
                raise CurateError(f"ingest: files {rels[0]} and {rels[1]} get the same key {keys[rels[0]]!r}")
            keys.update({r: hashed(r) for r in rels})


def read_imagefolder(src: str | None) -> RawDataset:
    """`train/<class>/*` (and `test/<class>/*`): each image keyed by its path (path_keys), which
    the `.json` member records as `source`, so manifests and errors name the original file."""
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
    uncaptioned: dict[str, int] = {}  # split -> images without a (non-empty) caption

    def listing(split) -> list[tuple[int, Path]]:
        out = []
        for label, cls in enumerate(classes):
            folder = root / split / cls
            if folder.is_dir():
                out += [(label, f) for f in sorted(folder.iterdir()) if f.suffix.lower().lstrip(".") in IMAGE_EXTS]
        return out

    listed = {split: listing(split) for split in ("train", "test") if split == "train" or (root / split).is_dir()}
    keys = path_keys(f.relative_to(root).as_posix() for files in listed.values() for _, f in files)

    def files(split):
        nonlocal has_caption
        out = []
        uncaptioned[split] = 0
        for label, f in listed[split]:
            ext = f.suffix.lower().lstrip(".")
            data = f.read_bytes()
            decode_image(data, ext, where=f"imagefolder file {f}")
            cap = f.with_suffix(".txt")
            try:
                caption = cap.read_text(encoding="utf-8").strip() if cap.exists() else None
            except UnicodeDecodeError:
                raise CurateError(f"imagefolder caption {cap}: not UTF-8 text") from None
            has_caption |= caption is not None
            uncaptioned[split] += not caption
            exts.add(ext)
            rel = f.relative_to(root).as_posix()
            out.append(RawSample(label=label, data=data, ext=ext, caption=caption, key=keys[rel],
                                 source=_source_text(rel)))
        return out

    splits = {split: files(split) for split in listed}
    notes = []
    missing = sum(uncaptioned.values())
    if has_caption and missing:
        total = sum(len(v) for v in splits.values())
        per_split = ", ".join(f"{k} {v}" for k, v in uncaptioned.items())
        notes.append(f"ingest imagefolder: {missing} of {total} images have no caption (missing or empty .txt; "
                     f"{per_split}); an image-text run refuses the training ones at the index stage "
                     "(index.on_error: raise) or skips them (skip)")
    return RawDataset(splits, len(classes), sorted(exts), has_caption, classes,
                      description=f"image folder {root.name}", notes=notes)


FMNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
PAIR_TEMPLATES = ("a photo of a {name}", "a {adj} {name}")
PAIR_ADJECTIVES = ("black", "white", "grey", "small", "large", "plain", "striped", "dark")
PAIR_OPTIONS = {"noise": "--noise", "seed": "--seed", "train_size": "--train-size"}


def pair_captions(labels: np.ndarray, class_names, noise: float, seed: int) -> tuple[list[str], np.ndarray]:
    """Captions for images of classes `labels`, exactly round(noise * N) of them naming a wrong class.

    Returns (captions, caption_classes): caption i is "a photo of a {name}" or
    "a {adjective} {name}" with name = class_names[caption_classes[i]]. The wrong
    captions sit at round(noise * N) distinct random positions, each naming a class
    drawn uniformly among the other len(class_names) - 1; every other caption names
    labels[i]. A pure function: the same inputs give the same output.
    """
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    names = list(class_names)
    k, n = len(names), len(labels)
    if not 0.0 <= noise < 1.0:
        raise CurateError(f"pair_captions: noise {noise} is outside [0, 1)")
    if n and not (0 <= labels.min() and labels.max() < k):
        raise CurateError(f"pair_captions: labels must be in [0, {k}) (the {k} class names)")
    rng = np.random.default_rng(seed)
    n_flip = int(round(noise * n))
    if n_flip and k < 2:
        raise CurateError("pair_captions: a wrong caption needs at least 2 classes")
    flipped = rng.choice(n, size=n_flip, replace=False)
    caption_classes = labels.copy()
    if n_flip:  # a wrong class: the true one shifted by 1..k-1, uniformly
        caption_classes[flipped] = (labels[flipped] + rng.integers(1, k, size=n_flip)) % k
    templates = rng.integers(0, len(PAIR_TEMPLATES), size=n)
    adjectives = rng.integers(0, len(PAIR_ADJECTIVES), size=n)
    captions = [PAIR_TEMPLATES[t].format(name=names[c], adj=PAIR_ADJECTIVES[a])
                for c, t, a in zip(caption_classes.tolist(), templates.tolist(), adjectives.tolist())]
    return captions, caption_classes


def read_fmnist_pairs(src: str | None, noise: float | None = None, seed: int | None = None,
                      train_size: int | None = None) -> RawDataset:
    """Fashion-MNIST image-caption pairs with `noise` wrong captions in train (see the module docstring)."""
    if not src:
        raise CurateError("ingest fmnist-pairs: --src DIR with the Fashion-MNIST *-idx?-ubyte.gz files is required")
    noise = 0.3 if noise is None else float(noise)
    seed = 0 if seed is None else int(seed)
    k = len(FMNIST_CLASSES)
    if not 0.0 <= noise < 1.0:
        raise CurateError(f"ingest fmnist-pairs: --noise {noise} is outside [0, 1)")
    if seed < 0:
        raise CurateError(f"ingest fmnist-pairs: --seed {seed} must be >= 0")
    if train_size is not None and train_size < k:
        raise CurateError(f"ingest fmnist-pairs: --train-size {train_size} is below the number of classes ({k})")
    images, labels = read_idx_arrays(src, "train")
    if len(labels) and int(labels.max()) >= k:
        raise CurateError(f"ingest fmnist-pairs: {src} has train label {int(labels.max())}; Fashion-MNIST has {k} classes")
    if train_size is not None and train_size > len(labels):
        raise CurateError(f"ingest fmnist-pairs: --train-size {train_size} is more than the {len(labels)} "
                          "train images available")
    rows = np.arange(len(labels))
    if train_size is not None and train_size < len(labels):
        from pipeline.sampling import stratified_subset  # seeded, class proportions kept

        rows = np.sort(stratified_subset(labels.astype(np.int64), train_size, seed))
    sub_labels = labels[rows].astype(np.int64)
    captions, caption_classes = pair_captions(sub_labels, FMNIST_CLASSES, noise, seed)

    def train():
        for r, y, cap, c in zip(rows.tolist(), sub_labels.tolist(), captions, caption_classes.tolist()):
            yield RawSample(label=y, image=images[r], caption=cap, meta={"caption_class": c})

    def test():
        x, y = read_idx_arrays(src, "t10k")
        if len(y) and int(y.max()) >= k:
            raise CurateError(f"ingest fmnist-pairs: {src} has test label {int(y.max())}; Fashion-MNIST has {k} classes")
        for img, c in zip(x, y.tolist()):
            yield RawSample(label=c, image=img, caption=PAIR_TEMPLATES[0].format(name=FMNIST_CLASSES[c]),
                            meta={"caption_class": c})

    return RawDataset({"train": train(), "test": test()}, k, ["png"], has_caption=True,
                      class_names=list(FMNIST_CLASSES),
                      description=(f"Fashion-MNIST image-caption pairs from {Path(src).name}: {len(rows)} train "
                                   f"images{' (class-stratified subset)' if len(rows) < len(labels) else ''}, "
                                   f"noise {noise} ({int(round(noise * len(rows)))} wrong captions), seed {seed}"))


SOURCES: dict[str, Callable[[str | None], RawDataset]] = {
    "digits": read_digits, "idx": read_idx, "cifar": read_cifar, "imagefolder": read_imagefolder,
    "fmnist-pairs": read_fmnist_pairs,
}
SOURCE_OPTIONS = {"fmnist-pairs": set(PAIR_OPTIONS), "digits": {"noise", "seed"}}  # the options each source accepts beyond --src


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
            meta = s.meta if s.source is None else {**(s.meta or {}), "source": s.source}
            if meta is not None:
                members["json"] = json.dumps(meta, sort_keys=True).encode()
            writer.write(s.key or f"{split}_{i:07d}", members)
            if progress:
                progress(1)
    return writer.sizes


INGEST_SHARD = re.compile(r"(train|test)-\d{6}\.tar")  # the only names ingest writes, beside sizes.json


def _ingested_sizes(path: Path) -> dict[str, int] | None:
    """`path` (a sizes.json) as ingest writes it: shard name -> count; None if it is anything else."""
    try:
        sizes = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    ok = isinstance(sizes, dict) and all(INGEST_SHARD.fullmatch(k) and type(v) is int and v >= 0
                                         for k, v in sizes.items())
    return sizes if ok else None


def earlier_ingest(out: Path, shown: str) -> dict[str, int]:
    """The shards an earlier ingest wrote into `out`, the only files a new ingest may replace.

    `out` must be new, empty, or hold nothing but those shards and their sizes.json: ingest
    never deletes or overwrites a file it did not write, so anything else is refused.
    """
    if not out.exists() and not out.is_symlink():
        return {}
    if not out.is_dir():
        raise CurateError(f"ingest: --out {shown} exists and is not a folder; choose an empty or new folder")
    sizes = _ingested_sizes(out / "sizes.json")
    ours = {"sizes.json", *sizes} if sizes is not None else set()
    for entry in sorted(out.iterdir()):
        if entry.name not in ours or entry.is_symlink() or not entry.is_file():
            raise CurateError(f"ingest: --out {shown} holds {entry.name}, which curate ingest did not write; "
                              "choose an empty or new folder")
    return sizes or {}


def _write_sizes(out: Path, sizes: dict[str, int]) -> None:
    write_text_atomic(out / "sizes.json", json.dumps(dict(sorted(sizes.items())), indent=1) + "\n")


def ingest(source: str, out: str | os.PathLike, name: str, src: str | None = None,
           catalog: str | None = None, shard_size: int = 10000, *, noise: float | None = None,
           seed: int | None = None, train_size: int | None = None) -> DatasetEntry:
    """Write train/test shards of `source` into `out` and add catalog entry `name`.

    noise / seed apply to `digits` and `fmnist-pairs`, train_size to `fmnist-pairs` (None: defaults).
    """
    if source not in SOURCES:
        raise CurateError(f"ingest: unknown source '{source}' (choose from {', '.join(SOURCES)})")
    options = {k: v for k, v in (("noise", noise), ("seed", seed), ("train_size", train_size)) if v is not None}
    refused = [k for k in options if k not in SOURCE_OPTIONS.get(source, set())]
    extra = [PAIR_OPTIONS[k] for k in refused]
    if extra:
        users = ", ".join(sorted(s for s, opts in SOURCE_OPTIONS.items() if set(refused) & opts))
        raise CurateError(f"ingest {source}: {', '.join(extra)} {'applies' if len(extra) == 1 else 'apply'} "
                          f"to {users} only")
    if src and not Path(src).exists():
        raise CurateError(f"ingest {source}: --src {src} does not exist")
    shown, out = str(out), Path(out).absolute()
    try:
        earlier_ingest(out, shown)  # refuse before reading the source or writing anything
    except OSError as exc:
        raise CurateError(f"ingest: --out {shown}: cannot read ({exc.strerror or exc})") from None
    raw = SOURCES[source](src, **options)
    cat = Catalog.load(catalog, missing_ok=True)
    from tqdm import tqdm

    # write everything beside `out` first: a killed ingest leaves the old shards untouched
    tmp = out.parent / f".tmp-ingest-{out.name}-{uuid.uuid4().hex}"  # unique per process
    all_sizes = {}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for split, samples in raw.splits.items():
            with tqdm(desc=f"ingest {split}", unit=" samples", disable=None) as bar:
                all_sizes[split] = write_split(samples, tmp, split, shard_size, bar.update)
            if not all_sizes[split]:
                raise CurateError(f"ingest {source}: split '{split}' has no samples")
        earlier = earlier_ingest(out, shown)  # again: the folder may have changed while the source was read
        new = {shard: n for sizes in all_sizes.values() for shard, n in sizes.items()}
        out.mkdir(exist_ok=True)
        _write_sizes(out, {**earlier, **new})  # lists every shard while they move: a killed move can be rerun
        for shard in new:
            os.replace(tmp / shard, out / shard)
        for stale in set(earlier) - set(new):
            (out / stale).unlink(missing_ok=True)
        _write_sizes(out, new)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        raise CurateError(f"ingest: cannot write --out {shown} ({exc.strerror or exc}{where})") from None
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
    for note in raw.notes:
        print(note)
    return entry


DEMO_DATASET = "digits-noisy"  # the demo's catalog entry: digits with 10% planted label noise
DEMO_NOISE, DEMO_SEED = 0.1, 0


def ensure_demo_data(catalog: str | os.PathLike | None = None) -> None:
    """The demo runs on scikit-learn's digits with 10% of the training labels flipped (seed 0):
    ingest them beside the catalog if its `digits-noisy` entry is missing or points nowhere."""
    cat = Catalog.load(catalog, missing_ok=True)
    try:
        cat.shards(DEMO_DATASET, "train")
        cat.shards(DEMO_DATASET, "test")
    except CurateError:
        ingest("digits", cat.path.parent / "data" / DEMO_DATASET, DEMO_DATASET, catalog=str(cat.path),
               noise=DEMO_NOISE, seed=DEMO_SEED)
