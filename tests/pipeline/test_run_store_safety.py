"""The run store never destroys what curate did not create, one process computes a unit at a
time, SIGTERM leaves nothing half-written, and outputs are what `_stage.json` claims."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from pipeline.errors import CurateError
from tests.helpers import CURATE, curate, fast_config, one_line_error


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(root.rglob("*"))}


def write_config(path: Path, run_dir: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(fast_config(run_dir, **sections)))
    return path


# ------------------------------------------------------------ whose directory is it
def test_run_dir_with_user_folders_is_refused_and_left_untouched(digits_catalog, tmp_path):
    run = tmp_path / "thesis"
    (run / "index").mkdir(parents=True)
    (run / "index" / "chapter1.tex").write_text("\\chapter{One}")
    (run / "verify").mkdir()
    (run / "verify" / "results.csv").write_text("a,b\n1,2\n")
    (run / "run.json").write_text(json.dumps({"config": {"my": "own"}}))
    before = snapshot(run)
    cfg = write_config(tmp_path / "c.yaml", run)
    err = one_line_error(curate("stage", "index", "--run", str(run), "--config", str(cfg),
                                "--catalog", str(digits_catalog)))
    assert f"run {run}: run.json was not written by curate" in err
    (run / "run.json").unlink()
    before.pop("run.json")
    err = one_line_error(curate("stage", "index", "--run", str(run), "--config", str(cfg),
                                "--catalog", str(digits_catalog)))
    assert "holds" in err and "but no curate run.json" in err
    assert snapshot(run) == before


def test_unit_dir_without_stage_record_is_never_replaced(make_runner, tmp_path):
    r = make_runner(tmp_path / "run")
    (r.run_dir / "index").mkdir()
    (r.run_dir / "index" / "notes.txt").write_text("mine")
    with pytest.raises(CurateError, match=r"index: .*index exists and was not written by curate"):
        r.run("index")
    assert (r.run_dir / "index" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in r.run_dir.iterdir()) == ["index", "run.json"]  # no temp or lock left


def test_root_and_a_file_are_not_run_directories(digits_catalog, tmp_path):
    from pipeline.catalog import Catalog
    from pipeline.config import load_config
    from pipeline.runner import Runner

    r = Runner(load_config(fast_config(Path("/"))), Catalog.load(digits_catalog))
    with pytest.raises(CurateError, match="run /: directory holds .* but no curate run.json"):
        r.write_run_json()
    assert not Path("/run.json").exists()
    (tmp_path / "afile").write_text("x")
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "afile")
    err = one_line_error(curate("stage", "index", "--run", str(tmp_path / "afile"), "--config", str(cfg),
                                "--catalog", str(digits_catalog)))
    assert "is a file, not a run directory" in err
    for text in ("{not json", "[1, 2]", json.dumps({"format": "curate-run/1", "config": "nope"})):
        (tmp_path / "bad").mkdir(exist_ok=True)
        (tmp_path / "bad" / "run.json").write_text(text)
        for extra in ([], ["--config", str(cfg)]):
            err = one_line_error(curate("status", "--run", str(tmp_path / "bad"), *extra[:0]))
            assert "run.json" in err and "curate" in err
            err = one_line_error(curate("stage", "index", "--run", str(tmp_path / "bad"), *extra,
                                        "--catalog", str(digits_catalog)))
            assert "run.json" in err


def test_an_empty_directory_is_adopted(make_runner, tmp_path):
    (tmp_path / "empty").mkdir()
    r = make_runner(tmp_path / "empty")
    assert r.run("index")["status"] == "computed"
    assert json.loads((tmp_path / "empty" / "run.json").read_text())["format"] == "curate-run/1"


@pytest.mark.parametrize("name", [".", "..", ".hidden", "a/b", "x/../.."])
def test_unit_names_are_single_safe_path_components(name, tmp_path):
    from pipeline.config import load_config

    for section in ({"select": [{"method": "random", "budget": 0.1, "name": name}]},
                    {"distill": [{"method": "dm", "ipc": 1, "name": name}]}):
        with pytest.raises(CurateError, match="must be one path component"):
            load_config(fast_config(tmp_path / "run", **section))


# ------------------------------------------------------------ one process per unit
def _fake_lock(r, unit: str, pid: int, host: str | None = None, age: float = 0.0) -> Path:
    from pipeline.locks import _process_start, lock_path

    path = lock_path(r.run_dir / unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"unit": unit, "host": host or socket.gethostname(), "pid": pid,
                                "pid_start": _process_start(pid), "token": "t", "started": "earlier"}))
    if age:
        os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_a_live_holder_blocks_and_wait_waits_for_it(make_runner, tmp_path):
    r = make_runner(tmp_path / "run")
    holder = subprocess.Popen(["sleep", "60"])
    try:
        lock = _fake_lock(r, "index", holder.pid)
        with pytest.raises(CurateError, match=rf"index is being computed by .* pid {holder.pid} .*--wait"):
            r.run("index")
        rows = {row["unit"]: row for row in r.status()}
        assert rows["index"]["state"] == "running" and f"pid {holder.pid}" in rows["index"]["why"]
        # a leftover of the live holder is not touched while it holds the lock
        live_tmp = r.run_dir / ".tmp-index-0badcafe"
        live_tmp.mkdir()
        r.wait = True
        result = {}
        waiter = threading.Thread(target=lambda: result.update(r.run("index")))
        waiter.start()
        time.sleep(1.5)
        assert waiter.is_alive() and live_tmp.exists()
        holder.kill()
        holder.wait()
        waiter.join(60)
        assert result["status"] == "computed"
        assert not lock.exists() and not live_tmp.exists()  # the dead holder's leftovers are gone
    finally:
        holder.kill()


def test_stale_locks_are_broken(make_runner, tmp_path):
    r = make_runner(tmp_path / "run")
    dead = subprocess.Popen(["true"])
    dead.wait()
    _fake_lock(r, "index", dead.pid)
    assert r.run("index")["status"] == "computed"
    # another host's lock: alive while its heartbeat is recent, stale after CURATE_LOCK_STALE_S (300 s)
    _fake_lock(r, "select/random-0.1", 1, host="elsewhere.example")
    with pytest.raises(CurateError, match="being computed by elsewhere.example pid 1"):
        r.run("select/random-0.1")
    _fake_lock(r, "select/random-0.1", 1, host="elsewhere.example", age=301)
    assert r.run("select/random-0.1")["status"] == "computed"
    assert not list(r.run_dir.rglob(".lock-*"))


def test_two_processes_forcing_one_stage(make_runner, digits_catalog, tmp_path):
    r = make_runner(tmp_path / "run")
    r.run("index")
    args = ["stage", "select", "--run", str(r.run_dir), "--catalog", str(digits_catalog), "--force"]
    for extra in (["--wait"], []):
        procs = [subprocess.Popen([*CURATE, *args, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        outs = [(p.wait(120), *p.communicate()) for p in procs]
        for rc, out, err in outs:
            assert rc == 0 or (rc == 1 and "is being computed by" in err and len(err.strip().splitlines()) == 1), err
            assert "Traceback" not in err
        if extra:
            assert all(rc == 0 for rc, _, _ in outs)
        assert r.state("select/random-0.1") == "done" and r.state("select/stratified-0.2") == "done"
        assert not list(r.run_dir.rglob(".tmp-*")) and not list(r.run_dir.rglob(".lock-*"))


def _wait_for(pred, timeout=60.0):
    deadline = time.time() + timeout
    while not pred() and time.time() < deadline:
        time.sleep(0.05)
    return pred()


def test_sigterm_stops_a_stage_at_once_and_leaves_nothing(make_runner, digits_catalog, tmp_path):
    r = make_runner(tmp_path / "run", overrides=["embed.epochs=50"])
    r.run("index")
    proc = subprocess.Popen([*CURATE, "stage", "embed", "--run", str(r.run_dir), "--catalog", str(digits_catalog)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for(lambda: list(r.run_dir.glob(".tmp-embed-*")))
    time.sleep(1.0)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    assert time.time() - t0 < 10 and proc.returncode != 0
    assert "Traceback" not in proc.stderr.read()
    assert not list(r.run_dir.glob(".tmp-*")) and not list(r.run_dir.glob(".lock-*"))
    assert not (r.run_dir / "embed").exists()


def test_sigterm_stops_a_prefect_flow_within_seconds(digits_catalog, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", embed={"epochs": 200})
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    proc = subprocess.Popen([*CURATE, "run", str(cfg), "--catalog", str(digits_catalog)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_for(lambda: list((tmp_path / "run").glob(".tmp-embed-*")), timeout=180)
        time.sleep(1.0)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        assert time.time() - t0 < 15
    finally:
        proc.kill()
    run = tmp_path / "run"
    assert not list(run.glob(".tmp-*")) and not list(run.glob(".lock-*")) and not (run / "embed").exists()
    assert (run / "index" / "_stage.json").exists()


# ------------------------------------------------------------ outputs are what they claim
def test_tampered_output_is_stale_and_downstream_with_it(make_runner, digits_catalog, tmp_path):
    r = make_runner(tmp_path / "run")
    for u in ("index", "select/random-0.1", "materialize/random-0.1"):
        r.run(u)
    sel = r.run_dir / "select" / "random-0.1" / "selection.parquet"
    st = sel.stat()
    data = bytearray(sel.read_bytes())
    data[len(data) // 2] ^= 0xFF
    sel.write_bytes(bytes(data))
    os.utime(sel, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only a rehash sees it
    assert r.state("select/random-0.1") == "done"
    assert r.state("select/random-0.1", rehash=True) == "stale"
    res = curate("status", "--run", str(r.run_dir), "--verify")
    lines = {ln.split()[0]: ln for ln in res.stdout.splitlines()}
    assert "stale" in lines["select/random-0.1"] and "selection.parquet was changed" in lines["select/random-0.1"]
    assert " stale " in lines["materialize/random-0.1"] and "select/random-0.1 is stale" in lines["materialize/random-0.1"]
    os.utime(sel)  # an edit that moved the mtime is seen without --verify
    assert r.state("select/random-0.1") == "stale" and r.state("materialize/random-0.1") == "stale"
    with pytest.raises(CurateError, match="needs select/random-0.1, which is stale"):
        r.run("materialize/random-0.1", force=True)
    manifest = r.run_dir / "materialize" / "random-0.1" / "manifest.parquet"
    r.run("select/random-0.1")  # recomputed: same seed, same bytes
    assert r.state("materialize/random-0.1") == "done"
    manifest.unlink()
    assert r.explain("materialize/random-0.1") == ("stale", "output manifest.parquet is missing")


def test_shard_hashes_are_cached_by_stat(catalog_copy, monkeypatch):
    from pipeline import fingerprint
    from pipeline.catalog import Catalog

    cat = Catalog.load(catalog_copy)
    first = cat.fingerprint("digits", "train")
    calls = []
    real = fingerprint.hash_file
    monkeypatch.setattr(fingerprint, "hash_file", lambda p, *a: calls.append(p) or real(p, *a))
    assert Catalog.load(catalog_copy).fingerprint("digits", "train") == first and calls == []
    shard = catalog_copy.parent / "shards" / "train-000001.tar"
    st = shard.stat()
    with open(shard, "r+b") as fh:
        fh.seek(700)
        byte = fh.read(1)
        fh.seek(700)
        fh.write(bytes([byte[0] ^ 1]))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime; the ctime still moves
    assert Catalog.load(catalog_copy).fingerprint("digits", "train") != first
    assert calls == [str(shard)]


def test_disk_full_is_one_line_and_keeps_the_old_output(make_runner, monkeypatch, tmp_path):
    from stages.registry import STAGES

    r = make_runner(tmp_path / "run")
    r.run("index")
    before = snapshot(r.run_dir / "index")

    def full(ctx):
        (ctx.out / "index.parquet").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(ctx.out / "index.parquet"))

    monkeypatch.setattr(STAGES["index"], "run", full)
    with pytest.raises(CurateError, match=r"^index: no space left on device writing .*index.parquet "
                                          r"\(\d+\.\d MiB free\); the previous output, if any, is intact$"):
        r.run("index", force=True)
    assert snapshot(r.run_dir / "index") == before and r.state("index") == "done"
    assert sorted(p.name for p in r.run_dir.iterdir()) == ["index", "run.json"]


def test_a_cached_run_needs_no_write(make_runner, digits_catalog, tmp_path):
    """A read-only run directory: every unit cached, status answered, and not one write under it
    (checked with an audit hook, since root ignores file modes)."""
    from pipeline.runner import Runner

    r = make_runner(tmp_path / "run")
    for u in ("index", "select/random-0.1", "materialize/random-0.1"):
        r.run(u)
    root = str(r.run_dir)
    writes = []

    def under(a) -> bool:
        return isinstance(a, (str, os.PathLike)) and os.fspath(a).startswith(root)

    def hook(event, args):
        if event == "open" and under(args[0]):
            mode, flags = args[1], args[2]
            if (mode is not None and any(c in mode for c in "wax+")) or \
                    (mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
                writes.append(args)
        if event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.utime", "shutil.rmtree") \
                and any(under(a) for a in args):
            writes.append((event, args))

    ACTIVE.append(hook)
    try:
        again = Runner.from_run_dir(root, catalog=str(digits_catalog))
        again.write_run_json()
        assert [again.run(u)["status"] for u in ("index", "select/random-0.1", "materialize/random-0.1")] == ["cached"] * 3
        again.status()
    finally:
        ACTIVE.clear()
    assert writes == []


ACTIVE: list = []
sys.addaudithook(lambda event, args: [h(event, args) for h in ACTIVE])


def test_a_run_from_an_older_curate_is_stale_not_a_traceback(make_runner, digits_catalog, tmp_path):
    """A run directory written before this version (no format marker in run.json, records without
    output lists, resources as a plain dict, an older index version): status answers, every unit
    built on the old index is stale, and rerunning recomputes it."""
    r = make_runner(tmp_path / "run")
    for u in ("index", "select/random-0.1", "materialize/random-0.1"):
        r.run(u)
    run_json = json.loads((r.run_dir / "run.json").read_text())
    run_json.pop("format")
    (r.run_dir / "run.json").write_text(json.dumps(run_json))
    for unit in ("index", "select/random-0.1", "materialize/random-0.1"):
        path = r.run_dir / unit / "_stage.json"
        rec = json.loads(path.read_text())
        rec.pop("outputs")
        rec["resources"] = {"cpu": 1}
        if unit == "index":
            rec["stage_version"], rec["fingerprint"] = 2, "0" * 64
        path.write_text(json.dumps(rec))
    res = curate("status", "--run", str(r.run_dir), "--catalog", str(digits_catalog))
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    states = {ln.split()[0]: ln.split()[1] for ln in res.stdout.splitlines()}
    assert states["index"] == states["select/random-0.1"] == states["materialize/random-0.1"] == "stale"
    res = curate("stage", "index", "--run", str(r.run_dir), "--catalog", str(digits_catalog))
    assert res.returncode == 0 and "index: computed" in res.stdout, res.stderr
