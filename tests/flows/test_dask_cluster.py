"""curate on an existing Dask cluster: a real `dask scheduler` and `dask worker` processes on
127.0.0.1, only one worker advertising `GPU`, and CURATE_FAKE_GPU=1 so the CPU-computing GPU
stages are placed as GPU units. Also: the per-unit usage fields of `_stage.json`, and a
LocalCluster run through the CLI that ends without a traceback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import fast_config, load_bench

DASK_BENCH = load_bench("dask_verify")  # stops the scheduler and workers as the benchmark does

DASK = Path(sys.executable).parent / "dask"  # the venv's: its workers import this (editable) curate
DISTILL = {"specs": [{"method": "mtt", "ipc": 1, "iterations": 3, "syn_steps": 2, "expert_epochs": 1,
                      "max_start_epoch": 1, "lr_img": 10.0, "dsa": "flip_crop"},
                     {"method": "dm", "ipc": 1, "iterations": 3, "width": 8, "batch_real": 32, "dsa": "flip_crop"}],
           "experts": {"count": 1, "epochs": 2, "width": 8, "batch_size": 128, "dsa": "flip_crop"}}


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect_home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


class DaskProcesses:
    """A scheduler and workers as real processes, each stopped by its PID."""

    def __init__(self, root: Path):
        self.root, self.procs = root, []
        root.mkdir()
        self.address = f"tcp://127.0.0.1:{DASK_BENCH.free_port()}"
        self._start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", self.address.rsplit(":", 1)[1],
                    "--no-dashboard")

    def _start(self, name: str, *args: str) -> None:
        log = open(self.root / f"{name}.log", "wb")
        self.procs.append(subprocess.Popen([str(DASK), *args], stdout=log, stderr=subprocess.STDOUT,
                                           cwd=self.root, env={**os.environ, "PYTHONUNBUFFERED": "1"}))
        log.close()

    def worker(self, name: str, gpu: bool = False) -> None:
        d = self.root / name
        d.mkdir()
        self._start(name, "worker", self.address, "--host", "127.0.0.1", "--nthreads", "1", "--nworkers", "1",
                    "--name", name, "--local-directory", str(d), "--no-dashboard",
                    *(["--resources", "GPU=1"] if gpu else []))

    def workers(self, n: int) -> dict[str, str]:
        """name -> worker address, once n workers are connected."""
        from distributed import Client

        with Client(self.address, timeout=120) as client:
            client.wait_for_workers(n, timeout=180)
            return {w["name"]: addr for addr, w in client.scheduler_info()["workers"].items()}

    def task_count(self) -> int:
        from distributed import Client

        with Client(self.address, timeout=60) as client:
            return client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))

    def stop(self) -> None:
        DASK_BENCH.stop(self.procs)


@pytest.fixture
def dask_processes(tmp_path):
    made = []

    def start() -> DaskProcesses:
        made.append(DaskProcesses(tmp_path / f"cluster{len(made)}"))
        return made[-1]

    yield start
    for c in made:
        c.stop()


def write_config(path: Path, run_dir: Path, **sections) -> str:
    path.write_text(yaml.safe_dump(fast_config(run_dir, **sections)))
    return str(path)


def records(run_dir: Path, units) -> dict[str, dict]:
    return {u: json.loads((run_dir / u / "_stage.json").read_text()) for u in units}


@pytest.mark.slow
def test_gpu_units_run_on_the_gpu_worker_with_the_local_runners_results(prefect_server, digits_catalog, tmp_path,
                                                                        dask_processes, monkeypatch):
    import torch

    from flows.curate import run_flow
    from pipeline.runner import Runner

    monkeypatch.delenv("CURATE_FAKE_GPU", raising=False)
    local = write_config(tmp_path / "local.yaml", tmp_path / "local", distill=DISTILL)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in Dask's workers (OMP_NUM_THREADS=1): float sums depend on the thread count
    try:
        run_flow(local, [], str(digits_catalog))
    finally:
        torch.set_num_threads(threads)

    cluster = dask_processes()
    cluster.worker("cpu")
    cluster.worker("gpu", gpu=True)
    workers = cluster.workers(2)
    monkeypatch.setenv("CURATE_FAKE_GPU", "1")
    remote = write_config(tmp_path / "remote.yaml", tmp_path / "remote", distill=DISTILL,
                          flow={"task_runner": "dask", "address": cluster.address})
    run_flow(remote, [], str(digits_catalog))

    runner = Runner.from_run_dir(tmp_path / "remote", catalog=str(digits_catalog))
    units = runner.units()
    gpu_units = [u for u in units if runner.resources(u).gpus]
    assert {"embed", "experts", "distill/mtt-ipc1", "distill/dm-ipc1", "verify/full"} <= set(gpu_units), gpu_units
    a, b = records(tmp_path / "local", units), records(tmp_path / "remote", units)
    placed = {u: b[u]["worker"] for u in units}
    assert {placed[u] for u in gpu_units} == {workers["gpu"]}, placed
    assert set(placed.values()) <= {workers["cpu"], workers["gpu"]}, placed  # everything ran on the cluster
    assert {a[u]["worker"] for u in units} == {f"{a['index']['host']}:{os.getpid()}"}  # the local runner: this process
    for u in units:
        assert b[u]["cpu_seconds"] > 0 and b[u]["peak_rss_bytes"] > 0, (u, b[u])
        assert a[u]["fingerprint"] == b[u]["fingerprint"], u  # the fake GPU changes no fingerprint
        assert a[u]["device"] == b[u]["device"] == "cpu", u  # ... and computes on the CPU
    for u in ("index", "embed", "select/random-0.1", "select/stratified-0.2", "materialize/random-0.1",
              "materialize/stratified-0.2", "experts", "distill/mtt-ipc1", "distill/dm-ipc1"):
        assert a[u]["output_hash"] == b[u]["output_hash"], u
    for sel in ("random-0.1", "stratified-0.2"):
        assert (tmp_path / "local" / "select" / sel / "selection.parquet").read_bytes() == \
            (tmp_path / "remote" / "select" / sel / "selection.parquet").read_bytes(), sel
    for u in (u for u in units if u.startswith("verify/")):
        ra = json.loads((tmp_path / "local" / u / "result.json").read_text())
        rb = json.loads((tmp_path / "remote" / u / "result.json").read_text())
        assert ra["row"]["accs"] == rb["row"]["accs"], u
        assert [t["final_loss"] for t in ra["trainings"]] == [t["final_loss"] for t in rb["trainings"]], u


@pytest.mark.slow
def test_without_a_gpu_worker_the_flow_fails_in_one_line(prefect_server, digits_catalog, tmp_path, dask_processes,
                                                        monkeypatch):
    from flows.curate import run_flow
    from pipeline.errors import CurateError

    cluster = dask_processes()
    cluster.worker("cpu")
    workers = cluster.workers(1)
    monkeypatch.setenv("CURATE_FAKE_GPU", "1")
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run",
                       flow={"task_runner": "dask", "address": cluster.address, "placement_timeout": 5})
    with pytest.raises(CurateError) as exc:
        run_flow(cfg, [], str(digits_catalog))
    failed = datetime.now(timezone.utc)
    msg = str(exc.value)
    assert "\n" not in msg
    # embed, verify/full and the random sets all wait for the GPU once index is done
    assert re.fullmatch(rf"(embed|verify/\S+)( \(and \d+ more\))? needs a Dask worker with resource GPU=1, and no "
                        rf"worker at {re.escape(cluster.address)} offers it \(1 connected; waited 5 s, "
                        rf"flow.placement_timeout\)", msg), msg
    # the scheduler held the GPU units back (their restriction reached it): the CPU worker ran index only
    index = json.loads((tmp_path / "run" / "index" / "_stage.json").read_text())
    assert index["worker"] == workers["cpu"]
    # the acceptance bound, from the moment the GPU units could have started: it fails, it does not hang
    waited = (failed - datetime.fromisoformat(index["ended"])).total_seconds()
    assert waited < 30, waited
    assert not (tmp_path / "run" / "embed").exists() and not (tmp_path / "run" / "verify").exists()
    deadline = time.monotonic() + 30
    while cluster.task_count() and time.monotonic() < deadline:  # the cancelled units leave the cluster
        time.sleep(0.5)
    assert cluster.task_count() == 0


def test_address_must_be_a_scheduler_address(tmp_path):
    from pipeline.config import load_config
    from pipeline.errors import CurateError

    ok = load_config(fast_config(tmp_path, flow={"task_runner": "dask", "address": "tcp://10.0.0.5:8786"}))
    assert ok.flow.address == "tcp://10.0.0.5:8786" and ok.flow.placement_timeout == 120
    for flow, why in [({"task_runner": "dask", "address": "10.0.0.5:8786"}, "flow.address: '10.0.0.5:8786' is not"),
                      ({"task_runner": "dask", "address": "tcp://h:70000"}, "flow.address: 'tcp://h:70000' is not"),
                      ({"address": "tcp://h:8786"}, "address needs task_runner: dask"),
                      ({"task_runner": "dask", "placement_timeout": 0}, "flow.placement_timeout")]:
        with pytest.raises(CurateError, match=re.escape(why)) as exc:
            load_config(fast_config(tmp_path, flow=flow))
        assert "\n" not in str(exc.value)


def test_no_scheduler_at_the_address_is_one_line(tmp_path):
    from flows.curate import dask_runner
    from pipeline.config import load_config
    from pipeline.errors import CurateError

    address = f"tcp://127.0.0.1:{DASK_BENCH.free_port()}"  # nothing listens there
    cfg = load_config(fast_config(tmp_path, flow={"task_runner": "dask", "address": address}))
    with pytest.raises(CurateError, match=rf"^flow.address: no Dask scheduler answers at {re.escape(address)} "):
        dask_runner(cfg)


def test_gpu_request_follows_device_and_fake_gpu(make_runner, monkeypatch):
    from flows.curate import gpu_request

    runner = make_runner(embed={"epochs": 1, "device": "cpu"})
    monkeypatch.delenv("CURATE_FAKE_GPU", raising=False)
    assert gpu_request(runner, "verify/full", gpu_present=False) == {}  # auto on a CPU cluster: anywhere
    assert gpu_request(runner, "verify/full", gpu_present=True) == {"GPU": 1}  # auto with a GPU worker: on it
    monkeypatch.setenv("CURATE_FAKE_GPU", "1")
    assert gpu_request(runner, "verify/full", gpu_present=False) == {"GPU": 1}
    assert gpu_request(runner, "embed", gpu_present=True) == {}  # device: cpu never asks for one
    assert gpu_request(runner, "index", gpu_present=True) == {}  # declares no GPU
    assert gpu_request(runner, "select/random-0.1", gpu_present=True) == {}


def test_stage_record_has_worker_cpu_and_peak_memory_of_the_unit(make_runner):
    """worker is host:pid outside Dask; peak_rss_bytes is the unit's peak, not the process's: a
    1.5 GB buffer freed before the unit leaves ru_maxrss high and the unit's figure low."""
    import resource

    runner = make_runner()
    big = np.ones(1500 * 2**20 // 8)  # touched pages: RSS
    del big
    lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    runner.run("index")
    rec = json.loads((runner.run_dir / "index" / "_stage.json").read_text())
    assert rec["worker"] == f"{rec['host']}:{os.getpid()}"
    assert 0 < rec["cpu_seconds"] and 0 < rec["peak_rss_bytes"] < lifetime - 2**30, (rec, lifetime)
    before = json.loads((runner.run_dir / "index" / "_stage.json").read_text())
    runner.run("index", force=True)  # a rerun: new usage figures, same fingerprint and output hash
    after = json.loads((runner.run_dir / "index" / "_stage.json").read_text())
    assert (after["fingerprint"], after["output_hash"]) == (before["fingerprint"], before["output_hash"])


@pytest.mark.slow
def test_local_cluster_run_ends_without_traceback(digits_catalog, tmp_path):
    """`curate run` on the LocalCluster through the CLI, on its own temporary Prefect server: one
    server (the workers report to it), and no traceback or killed worker when the cluster closes."""
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", flow={"task_runner": "dask", "n_workers": 2})
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300")
    res = subprocess.run([str(Path(sys.executable).parent / "curate"), "run", cfg, "--catalog", str(digits_catalog)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "Traceback" not in out and "still alive after" not in out, out[-3000:]
    assert out.count("Starting temporary server") == 1, out[-3000:]
    assert json.loads((tmp_path / "run" / "embed" / "_stage.json").read_text())["worker"].startswith("tcp://127.0.0.1:")
