"""Scheduling overhead, against a real `prefect server start` on 127.0.0.1 (temporary home).

Prints (1) the demo's wall time as one flow run through the server (`curate run`) against
running every stage with `curate stage` one after another, both on fresh run directories,
and their ratio; (2) the schedule-to-start latency of a served deployment (`curate serve
--interval`): how long after its scheduled time each run started.

    python bench/schedule.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))
from stages.registry import STAGES  # noqa: E402  (the stage names, in pipeline order)


def api(url: str, path: str, body: dict | None = None):
    req = urllib.request.Request(url + path, method="POST" if body is not None else "GET",
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"null")


def start_server(home: Path, log=subprocess.DEVNULL) -> tuple[subprocess.Popen, str, dict]:
    """`prefect server start` on a free loopback port with its own PREFECT_HOME (its own process
    group: stop it with os.killpg); returns (process, API URL, environment for clients)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(120):
        try:
            if api(url, "/health") is True:
                return proc, url, env
        except OSError:
            time.sleep(1)
    os.killpg(proc.pid, signal.SIGTERM)
    raise RuntimeError("the Prefect server did not answer in 120 s")


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - t0


def when(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="served runs to measure the latency over")
    a = p.parse_args()
    curate = str(BIN / "curate")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        proc, url, env = start_server(tmp / "prefect")
        try:
            flow_s = timed([curate, "run", "--set", f"run={tmp / 'flow'}"], env)
            subprocess.run([curate, "run", "--set", f"run={tmp / 'seed'}"], env=env, check=True, capture_output=True,
                           cwd=ROOT)  # writes run.json for the stage-by-stage run below (then removed)
            cfg = json.loads((tmp / "seed" / "run.json").read_text())["config"]
            cfg["run"] = str(tmp / "stages")
            (tmp / "demo.yaml").write_text(json.dumps(cfg))
            stage_s = sum(timed([curate, "stage", s, "--run", str(tmp / "stages"), "--config", str(tmp / "demo.yaml")],
                                env) for s in STAGES)
            print("| demo (digits) | wall s |\n|---|---|")
            print(f"| one flow run through the Prefect server (`curate run`) | {flow_s:.1f} |")
            print(f"| `curate stage` for every stage, one after another | {stage_s:.1f} |")
            print(f"| ratio flow / stages | {flow_s / stage_s:.2f} |\n")

            serve = subprocess.Popen([curate, "serve", str(tmp / "demo.yaml"), "--name", "bench", "--interval", "30",
                                      "--catalog", str(ROOT / "data_catalog.yaml")],
                                     env=env, cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                done: list[dict] = []
                deadline = time.time() + 60 + 45 * a.runs
                while len(done) < a.runs and time.time() < deadline:
                    time.sleep(2)
                    try:
                        dep = api(url, "/deployments/name/curate/bench")
                        runs = api(url, "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [dep["id"]]}}})
                    except OSError:
                        continue
                    done = [r for r in runs if r["start_time"] and r["state_type"] in ("COMPLETED", "RUNNING")]
                lat = sorted(when(r["start_time"]) - when(r["expected_start_time"]) for r in done)
                print(f"served deployment, every 30 s: {len(lat)} run(s) started "
                      + ", ".join(f"{x:.1f}" for x in lat) + " s after their scheduled time; states: "
                      + ", ".join(sorted(r["state_type"] for r in runs if r["state_type"] != "SCHEDULED")))
            finally:
                serve.send_signal(signal.SIGTERM)
                serve.wait(60)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)


if __name__ == "__main__":
    main()
