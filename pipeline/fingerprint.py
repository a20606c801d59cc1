"""Fingerprints: sha256 of canonical JSON and of file contents (the DVC model)."""

from __future__ import annotations

import hashlib
import json
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
    import os

    root = os.environ.get("CURATE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "curate")
    return Path(root)


def hash_file_cached(path: str | Path) -> str:
    """hash_file, remembered by (path, size, mtime, ctime, inode): `status` on a large dataset
    stats its shards instead of reading them. Any write to a file changes its ctime (which no
    tool can set back), so a changed file is never answered from the cache. The cache is
    best effort: where it cannot be written, the hash is simply computed."""
    import os

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
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        tmp.write_text(digest)
        os.replace(tmp, entry)
    except OSError:
        pass
    return digest
