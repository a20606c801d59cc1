"""The data catalog: named datasets, where their shards are and which members they use.

`data_catalog.yaml` (or `--catalog` / `$CURATE_CATALOG`) maps names to entries;
relative shard patterns are relative to the catalog file.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import CurateError
from .fingerprint import hash_file_cached, hash_json
from .shards import expand_braces, is_pickle_ext, write_text_atomic

DEFAULT_CATALOG = "data_catalog.yaml"


class Fields(BaseModel):
    """Member extensions of a sample: image (one or several accepted), label, caption, and `extra`:
    further members that materialize copies into compact shards (it drops any it does not know)."""

    model_config = ConfigDict(extra="forbid")
    image: list[str] = Field(default_factory=lambda: ["png"])
    label: str | None = "cls"
    caption: str | None = None
    extra: list[str] = Field(default_factory=list)

    @field_validator("image", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("extra")
    @classmethod
    def _safe_extra(cls, v):
        for ext in v:
            if not ext.strip("."):
                raise ValueError(f"extension {ext!r} is empty")
            if is_pickle_ext(ext):
                raise ValueError(f"extension {ext!r} is pickle-like; curate never copies pickle members")
        return [ext.lower() for ext in v]


class DatasetEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str = ""
    splits: dict[str, str]
    fields: Fields = Field(default_factory=Fields)
    num_classes: int | None = Field(default=None, ge=1)
    class_names: list[str] | None = None

    @field_validator("splits")
    @classmethod
    def _has_train(cls, v):
        if "train" not in v:
            raise ValueError("needs a 'train' split")
        return v


def _one_line(exc: ValidationError, prefix: str) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{prefix} field '{loc}': {err['msg']}{more}"


class Catalog:
    """A loaded catalog file; entries are validated when loaded."""

    def __init__(self, path: Path, entries: dict[str, DatasetEntry]):
        self.path = path
        self.entries = entries

    @staticmethod
    def resolve_path(path: str | os.PathLike | None = None) -> Path:
        return Path(path or os.environ.get("CURATE_CATALOG") or DEFAULT_CATALOG).absolute()

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, *, missing_ok: bool = False) -> "Catalog":
        p = cls.resolve_path(path)
        if not p.exists():
            if missing_ok:
                return cls(p, {})
            raise CurateError(f"catalog {p}: no such file (use --catalog or CURATE_CATALOG)")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise CurateError(f"catalog {p}: not valid YAML: {str(exc).splitlines()[0]}") from None
        datasets = raw.get("datasets", {}) if isinstance(raw, dict) else None
        if not isinstance(datasets, dict):
            raise CurateError(f"catalog {p}: expected a top-level 'datasets:' mapping")
        unknown = [str(k) for k in raw if k != "datasets"]
        if unknown:
            raise CurateError(f"catalog {p}: unknown top-level key '{unknown[0]}' (only 'datasets' is allowed)")
        entries = {}
        for name, body in datasets.items():
            try:
                entries[name] = DatasetEntry.model_validate(body or {})
            except ValidationError as exc:
                raise CurateError(_one_line(exc, f"catalog {p}: dataset '{name}'")) from None
        return cls(p, entries)

    def entry(self, name: str) -> DatasetEntry:
        if name not in self.entries:
            known = ", ".join(sorted(self.entries)) or "none"
            raise CurateError(f"catalog {self.path}: no dataset named '{name}' (known: {known})")
        return self.entries[name]

    def shards(self, name: str, split: str = "train") -> list[str]:
        """Absolute shard paths of a split; every one must exist."""
        entry = self.entry(name)
        if split not in entry.splits:
            raise CurateError(f"catalog {self.path}: dataset '{name}' has no '{split}' split")
        pattern = entry.splits[split]
        base = self.path.parent
        paths = [str((base / p) if not os.path.isabs(p) else Path(p)) for p in expand_braces(pattern)]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise CurateError(
                f"catalog {self.path}: dataset '{name}' split '{split}' points nowhere: "
                f"{len(missing)} of {len(paths)} shard(s) missing, first {missing[0]}"
            )
        return paths

    def fingerprint(self, name: str, split: str) -> str:
        """Fingerprint of one split: its entry, where its shards are (index.parquet records the
        paths) and their bytes."""
        entry = self.entry(name).model_dump(exclude={"description"})
        files = [(p, hash_file_cached(p)) for p in self.shards(name, split)]
        return hash_json({"dataset": name, "split": split, "entry": entry, "shards": files})

    def set_entry(self, name: str, entry: DatasetEntry) -> None:
        """Add or replace an entry and rewrite the catalog file atomically (untouched if equal)."""
        if self.entries.get(name) == entry and self.path.exists():
            return
        self.entries[name] = entry
        raw = {"datasets": {n: e.model_dump(exclude_defaults=False) for n, e in sorted(self.entries.items())}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, yaml.safe_dump(raw, sort_keys=False))
