"""Property tests on hostile input: whatever bytes a shard holds, whatever its members are
called and whatever a config says, curate either succeeds or stops with one line (a
CurateError), and it never writes outside the run directory.

Every example builds its own temporary root holding the catalog, the shards and the run
directory; the root is compared before and after, and an audit hook records any write
outside the run directory (and curate's own hash cache)."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from pipeline.errors import CurateError  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.property]
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def _png(value: int) -> bytes:
    from pipeline.shards import encode_png

    return encode_png(np.full((8, 8), value, np.uint8))


def valid_members() -> list[tuple[str, bytes]]:
    out = []
    for i in range(6):
        key = f"s{i:03d}"
        out += [(f"{key}.cls", str(i % 3).encode()), (f"{key}.json", json.dumps({"i": i}).encode()),
                (f"{key}.png", _png(40 * i)), (f"{key}.txt", f"caption {i}".encode())]
    return out


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def tree(root: Path, skip: Path) -> dict[str, tuple]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if skip not in p.parents and p != skip}


_WATCH: list = []
sys.addaudithook(lambda event, args: [w(event, args) for w in _WATCH])


@contextmanager
def no_writes_outside(*allowed: Path):
    """Record every write-open, rename, removal or mkdir outside `allowed` while the block runs."""
    allowed_s = [os.fspath(a) for a in allowed] + ["/dev"]
    bad = []

    def at(path, dir_fd):
        """`path` as the call meant it: a relative name under `dir_fd` (shutil.rmtree's fd-based walk
        removes by name in an open directory) is joined to that directory, not to the cwd."""
        if isinstance(dir_fd, int) and dir_fd >= 0 and isinstance(path, (str, os.PathLike)) \
                and not os.path.isabs(os.fspath(path)):
            try:
                return os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), os.fspath(path))
            except OSError:
                return path
        return path

    def ok(a) -> bool:
        if not isinstance(a, (str, os.PathLike)):
            return True
        p = os.path.abspath(os.fspath(a))
        return any(p == a_ or p.startswith(a_ + os.sep) for a_ in allowed_s)

    def watch(event, args):
        if event == "open":
            mode, flags = args[1], args[2]
            writes = (mode is not None and any(c in mode for c in "wax+")) or \
                (mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writes and not ok(args[0]):
                bad.append((event, args[0]))
        elif event in ("os.remove", "os.rmdir", "shutil.rmtree"):  # (path, dir_fd)
            path = at(args[0], args[1])
            if not ok(path):
                bad.append((event, path))
        elif event == "os.mkdir":  # (path, mode, dir_fd)
            path = at(args[0], args[2])
            if not ok(path):
                bad.append((event, path))
        elif event in ("os.rename", "os.link"):  # (src, dst, src_dir_fd, dst_dir_fd)
            bad.extend((event, p) for p in (at(args[0], args[2]), at(args[1], args[3])) if not ok(p))
        elif event == "os.symlink":
            bad.extend((event, a) for a in args[:2] if not ok(a))

    _WATCH.append(watch)
    try:
        yield bad
    finally:
        _WATCH.remove(watch)


@dataclass
class Outcome:
    error: str | None  # the CurateError's text, None when the subset was written
    written: bool  # materialize/random-1.0/manifest.parquet exists
    writes_outside: list  # writes the audit hook saw outside the run directory (and the hash cache)
    root_changed: bool  # anything in the temporary root outside the run directory changed


def run_pipeline(shard: bytes, overrides: list[str] = ()) -> Outcome:
    """index -> select (every sample) -> materialize over one shard, in a fresh temporary root.
    Any exception other than CurateError propagates (and fails the calling test). No catalog entry (a write outside, on purpose)."""
    from pipeline.catalog import Catalog
    from pipeline.config import load_config
    from pipeline.fingerprint import cache_dir
    from pipeline.runner import Runner

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "shards").mkdir()
        (root / "shards" / "train-000000.tar").write_bytes(shard)
        (root / "cat.yaml").write_text(yaml.safe_dump({"datasets": {"d": {
            "splits": {"train": "shards/train-000000.tar", "test": "shards/train-000000.tar"},
            "fields": {"image": ["png"], "label": "cls", "caption": "txt"}, "num_classes": 3}}}))
        run = root / "run"
        before = tree(root, run)
        error = None
        with no_writes_outside(run, cache_dir()) as bad:
            try:
                cfg = load_config({"run": str(run), "dataset": "d", "index": {"on_error": "skip"},
                                   "select": [{"method": "random", "budget": 1.0}]}, [*overrides, "materialize.register_entry=false"])
                r = Runner(cfg, Catalog.load(root / "cat.yaml"))
                r.write_run_json()
                for unit in ("index", "select/random-1.0", "materialize/random-1.0"):
                    r.run(unit)
            except CurateError as exc:
                error = str(exc)
        return Outcome(error, (run / "materialize" / "random-1.0" / "manifest.parquet").is_file(), list(bad),
                       tree(root, run) != before)


def check(out: Outcome) -> None:
    """Success (the subset written) or one line, and never a write outside the run directory."""
    hypothesis.event("one-line error" if out.error else "subset written")
    assert out.writes_outside == [] and not out.root_changed, out
    if out.error is None:
        assert out.written, out
    else:
        assert "\n" not in out.error and out.error.strip(), out.error


def test_the_valid_shard_goes_through():
    out = run_pipeline(tar_bytes(valid_members()))
    assert out.error is None and out.written and out.writes_outside == [] and not out.root_changed, out


@SETTINGS
@given(data=st.data())
def test_mutated_and_truncated_shards(data):
    shard = bytearray(tar_bytes(valid_members()))
    for _ in range(data.draw(st.integers(0, 8))):
        shard[data.draw(st.integers(0, len(shard) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(shard))))
    mutated = shard != bytearray(tar_bytes(valid_members())) or cut is not None
    out = run_pipeline(bytes(shard if cut is None else shard[:cut]),
                       [f"index.on_error={data.draw(st.sampled_from(['skip', 'raise']))}"])
    check(out)
    assert mutated or out.error is None, out.error  # the unmutated shard must go through


NAME = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=30)


@SETTINGS
@given(names=st.lists(st.one_of(NAME, st.sampled_from(
    ["a.png", "a.cls", "a.pickle.gz", "a.PTH", "../../x.png", "/abs/k.png", "k.tar.gz", ".png", "a..png",
     "d/e.png", "a.json", "a.txt", "a.npy"])), min_size=1, max_size=12),
    payload=st.sampled_from([b"", b"1", b"{}", b"\xff\xfe", None]))
def test_random_member_names(names, payload):
    members = valid_members()[:8]
    members += [(n, _png(7) if payload is None else payload) for n in names]
    check(run_pipeline(tar_bytes(members)))


KEYS = ["seed", "index.on_error", "index.val_fraction", "index.max_pixels", "index.max_member_bytes",
        "select.0.budget", "select.0.name", "select.0.method", "select.0", "select", "embed.epochs", "embed",
        "materialize.shard_size", "verify.seeds", "dataset", "nosuch", "index.nosuch"]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                   st.text(max_size=20), st.lists(st.integers(), max_size=3),
                   st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


@SETTINGS
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_random_config_values(key, value):
    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    check(run_pipeline(tar_bytes(valid_members()), [f"{key}={text}"]))
