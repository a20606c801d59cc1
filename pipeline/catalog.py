"""The data catalog: named datasets, where their shards are and which members they use.

`data_catalog.yaml` (or `--catalog` / `$CURATE_CATALOG`) maps names to entries;
relative shard patterns are relative to the catalog file.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator

from .errors import CurateError
from .fingerprint import hash_file_cached, hash_json, hash_remote
from .shards import expand_braces, is_pickle_ext, write_text_atomic
from .storage import is_url, public_options, redact, redact_url, register, stat_many, url_prefix

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
    # Only on an entry materialize registered (a curated subset): its manifest.parquet, relative to
    # the catalog file. Curate replaces only entries that carry it; left out of dumps when unset.
    curated_from: str | None = Field(default=None, exclude_if=lambda v: v is None)
    # fsspec options for URL splits (s3fs: endpoint_url, profile, key/secret, ...), passed to fsspec
    # unchanged. Dumps (run.json) show credentials as *** unless context={"credentials": True}
    # (the catalog file itself); left out of dumps when empty.
    storage_options: dict[str, Any] = Field(default_factory=dict, exclude_if=lambda v: not v, repr=False)

    @field_validator("splits")
    @classmethod
    def _has_train(cls, v):
        if "train" not in v:
            raise ValueError("needs a 'train' split")
        return v

    @field_serializer("storage_options")
    def _redacted(self, v, info):
        return v if (info.context or {}).get("credentials") else redact(v)


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
        for entry in entries.values():
            _register(entry)

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
        _register(self.entries[name])  # its shard URLs open with its storage_options from now on
        return self.entries[name]

    def shards(self, name: str, split: str = "train") -> list[str]:
        """Absolute shard paths (or URLs) of a split; every one must exist."""
        return self._stat(name, split)[0]

    def _stat(self, name: str, split: str) -> tuple[list[str], dict[str, dict] | None]:
        """The split's shards, and for a URL split each shard's listing entry (size, ETag, ...)."""
        entry = self.entry(name)
        if split not in entry.splits:
            raise CurateError(f"catalog {self.path}: dataset '{name}' has no '{split}' split")
        pattern = entry.splits[split]
        base = self.path.parent
        if is_url(pattern):
            paths = expand_braces(pattern)
            infos = stat_many(paths, entry.storage_options)
            missing = [p for p in paths if infos[p] is None]
        else:
            paths = [str((base / p) if not os.path.isabs(p) else Path(p)) for p in expand_braces(pattern)]
            infos, missing = None, [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise CurateError(
                f"catalog {self.path}: dataset '{name}' split '{split}' points nowhere: "
                f"{len(missing)} of {len(paths)} shard(s) missing, first {redact_url(missing[0])}"
            )
        return paths, infos

    def fingerprint(self, name: str, split: str) -> str:
        """Fingerprint of one split: its entry, where its shards are (index.parquet records the
        paths) and their bytes (a URL's by its ETag, see fingerprint.hash_remote). Credentials in
        storage_options are left out: rotating a key changes no fingerprint."""
        e = self.entry(name)
        entry = e.model_dump(exclude={"description", "storage_options"})
        if e.storage_options:
            entry["storage_options"] = public_options(e.storage_options)
        paths, infos = self._stat(name, split)
        if infos is None:
            files = [(p, hash_file_cached(p)) for p in paths]
        else:
            files = [(p, hash_remote(p, infos[p], e.storage_options)) for p in paths]
        return hash_json({"dataset": name, "split": split, "entry": entry, "shards": files})

    def set_entry(self, name: str, entry: DatasetEntry) -> None:
        """Add or replace an entry and rewrite the catalog file atomically (untouched if equal).

        A round-trip edit: the file's comments, key order, quoting and indentation stay, and only
        the keys of this entry that changed are rewritten; a key the entry leaves at its default is
        not added to an existing entry. A new entry goes at the end, with every field written out."""
        if self.entries.get(name) == entry and self.path.exists():
            return
        from ruamel.yaml import YAML, YAMLError
        from ruamel.yaml.comments import CommentedMap

        text = self.path.read_text() if self.path.exists() else ""
        rt = YAML()
        rt.preserve_quotes = True
        rt.width = 4096  # long shard patterns stay on one line
        rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
        mapping, offset = _indents(text)
        rt.indent(mapping=mapping, sequence=offset + 2, offset=offset)
        try:
            doc = rt.load(text) if text.strip() else None
        except YAMLError as exc:
            raise CurateError(f"catalog {self.path}: not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(doc, CommentedMap):
            doc = CommentedMap()
        if not isinstance(doc.get("datasets"), CommentedMap) or not doc["datasets"]:
            doc["datasets"] = CommentedMap()
        full = entry.model_dump(context={"credentials": True})
        datasets = doc["datasets"]
        if name in datasets:
            sparse = entry.model_dump(context={"credentials": True}, exclude_defaults=True)
            datasets[name] = _merge(datasets[name], full, sparse)
        else:
            datasets[name] = full
        out = io.StringIO()
        rt.dump(doc, out)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, out.getvalue())
        self.entries[name] = entry
        _register(entry)


def _indents(text: str) -> tuple[int, int]:
    """(mapping indent, dash offset of block sequences) the file uses, so that a rewrite keeps
    them (defaults 2 and 0, PyYAML's)."""
    mapping = offset = None
    parent = None  # indentation of the previous line if it opens a block (`key:`)
    for line in text.splitlines():
        body = line.lstrip(" ")
        if not body or body.startswith("#"):
            continue
        col = len(line) - len(body)
        if parent is not None:
            if body.startswith("- ") and offset is None:
                offset = col - parent
            elif not body.startswith("-") and col > parent and mapping is None:
                mapping = col - parent
        code = body.split(" #", 1)[0].rstrip()
        parent = col if code.endswith(":") and not code.startswith("- ") else None
    return mapping or 2, max(offset or 0, 0)


def _register(entry: DatasetEntry) -> None:
    """Tell pipeline.storage which storage_options open this entry's shard URLs."""
    for pattern in entry.splits.values():
        if is_url(pattern):
            register(url_prefix(pattern), entry.storage_options)


def _merge(node, new, sparse):
    """`node` (a round-trip YAML value) made equal to `new`, in place where it is a mapping, so that
    the comments and order of keys that stay, and the style of values that do not change, are kept.
    A key missing from the node is added only where `sparse` (the non-default part of `new`) has it."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(node, CommentedMap) and isinstance(new, dict):
        sparse = sparse if isinstance(sparse, dict) else {}
        for k in [k for k in node if k not in new]:
            del node[k]
        for k, v in new.items():
            if k in node:
                node[k] = _merge(node[k], v, sparse.get(k))
            elif k in sparse:
                node[k] = v
        return node
    if node == new and isinstance(node, bool) == isinstance(new, bool):
        return node
    if isinstance(node, CommentedSeq) and isinstance(new, list):
        seq = CommentedSeq(new)
        if node.fa.flow_style():
            seq.fa.set_flow_style()
        return seq
    return new
