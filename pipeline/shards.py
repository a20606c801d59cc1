"""WebDataset shard I/O: brace patterns, deterministic writing, safe streaming reads.

A shard is a plain tar whose members are `<key>.<ext>`; the members of one sample are
consecutive. We read and write tars ourselves (tarfile) so that every failure names
its shard and sample, output bytes are reproducible (fixed mtime/owner), and pickle
members are refused by extension before any byte of them is interpreted.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import ShardError

# Members that would need unpickling to read: never decoded from a shard.
UNSAFE_EXTS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "ckpt", "joblib"})
IMAGE_EXTS = frozenset({"png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm", "npy"})

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand `{000000..000009}` ranges (zero padding kept) and `{a,b}` lists, in order."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end():]
    return [p for opt in options for p in expand_braces(head + opt + tail)]


def shard_pattern(prefix: str, count: int) -> str:
    """The brace pattern naming `count` shards `prefix-000000.tar` ... ."""
    if count == 1:
        return f"{prefix}-000000.tar"
    return f"{prefix}-{{000000..{count - 1:06d}}}.tar"


def split_member_name(name: str) -> tuple[str, str]:
    """`dir/key.ext.gz` -> (`dir/key`, `ext.gz`): the key ends at the basename's first dot."""
    dirname, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        return name, ""
    return (f"{dirname}/{stem}" if dirname else stem), ext.lower()


@dataclass
class Sample:
    key: str
    offset: int  # position of the sample within its shard
    members: dict[str, bytes] = field(default_factory=dict)


def iter_shard(path: str | os.PathLike) -> Iterator[Sample]:
    """Stream the samples of one shard in order.

    Raises ShardError naming the shard (and the last good sample) on a missing file or a
    truncated/corrupt tar; a sample cut short by truncation is not yielded.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise ShardError(f"shard {path}: no such file")
    current: Sample | None = None
    offset = 0
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                key, ext = split_member_name(info.name)
                if current is not None and key != current.key:
                    yield current
                    offset += 1
                    current = None
                if current is None:
                    current = Sample(key=key, offset=offset)
                if ext in current.members:
                    raise ShardError(f"shard {path}: sample {key!r} has member .{ext} twice")
                fh = tf.extractfile(info)
                current.members[ext] = fh.read() if fh is not None else b""
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        where = f"at sample {current.key!r}" if current else "at its start"
        raise ShardError(f"shard {path}: truncated or corrupt tar ({where}): {exc}") from None
    if current is not None:
        yield current


def check_safe(sample: Sample, shard: str) -> None:
    """Refuse samples carrying pickle members (unsafe to decode, so never decoded)."""
    bad = sorted(ext for ext in sample.members if ext.rsplit(".", 1)[-1] in UNSAFE_EXTS)
    if bad:
        raise ShardError(
            f"shard {shard}: sample {sample.key!r} has pickle member(s) {', '.join('.' + b for b in bad)}; "
            "curate never unpickles shard data"
        )


def decode_image(data: bytes, ext: str, *, where: str = "") -> np.ndarray:
    """Decode an image member to a uint8 array (H, W) or (H, W, C); raise ShardError if it cannot."""
    try:
        if ext == "npy":
            arr = np.load(io.BytesIO(data), allow_pickle=False)
            if arr.dtype != np.uint8:
                raise ValueError(f"npy image must be uint8, got {arr.dtype}")
            return arr
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode not in ("L", "RGB"):
                img = img.convert("RGB")
            return np.asarray(img, dtype=np.uint8)
    except Exception as exc:  # PIL raises many types for bad bytes
        raise ShardError(f"{where}: image member .{ext} does not decode ({type(exc).__name__}: {exc})") from None


def decode_label(data: bytes, *, where: str = "") -> int:
    try:
        return int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ShardError(f"{where}: label member is not an integer: {data[:20]!r}") from None


def encode_png(img: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W) or (H, W, 3) array; deterministic for equal input."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG")
    return buf.getvalue()


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Write samples into `prefix-%06d.tar` shards of at most `shard_size` samples.

    Each shard is written to a temporary name and renamed when closed, and `sizes.json`
    (basename -> count) in `out_dir` is updated when the writer closes. Bytes depend only
    on the samples written, so reruns are byte-identical.
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str, shard_size: int = 10000):
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.shard_size = shard_size
        self.sizes: dict[str, int] = {}
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._name = ""
        self._count = 0
        self._keys: set[str] = set()

    def write(self, key: str, members: dict[str, bytes]) -> tuple[str, int]:
        """Add one sample; return (shard basename, offset in shard)."""
        if "." in key or not key:
            raise ShardError(f"sample key {key!r}: keys must be non-empty and contain no dots")
        if key in self._keys:
            raise ShardError(f"sample key {key!r} written twice")
        self._keys.add(key)
        if self._tar is None or self._count >= self.shard_size:
            self._close_shard()
            self._name = f"{self.prefix}-{len(self.sizes):06d}.tar"
            self._tmp = self.out_dir / f".{self._name}.tmp"
            self._tar = tarfile.open(self._tmp, mode="w", format=tarfile.GNU_FORMAT)  # long keys allowed
            self._count = 0
        for ext in sorted(members):
            data = members[ext]
            self._tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
        offset = self._count
        self._count += 1
        self.sizes[self._name] = self._count
        return self._name, offset

    def _close_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.replace(self._tmp, self.out_dir / self._name)
            self._tar = None

    def close(self) -> dict[str, int]:
        self._close_shard()
        update_sizes(self.out_dir, self.sizes, prefix=self.prefix)
        return dict(self.sizes)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        elif self._tar is not None:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)


def update_sizes(out_dir: Path, sizes: dict[str, int], prefix: str | None = None) -> None:
    """Merge `sizes` into out_dir/sizes.json, replacing earlier entries of the same prefix."""
    path = Path(out_dir) / "sizes.json"
    merged: dict[str, int] = {}
    if path.exists():
        merged = json.loads(path.read_text())
        if prefix is not None:
            merged = {k: v for k, v in merged.items() if not k.startswith(prefix + "-")}
    merged.update(sizes)
    write_text_atomic(path, json.dumps(dict(sorted(merged.items())), indent=1) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
