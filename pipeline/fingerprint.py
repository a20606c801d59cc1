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
