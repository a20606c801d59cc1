"""Fingerprints: sha256 of canonical JSON and of file contents (the DVC model)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal configs give equal strings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def hash_json(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def hash_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def stage_fingerprint(name: str, version: int, config: dict, inputs: dict[str, str]) -> str:
    """sha256 of (stage name, stage version, canonical config, input fingerprints)."""
    return hash_json({"stage": name, "version": version, "config": config, "inputs": inputs})


def cache_dir() -> Path:
    """Where curate keeps caches that are not part of any run (`CURATE_CACHE_DIR`, else the XDG cache)."""
    root = os.environ.get("CURATE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "curate")
    return Path(root)


def hash_file_cached(path: str | Path) -> str:
    """hash_file, remembered by (path, size, mtime, ctime, inode): `status` on a large dataset
    stats its shards instead of reading them. Any write to a file changes its ctime (which no
    tool can set back), so a changed file is never answered from the cache. The cache is
    best effort: where it cannot be written, the hash is simply computed."""
    st = os.stat(path)
    key = hash_json([os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev])
    entry = cache_dir() / "file-hashes" / key[:2] / key[2:]
    try:
        digest = entry.read_text()
        if len(digest) == 64:
            return digest
    except (OSError, UnicodeDecodeError):
        pass
    digest = hash_file(path)
    _remember(entry, digest)
    return digest


_TAGS = ("ETag", "etag", "md5Hash", "crc32c", "checksum")  # S3 / most object stores, GCS, others
_MTIMES = ("LastModified", "mtime", "updated", "last_modified", "modified")


def hash_remote(url: str, info: dict, options: dict | None = None) -> str:
    """A content token for a remote shard, from its listing entry `info` where the store vouches for
    its bytes, else from the bytes themselves.

    `etag:<ETag>:<size>`: S3 gives every write of an object a new ETag unless the bytes are the same
    (the MD5 of a single-part upload, of the parts' MD5s for a multipart one, an opaque new value
    under SSE-KMS), so a changed shard always reads as changed, and fingerprinting a split costs one
    listing instead of a download of the dataset (which is what `status` would otherwise do; DVC
    treats S3 ETags the same way). The same bytes re-uploaded in other parts change the ETag too:
    a needless rerun, never a missed change. A store without a checksum (some HTTP servers):
    `sha256:<hex>` of the streamed bytes, remembered by (url, size, modification time, non-secret
    options) where the listing has a time, recomputed each time where it has none.
    """
    from .storage import open_stream, public_options

    size = info.get("size")
    tag = next((info[k] for k in _TAGS if info.get(k)), None)
    if tag is not None:
        version = info.get("VersionId") or info.get("generation")
        return f"etag:{str(tag).strip(chr(34))}:{size}" + (f":{version}" if version else "")
    mtime = next((info[k] for k in _MTIMES if info.get(k)), None)
    entry = None
    if mtime is not None:
        key = hash_json(["url", url, size, str(mtime), public_options(options or {})])
        entry = cache_dir() / "url-hashes" / key[:2] / key[2:]
        try:
            digest = entry.read_text()
            if len(digest) == 64:
                return f"sha256:{digest}"
        except (OSError, UnicodeDecodeError):
            pass
    h = hashlib.sha256()
    with open_stream(url, options) as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    digest = h.hexdigest()
    if entry is not None:
        _remember(entry, digest)
    return f"sha256:{digest}"


def _remember(entry: Path, digest: str) -> None:
    """Cache `digest` at `entry` (written whole by rename; a cache that cannot be written is skipped)."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        tmp.write_text(digest)
        os.replace(tmp, entry)
    except OSError:
        pass
