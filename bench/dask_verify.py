"""The verify units of a run spread over a Dask cluster's GPU workers, against one after another.

Starts a real `dask scheduler` and `--workers K` `dask worker` processes on 127.0.0.1, each
advertising `--resources GPU=1` (pinned to GPU i mod the GPUs present with CUDA_VISIBLE_DEVICES;
on a machine with one GPU the K workers share it), and runs the flow on it (`flow.address`). The
same config then runs again in a fresh run directory with every unit in this process one after
another (`Runner.run`). Prints, for the verify units only: the sum of their wall seconds run one
after another, the wall span of the same units on the cluster (first start to last end), the
ratio, and which worker ran each unit.

    python bench/dask_verify.py [--config configs/fmnist-verify.yaml] [--workers 2] [--set k=v ...]
    # on a CPU machine, to try it: CURATE_FAKE_GPU=1 python bench/dask_verify.py \\
    #     --config <a small config> --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DASK = Path(sys.executable).with_name("dask")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def start_cluster(root: Path, workers: int) -> tuple[str, list[subprocess.Popen]]:
    """A scheduler and `workers` GPU workers as processes (logs under `root`)."""
    address = f"tcp://127.0.0.1:{free_port()}"
    procs = []

    def start(name: str, args: list[str], env: dict) -> None:
        with open(root / f"{name}.log", "wb") as log:
            procs.append(subprocess.Popen([str(DASK), *args], stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env))

    start("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--no-dashboard"],
          dict(os.environ))
    gpus = gpu_count()
    for i in range(workers):
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        (root / f"w{i}").mkdir()
        start(f"w{i}", ["worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--nworkers", "1",
                        "--name", f"gpu{i}", "--local-directory", str(root / f"w{i}"), "--no-dashboard",
                        "--resources", "GPU=1"], env)
    from distributed import Client

    with Client(address, timeout=120) as client:
        client.wait_for_workers(workers, timeout=300)
    return address, procs


def stop(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):
        if p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()


def verify_records(run_dir: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(run_dir)): json.loads(p.read_text())
            for p in sorted((run_dir / "verify").glob("*/_stage.json"))}


def span(records: dict[str, dict]) -> float:
    """First start to last end, in seconds."""
    starts = [datetime.fromisoformat(r["started"]) for r in records.values()]
    ends = [datetime.fromisoformat(r["ended"]) for r in records.values()]
    return (max(ends) - min(starts)).total_seconds()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "fmnist-verify.yaml"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--catalog", default=None)
    args = ap.parse_args()

    from flows.curate import run_flow
    from pipeline.catalog import Catalog
    from pipeline.config import load_config
    from pipeline.runner import Runner

    work = Path(tempfile.mkdtemp(prefix="curate-dask-verify-"))
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
    try:
        address, procs = start_cluster(work, args.workers)
        try:
            t0 = time.perf_counter()
            run_flow(args.config, [*args.overrides, f"run={work / 'cluster'}", "flow.task_runner=dask",
                                   f"flow.address={address}"], args.catalog)
            flow_seconds = time.perf_counter() - t0
        finally:
            stop(procs)
        cfg = load_config(args.config, [*args.overrides, f"run={work / 'serial'}"])
        runner = Runner(cfg, Catalog.load(args.catalog))
        runner.write_run_json()
        import torch

        torch.set_num_threads(1)  # as a Dask worker's (OMP_NUM_THREADS=1): CPU float sums depend on the count
        t0 = time.perf_counter()
        for unit in runner.units():  # in the flow's order: upstream units first
            runner.run(unit)
        serial_seconds = time.perf_counter() - t0
        on_cluster, serial = verify_records(work / "cluster"), verify_records(work / "serial")
        one_by_one = sum(r["wall_seconds"] for r in serial.values())
        spread = span(on_cluster)
        print(f"verify units: {len(serial)}; GPU workers: {args.workers} on {gpu_count() or 'no'} GPU(s)")
        print(f"one after another: {one_by_one:.1f} s (whole run {serial_seconds:.1f} s)")
        print(f"on the cluster:    {spread:.1f} s from the first verify start to the last end "
              f"(whole flow {flow_seconds:.1f} s)")
        print(f"speed-up of the verify phase: {one_by_one / spread:.2f}x")
        for unit, r in on_cluster.items():
            print(f"  {unit:32s} {r['wall_seconds']:8.1f} s  {r['device']:8s} {r['worker']}")
        accs = lambda run, u: json.loads((work / run / u / "result.json").read_text())["row"]["accs"]  # noqa: E731
        same = all(accs("cluster", u) == accs("serial", u) for u in serial)
        print(f"every verify unit's accuracies equal the serial run's: {same}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
