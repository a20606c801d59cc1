"""Run store: skip when fresh, stale downstream, atomic outputs under SIGKILL, same bytes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import files_under

CURATE = [sys.executable, "-m", "pipeline.cli"]


def statuses(results):
    return {r["unit"]: r["status"] for r in results}


def test_rerun_is_cached_and_budget_change_recomputes_only_downstream(make_runner, tmp_path):
    """verify is one unit per training set: a changed budget retrains that selection and the random
    baseline of its new size, and redraws the report; the full-data baseline, the other selections
    and the baseline another selection of the old budget still needs stay cached, untouched."""
    run = tmp_path / "run"
    select = [{"method": "random", "budget": 0.1}, {"method": "stratified", "budget": 0.2},
              {"method": "stratified", "budget": 0.2, "name": "twin"}]
    first = statuses(make_runner(run, select=select).run_all())
    assert set(first.values()) == {"computed"}
    assert [u for u in first if u.startswith(("verify", "report"))] == [
        "verify/full", "verify/random-0.1", "verify/stratified-0.2", "verify/twin", "verify/random-0.2", "report"]
    assert set(statuses(make_runner(run, select=select).run_all()).values()) == {"cached"}
    ended = {u: json.loads((run / u / "_stage.json").read_text())["ended"] for u in first}

    changed = make_runner(run, select=select, overrides=["select.1.budget=0.25"])
    assert changed.state("report") == "stale" and changed.state("verify/stratified-0.25") == "missing"
    assert changed.state("verify/full") == "done" and changed.state("verify/random-0.2") == "done"
    got = statuses(changed.run_all())
    assert {u for u, s in got.items() if s == "computed"} == {
        "select/stratified-0.25", "materialize/stratified-0.25", "verify/stratified-0.25", "verify/random-0.25",
        "report"}
    assert {u for u, s in got.items() if s == "cached"} == {
        "index", "embed", "select/random-0.1", "select/twin", "materialize/random-0.1", "materialize/twin",
        "verify/full", "verify/random-0.1", "verify/twin", "verify/random-0.2"}
    for unit, status in got.items():
        if status == "cached":  # not rewritten: the same record, the same end time
            assert json.loads((run / unit / "_stage.json").read_text())["ended"] == ended[unit], unit
    report = json.loads((run / "report" / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["full", "random-0.1", "stratified-0.25", "twin",
                                                   "random-n360", "random-n288"]


def test_dataset_change_makes_everything_stale(make_runner, catalog_copy, tmp_path):
    r = make_runner(tmp_path / "run", catalog=catalog_copy)
    r.run("index")
    r.run("embed")
    shard = catalog_copy.parent / "shards" / "train-000002.tar"
    os.utime(shard, (0, 0))  # touching alone changes nothing: fingerprints hash content
    assert make_runner(tmp_path / "run", catalog=catalog_copy).state("embed") == "done"
    with open(shard, "r+b") as fh:
        fh.seek(600)
        byte = fh.read(1)
        fh.seek(600)
        fh.write(bytes([byte[0] ^ 1]))
    fresh = make_runner(tmp_path / "run", catalog=catalog_copy)
    assert fresh.state("index") == "stale" and fresh.state("embed") == "stale"


def test_upstream_missing_is_a_clear_error(make_runner):
    from pipeline.errors import CurateError

    r = make_runner()
    with pytest.raises(CurateError, match="materialize/random-0.1 needs select/random-0.1, which is missing"):
        r.run("materialize/random-0.1")


def _stage_cli(run_dir: Path, catalog: Path, stage: str, *extra):
    return subprocess.Popen([*CURATE, "stage", stage, "--run", str(run_dir), "--catalog", str(catalog), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_leaves_nothing_and_rerun_matches_uninterrupted(make_runner, digits_catalog, tmp_path):
    overrides = ["embed.epochs=8"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    for d in (ref, killed):
        r = make_runner(d, overrides=overrides)
        r.run("index")
    proc = _stage_cli(killed, digits_catalog, "embed")
    deadline = time.time() + 60
    while not list(killed.glob(".tmp-embed-*")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # well inside training
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "embed").exists()
    assert make_runner(killed, overrides=overrides).state("embed") == "missing"

    for d in (killed, ref):
        assert make_runner(d, overrides=overrides).run("embed")["status"] == "computed"
    assert not list(killed.glob(".tmp-*"))
    a, b = files_under(ref / "embed"), files_under(killed / "embed")
    assert sorted(a) == ["embeddings.json", "embeddings.npy", "grads.npy", "hnorm.npy", "probs.npy"]
    assert a == b


def test_forced_upstream_with_new_output_makes_downstream_stale(make_runner, tmp_path):
    r = make_runner(tmp_path / "run")
    for u in ("index", "select/random-0.1", "materialize/random-0.1"):
        r.run(u)
    assert r.state("materialize/random-0.1") == "done"
    rec = json.loads((tmp_path / "run" / "select" / "random-0.1" / "_stage.json").read_text())
    rec["output_hash"] = "0" * 64  # as if a forced rerun had produced different bytes
    (tmp_path / "run" / "select" / "random-0.1" / "_stage.json").write_text(json.dumps(rec))
    assert r.state("select/random-0.1") == "done" and r.state("materialize/random-0.1") == "stale"
    r.run("select/random-0.1", force=True)  # same seed, same bytes: downstream is fresh again
    assert r.state("materialize/random-0.1") == "done"


def test_leftover_cleanup_only_touches_its_own_unit(tmp_path):
    from pipeline.runner import _clean_leftovers

    (tmp_path / ".tmp-cifar-1a2b3c4d").mkdir()
    (tmp_path / ".tmp-cifar-big-1a2b3c4d").mkdir()
    (tmp_path / ".old-cifar-00ff00ff").mkdir()
    _clean_leftovers(tmp_path / "cifar")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-cifar-big-1a2b3c4d"]
