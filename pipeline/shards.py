"""WebDataset shard I/O: brace patterns, deterministic writing, safe streaming reads.

A shard is a plain tar whose members are `<key>.<ext>`; the members of one sample are
consecutive. We read and write tars ourselves (tarfile) so that every failure names
its shard and sample, output bytes are reproducible (fixed mtime/owner), pickle
members are refused by extension before any byte of them is interpreted, and memory stays
bounded on hostile input (members over a size cap are never read, images over a pixel cap
never decoded, brace patterns counted before they are expanded).
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import tarfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import CurateError, ShardError
from .storage import is_url, open_stream

# Members that would need unpickling to read: never decoded from a shard.
UNSAFE_EXTS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "ckpt", "joblib"})
IMAGE_EXTS = frozenset({"png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm", "npy"})
# Limits on hostile input (README, "Run configuration"): a member larger than this is never read
# (index.max_member_bytes, 64 MiB), and a brace pattern may name at most this many shards.
MAX_MEMBER_BYTES = 64 * 2**20
MAX_SHARDS = 1_000_000

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(\d{1,18})\.\.(\d{1,18})")  # longer numbers are no shard range: a literal


def bad_sample(reason: str, message: str) -> ShardError:
    """A ShardError tagged with a short reason (the key of index's `skipped_by_reason`)."""
    exc = ShardError(message)
    exc.reason = reason
    return exc


def is_pickle_ext(ext: str) -> bool:
    """Whether any part of a member extension is pickle-like (`pkl`, `pkl.gz`, `gz.PKL`):
    compressing a pickle does not make it safe to decode."""
    return any(part in UNSAFE_EXTS for part in ext.lower().split("."))


def _options(body: str) -> Iterator[str]:
    """The options of one `{...}` group: comma-separated items, each a literal or a `lo..hi` range."""
    for item in body.split(","):
        rng = _RANGE.fullmatch(item)
        if rng:
            lo, hi = rng.groups()
            width = len(lo) if lo.startswith("0") else 0
            yield from (str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
        else:
            yield item


def _count(pattern: str, limit: int) -> int:
    """How many names `pattern` expands to. Top-level groups are counted without expanding them;
    nested ones option by option, stopping once the count passes `limit`."""
    m = _BRACE.search(pattern)
    if not m:
        return 1
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    if "{" not in head:  # a top-level group: every option leaves the same rest to expand
        ranges = [_RANGE.fullmatch(item) for item in body.split(",")]
        n = sum(max(0, int(r[2]) - int(r[1]) + 1) if r else 1 for r in ranges)
        return n * _count(tail, limit) if n else 0
    total = 0  # nested: an option joins the enclosing group, so count each (lazily, stopping past the limit)
    for opt in _options(body):
        total += _count(head + opt + tail, limit - total)
        if total > limit:
            break
    return total


def _expand(pattern: str) -> Iterator[str]:
    m = _BRACE.search(pattern)
    if not m:
        yield pattern
        return
    for opt in _options(m.group(1)):
        yield from _expand(pattern[: m.start()] + opt + pattern[m.end():])


def expand_braces(pattern: str) -> list[str]:
    """Expand `{000000..000009}` ranges (zero padding kept) and `{a,b}` lists (items may be ranges), in order.

    The names are counted before they are expanded, so a pattern naming more than MAX_SHARDS
    shards is refused in one line instead of filling memory; a pattern naming one shard twice is
    refused too (its samples would be read twice).
    """
    names: dict[str, None] = {}
    try:
        if _count(pattern, MAX_SHARDS) > MAX_SHARDS:
            raise CurateError(f"brace pattern {pattern!r} names more than {MAX_SHARDS:,} shards")
        for name in _expand(pattern):
            if name in names:
                raise CurateError(f"brace pattern {pattern!r} names shard {name!r} twice")
            names[name] = None
    except RecursionError:  # each group is one level of recursion
        raise CurateError(f"brace pattern {pattern!r} has too many groups") from None
    return list(names)


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
    oversized: dict[str, int] = field(default_factory=dict)  # ext -> size of members left unread (over the cap)


def _skip_member(fh) -> None:
    """Read past a member in 1 MiB chunks, keeping none: memory stays bounded, and it is far
    faster than tarfile's own skip in stream mode (which re-slices its buffer per 10 KiB)."""
    while fh is not None and fh.read(2**20):
        pass


def _open_shard(path: str, storage_options: dict | None):
    """A local shard as its file; a URL (`s3://...`) as a retrying fsspec stream, read as it arrives
    (never downloaded whole), with `storage_options` or else its catalog entry's."""
    if is_url(path):
        return open_stream(path, storage_options)
    if not os.path.isfile(path):
        raise ShardError(f"shard {path}: no such file")
    return open(path, "rb")


def iter_shard(path: str | os.PathLike, max_member_bytes: int = MAX_MEMBER_BYTES,
               storage_options: dict | None = None) -> Iterator[Sample]:
    """Stream the samples of one shard (a path or an fsspec URL) in order, in bounded memory.

    A member larger than `max_member_bytes` is not read (the stream skips its bytes) but listed
    in `Sample.oversized`, which check_safe refuses. Raises ShardError naming the shard (and the
    last good sample) on a missing file or a truncated/corrupt tar (a sample cut short is not
    yielded), and on a key whose members are not consecutive (it would read as two samples).
    A URL that cannot be read (missing, denied, still failing after retries) is a StorageError.
    """
    path = str(path)
    current: Sample | None = None
    done: set[str] = set()  # keys already yielded: a key of this shard may not come back
    offset = 0
    try:
        stream = _open_shard(path, storage_options)
        with stream, tarfile.open(fileobj=stream, mode="r|*") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                key, ext = split_member_name(info.name)
                if current is not None and key != current.key:
                    done.add(current.key)
                    yield current
                    offset += 1
                    current = None
                if current is None:
                    if key in done:
                        raise ShardError(f"shard {path}: members of sample {key!r} are not consecutive "
                                         "(the key comes back after other samples)")
                    current = Sample(key=key, offset=offset)
                if ext in current.members or ext in current.oversized:
                    raise ShardError(f"shard {path}: sample {key!r} has member .{ext} twice")
                if info.size > max_member_bytes:
                    current.oversized[ext] = info.size
                    _skip_member(tf.extractfile(info))
                    continue
                fh = tf.extractfile(info)
                current.members[ext] = fh.read() if fh is not None else b""
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        where = f"at sample {current.key!r}" if current else "at its start"
        raise ShardError(f"shard {path}: truncated or corrupt tar ({where}): {exc}") from None
    if current is not None:
        yield current


def check_safe(sample: Sample, shard: str) -> None:
    """Refuse a sample with a pickle member (never decoded, whatever its compression) or with a
    member over the size cap (never read). The ShardError carries `.reason` for index's counts."""
    where = f"shard {shard}: sample {sample.key!r}"
    bad = sorted(ext for ext in [*sample.members, *sample.oversized] if is_pickle_ext(ext))
    if bad:
        raise bad_sample("pickle_member", f"{where} has pickle member(s) {', '.join('.' + b for b in bad)}; "
                                          "curate never unpickles shard data")
    if sample.oversized:
        ext, size = min(sample.oversized.items())
        raise bad_sample("member_too_large", f"{where}: member .{ext} is {size:,} bytes, over "
                                             "index.max_member_bytes; not read")


def _too_large(where: str, width: int, height: int, max_pixels: int | None, pil_bomb: bool) -> None:
    over_cap = max_pixels is not None and width * height > max_pixels
    if over_cap or pil_bomb:
        from PIL import Image

        limit = (f"index.max_pixels ({max_pixels:,})" if over_cap
                 else f"PIL's decompression-bomb limit ({Image.MAX_IMAGE_PIXELS:,})")
        raise bad_sample("image_too_large", f"{where}: image is {width}x{height} = {width * height:,} pixels, "
                                            f"over {limit}; not decoded")


def _npy_image(data: bytes, where: str, max_pixels: int | None) -> np.ndarray:
    """A uint8 (H, W[, C]) .npy, its header checked before its data is loaded (never unpickled)."""
    fmt = np.lib.format
    fh = io.BytesIO(data)
    read_header = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(fmt.read_magic(fh))
    if read_header is None:
        raise ValueError("unsupported .npy format version")
    shape, _, dtype = read_header(fh)
    if dtype != np.uint8 or len(shape) not in (2, 3):
        raise ValueError(f"npy image must be uint8 (H, W) or (H, W, C), got {dtype} {shape}")
    _too_large(where, shape[1], shape[0], max_pixels, False)
    return np.load(io.BytesIO(data), allow_pickle=False)


def _pil_image(data: bytes, where: str, max_pixels: int | None) -> np.ndarray:
    """Image.open reads only the header: the size is checked before any pixel is decoded. PIL's
    decompression-bomb warning is caught (not shown) and refuses the image like the cap does."""
    from PIL import Image

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise bad_sample("image_too_large", f"{where}: image is too large to decode ({exc})") from None
    bomb = any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught)
    with img:
        _too_large(where, img.size[0], img.size[1], max_pixels, bomb)
        img.load()
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB")
        return np.asarray(img, dtype=np.uint8)


def decode_image(data: bytes, ext: str, *, where: str = "", max_pixels: int | None = None) -> np.ndarray:
    """Decode an image member to a uint8 array (H, W) or (H, W, C); raise ShardError if it cannot.

    An image whose header declares more than `max_pixels` pixels (None: no cap of ours; PIL's
    decompression-bomb limit applies in any case) is refused before its pixels are decoded, with
    reason image_too_large.
    """
    try:
        if ext == "npy":
            return _npy_image(data, where, max_pixels)
        return _pil_image(data, where, max_pixels)
    except ShardError:
        raise
    except Exception as exc:  # PIL raises many types for bad bytes
        why = re.sub(r" object at 0x[0-9a-f]+", "", str(exc))  # PIL names the buffer by its address: not the same twice
        raise ShardError(f"{where}: image member .{ext} does not decode ({type(exc).__name__}: {why})") from None


_LABEL = re.compile(rb"\s*(\d+)\s*")  # a bytes pattern: \s and \d match ASCII only


def decode_label(data: bytes, *, where: str = "") -> int:
    """A label member: ASCII decimal digits, optionally surrounded by ASCII whitespace ("3", "3\\n",
    " 3 "), nothing else. Signs, underscores (`1_0`), `0x3` and non-ASCII digits are refused, though
    Python's int() takes some of them, so that every reader agrees on every label."""
    m = _LABEL.fullmatch(data)
    if m is None or len(m.group(1)) > 18:  # 18 digits: far past any class bound, and int() stays cheap
        raise ShardError(f"{where}: label member is not a non-negative decimal integer: {data[:20]!r}")
    return int(m.group(1))


def decode_json(data: bytes, *, where: str = ""):
    """A `.json` member's value; bad UTF-8, bad JSON and nesting too deep to parse are one ShardError
    (reason bad_json)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise bad_sample("bad_json", f"{where}: json member does not parse ({type(exc).__name__})") from None


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
    """Write samples into `prefix-%06d.tar` shards.

    A new shard starts when the current one holds `shard_size` samples, when adding the next
    sample would take it past `shard_bytes` (a shard with one sample is never split), or, with
    `counts` (from plan_shards), when it holds its planned count: a writer that knows how many
    samples come plans balanced shards, and the byte target may split them further.
    Each shard is written to a temporary name and renamed when closed, and `sizes.json`
    (basename -> count) in `out_dir` is updated when the writer closes. Bytes depend only
    on the samples written, so reruns are byte-identical.
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str, shard_size: int = 10000, *,
                 shard_bytes: int | None = None, counts: list[int] | None = None):
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        if shard_bytes is not None and shard_bytes < 1:
            raise ValueError("shard_bytes must be >= 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.shard_size = shard_size
        self.shard_bytes = shard_bytes
        # sample positions where a planned shard ends (the last one needs no boundary)
        self._ends = set(np.cumsum(counts[:-1]).tolist()) if counts else set()
        self.sizes: dict[str, int] = {}
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._name = ""
        self._count = 0
        self._bytes = 0
        self._keys: set[str] = set()

    def _full(self, size: int) -> bool:
        if self._tar is None:
            return True
        if self._count >= self.shard_size or len(self._keys) - 1 in self._ends:
            return True
        return self.shard_bytes is not None and self._count > 0 and self._bytes + size > self.shard_bytes

    def write(self, key: str, members: dict[str, bytes]) -> tuple[str, int]:
        """Add one sample; return (shard basename, offset in shard)."""
        if "." in key or not key:
            raise ShardError(f"sample key {key!r}: keys must be non-empty and contain no dots")
        if key in self._keys:
            raise ShardError(f"sample key {key!r} written twice")
        self._keys.add(key)
        size = tar_bytes(key, members)
        if self._full(size):
            self._close_shard()
            self._name = f"{self.prefix}-{len(self.sizes):06d}.tar"
            self._tmp = temp_path(self.out_dir / self._name)
            self._tar = tarfile.open(self._tmp, mode="w", format=tarfile.GNU_FORMAT)  # long keys allowed
            self._count = self._bytes = 0
        for ext in sorted(members):
            data = members[ext]
            self._tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
        offset = self._count
        self._count += 1
        self._bytes += size
        self.sizes[self._name] = self._count
        return self._name, offset

    def _close_shard(self) -> None:
        if self._tar is not None:
            tar, self._tar = self._tar, None
            try:
                tar.close()
                os.replace(self._tmp, self.out_dir / self._name)
            except BaseException:
                self._tmp.unlink(missing_ok=True)
                raise

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


MIN_SHARD_SAMPLES = 8  # a planned shard is never split below this many samples


def plan_shards(n: int, shard_size: int, min_shards: int = 1) -> list[int]:
    """Balanced sample counts for `n` samples known in advance: enough shards that none holds more
    than `shard_size`, and at least `min_shards` as long as each keeps MIN_SHARD_SAMPLES.

    With min_shards 8, any set of 64 or more samples is at least 8 shards, so a DataLoader's
    workers (which split by shard) each get some; shard sizes differ by at most one.
    """
    if n <= 0:
        return []
    k = max(1, -(-n // shard_size), min(min_shards, n // MIN_SHARD_SAMPLES))
    return [n // k + (i < n % k) for i in range(k)]


def tar_bytes(key: str, members: dict[str, bytes]) -> int:
    """Bytes one sample takes in a GNU tar: a 512-byte header per member (plus a long-name block
    for names over 100 bytes) and its data padded to 512."""
    total = 0
    for ext, data in members.items():
        name = len(f"{key}.{ext}".encode())
        total += 512 + -(-len(data) // 512) * 512
        if name > 100:
            total += 512 + -(-(name + 1) // 512) * 512
    return total


def read_sizes(path: Path) -> dict[str, int]:
    """A sizes.json: a JSON object of shard basename -> sample count (a non-negative int)."""
    try:
        sizes = json.loads(Path(path).read_bytes())
    except ValueError:  # bad UTF-8 or bad JSON
        sizes = None
    if not isinstance(sizes, dict) or not all(type(n) is int and n >= 0 for n in sizes.values()):
        raise CurateError(f"{path}: expected a JSON object of shard name -> sample count (a non-negative integer)")
    return sizes


def update_sizes(out_dir: Path, sizes: dict[str, int], prefix: str | None = None) -> None:
    """Merge `sizes` into out_dir/sizes.json, replacing earlier entries of the same prefix."""
    path = Path(out_dir) / "sizes.json"
    merged: dict[str, int] = {}
    if path.exists():
        merged = read_sizes(path)
        if prefix is not None:
            merged = {k: v for k, v in merged.items() if not k.startswith(prefix + "-")}
    merged.update(sizes)
    write_text_atomic(path, json.dumps(dict(sorted(merged.items())), indent=1) + "\n")


def temp_path(path: Path) -> Path:
    """A hidden sibling of `path` unique to this process and call: two writers of one file never
    share (and clobber) a temporary."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a unique temporary and rename into place; the temporary is removed if that fails."""
    tmp = temp_path(Path(path))
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
