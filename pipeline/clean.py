"""`curate clean --run DIR`: remove the unit directories the run's config no longer has.

A changed budget leaves `select/craig-0.1` behind when the config now says 0.2; those units
are found and removed here. Only what curate wrote goes: a directory counts as a unit only if
it holds a `_stage.json` curate wrote for exactly that unit (its stage and unit name match the
path), and of it only the files that record lists as outputs, the record itself, and folders
left empty. Anything else in the run directory is never touched, nor is a unit another process
holds the lock of.
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .locks import is_stale, lock_path, read_holder
from .runner import STAGE_FILE


@dataclass
class Leftover:
    unit: str
    path: Path
    files: list[Path] = field(default_factory=list)  # what curate wrote there, _stage.json last
    bytes: int = 0
    foreign: int = 0  # entries curate did not write: kept
    busy: str | None = None  # a live lock holds it: left alone


def _record(unit_dir: Path) -> dict | None:
    p = unit_dir / STAGE_FILE
    try:
        if p.is_symlink() or not p.is_file():
            return None
        rec = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def _is_plain_dir(p: Path) -> bool:
    try:
        return stat.S_ISDIR(p.lstat().st_mode)
    except OSError:
        return False


def unit_dirs(run_dir: Path) -> dict[str, Path]:
    """unit name -> directory, for every directory (one or two levels down, never through a link)
    whose `_stage.json` curate wrote for that very unit."""
    found = {}
    for top in sorted(run_dir.iterdir()):
        if top.name.startswith(".") or not _is_plain_dir(top):
            continue
        candidates = [top] + sorted(p for p in top.iterdir() if not p.name.startswith(".") and _is_plain_dir(p))
        for d in candidates:
            rel = d.relative_to(run_dir).as_posix()
            rec = _record(d)
            if rec and rec.get("stage") == rel.split("/")[0] and rec.get("unit", rel) == rel:
                found[rel] = d
    return found


def _owned_files(unit_dir: Path, rec: dict) -> list[Path]:
    """The recorded outputs that are plain files inside the unit (no link, no `..`, not inside a
    nested unit's directory), then the record itself."""
    out = []
    outputs = rec.get("outputs")
    for rel in (outputs if isinstance(outputs, dict) else {}):
        parts = Path(rel).parts
        if not parts or Path(rel).is_absolute() or ".." in parts:
            continue
        p, inside_other = unit_dir, False
        for part in parts[:-1]:
            p = p / part
            if not _is_plain_dir(p) or (p / STAGE_FILE).exists():
                inside_other = True
                break
        p = unit_dir.joinpath(*parts)
        try:
            regular = stat.S_ISREG(p.lstat().st_mode)
        except OSError:
            regular = False
        if regular and not inside_other:
            out.append(p)
    return out + [unit_dir / STAGE_FILE]


def leftovers(run_dir: Path, units: list[str]) -> list[Leftover]:
    """The unit directories of `run_dir` that are not among `units` (the config's), with what
    curate wrote in each."""
    current = set(units)
    out = []
    for unit, d in unit_dirs(Path(run_dir)).items():
        if unit in current:
            continue
        rec = _record(d) or {}
        left = Leftover(unit, d, _owned_files(d, rec))
        left.bytes = sum(p.lstat().st_size for p in left.files)
        owned = set(left.files)
        left.foreign = sum(1 for p in d.rglob("*") if not p.is_dir() and p not in owned)
        holder = read_holder(lock_path(d))
        if holder is not None and not is_stale(holder):
            left.busy = f"pid {holder.get('pid')} on {holder.get('host')}"
        out.append(left)
    return out


def remove(left: Leftover) -> int:
    """Delete what curate wrote in the unit, then the folders that are left empty; the bytes freed."""
    freed = 0
    for p in left.files:
        try:
            size = p.lstat().st_size
            p.unlink()
            freed += size
        except FileNotFoundError:
            pass
    for d in sorted((p for p in left.path.rglob("*") if _is_plain_dir(p)), key=lambda p: -len(p.parts)):
        try:
            d.rmdir()  # only an empty folder goes
        except OSError:
            pass
    try:
        left.path.rmdir()
    except OSError:
        pass
    return freed


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB, {n} bytes"


def clean(run_dir: Path, units: list[str], dry_run: bool = False, say=print) -> int:
    """Remove (or with dry_run list) the leftovers; says one line per unit; the bytes freed."""
    total, count = 0, 0
    for left in leftovers(run_dir, units):
        if left.busy:
            say(f"skipped {left.unit}: another process is computing it ({left.busy})")
            continue
        kept = f"; {left.foreign} other file(s) kept" if left.foreign else ""
        if dry_run:
            say(f"would remove {left.unit}  ({len(left.files)} files, {megabytes(left.bytes)}{kept})")
            total += left.bytes
        else:
            freed = remove(left)
            say(f"removed {left.unit}  ({len(left.files)} files, {megabytes(freed)}{kept})")
            total += freed
        count += 1
    if count == 0:
        say("nothing to clean: every unit directory here is part of the run's config")
    else:
        say(f"{'would free' if dry_run else 'freed'} {megabytes(total)} in {count} unit(s)")
    return total
