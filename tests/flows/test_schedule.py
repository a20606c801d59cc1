"""Scheduling against a real `prefect server start` on 127.0.0.1 (temporary home), as a user
would: `curate serve` on an interval, `curate deploy` + `prefect worker start --run-once`.

Prefect's temporary test server never runs schedules, so only a real server shows that a
served deployment creates runs at all (with SQLAlchemy 2.1 it never does)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, fast_config, load_bench

pytestmark = pytest.mark.slow
PREFECT = str(Path(sys.executable).with_name("prefect"))
CURATE = str(Path(sys.executable).with_name("curate"))


BENCH = load_bench("schedule")  # its real-server helpers
api = BENCH.api


def wait_until(pred, timeout: float, step: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(step)
    return pred()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real Prefect server (its own PREFECT_HOME), stopped by its PID."""
    home = tmp_path_factory.mktemp("prefect-home")
    log = open(home / "server.log", "w")
    proc, url, env = BENCH.start_server(home, log)

    try:
        yield {"url": url, "env": env, "home": home}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        assert "bulk DML" not in (home / "server.log").read_text()


def runs_of(url: str, deployment: str) -> list[dict]:
    dep = api(url, f"/deployments/name/curate/{deployment}")
    return api(url, "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [dep["id"]]}}})


def write_config(path: Path, run_dir: str) -> Path:
    path.write_text(yaml.safe_dump(fast_config(Path(run_dir))))
    return path


def test_served_deployment_runs_on_its_schedule(server, digits_catalog, tmp_path):
    (tmp_path / "cfg").mkdir()
    cfg = write_config(tmp_path / "cfg" / "c.yaml", "../served")  # relative to the config file's folder
    started = time.time()
    serve = subprocess.Popen([CURATE, "serve", str(cfg), "--name", "every10", "--interval", "10",
                              "--catalog", str(digits_catalog)], env=server["env"], cwd="/",
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def completed():
            try:
                runs = runs_of(server["url"], "every10")
            except OSError:
                return None
            return [r for r in runs if r["state_type"] == "COMPLETED"] or None

        done = wait_until(completed, 150, step=2)
        assert done, (serve.poll(), [(r["name"], r["state_type"]) for r in runs_of(server["url"], "every10")])
        first = min(done, key=lambda r: r["start_time"])
        delay = (time.mktime(time.strptime(first["start_time"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone) - started
        print(f"first served run completed; started {delay:.1f} s after `curate serve`")
        # relative paths in the config are the config file's: cwd was / for the served process
        assert (tmp_path / "served" / "report" / "report.json").exists()
        runs = runs_of(server["url"], "every10")
        ran = [(r["start_time"], r["end_time"] or "9") for r in runs if r["start_time"] and r["state_type"] != "CANCELLED"]
        for i, a in enumerate(ran):  # never two runs of one deployment at once: an overlapping one is cancelled
            assert not any(b[0] < a[1] and a[0] < b[1] for b in ran[:i] + ran[i + 1:]), ran
        print("runs:", sorted((r["expected_start_time"], r["state_type"]) for r in runs if r["state_type"] != "SCHEDULED"))
        assert {r["state_type"] for r in runs} <= {"SCHEDULED", "PENDING", "RUNNING", "COMPLETED", "CANCELLED",
                                                   "CANCELLING"}
    finally:
        t0 = time.time()
        serve.send_signal(signal.SIGTERM)
        out = serve.communicate(timeout=60)[0]
        assert time.time() - t0 < 30
    # stopped cleanly: its schedule is paused, and no curate code failed. (Prefect 3.8's runner
    # itself sometimes logs an asyncio callback traceback while it shuts down; that one is not ours.)
    assert api(server["url"], "/deployments/name/curate/every10")["paused"] is True
    ours = [f'File "{REPO / pkg}' for pkg in ("pipeline", "stages", "flows")]
    assert "CurateError" not in out and not any(o in out for o in ours), out[-3000:]


def test_deploy_then_a_worker_runs_it_once(server, digits_catalog, tmp_path):
    env = server["env"]
    subprocess.run([PREFECT, "work-pool", "create", "local", "--type", "process"], env=env, check=True,
                   capture_output=True, timeout=60)
    cfg = write_config(tmp_path / "d.yaml", "deployed")
    res = subprocess.run([CURATE, "deploy", str(cfg), "--name", "nightly", "--pool", "local", "--catalog",
                          str(digits_catalog)], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([PREFECT, "deployment", "run", "curate/nightly"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    worker = subprocess.run([PREFECT, "worker", "start", "--pool", "local", "--run-once"], env=env, cwd="/",
                            capture_output=True, text=True, timeout=300)
    runs = runs_of(server["url"], "nightly")
    assert [r["state_type"] for r in runs] == ["COMPLETED"], (worker.stdout[-3000:], worker.stderr[-3000:])
    assert (tmp_path / "deployed" / "report" / "report.json").exists()
