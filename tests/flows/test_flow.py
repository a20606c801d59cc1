"""The Prefect flow, on a real (temporary) Prefect server: default and Dask task runners."""

import json

import pytest
import yaml

from tests.helpers import fast_config


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    import os

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect_home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def task_states(flow_run_id):
    """The unit tasks of a curate flow run: they run in its `curate-units` subflow."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[c.id for c in children])))
    return {r.name: r.state.name for r in runs}


def write_config(path, run_dir, **sections):
    path.write_text(yaml.safe_dump(fast_config(run_dir, **sections)))
    return path


def test_flow_runs_then_is_fully_cached_with_report_artifact(prefect_server, digits_catalog, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, ArtifactFilterType

    from flows.curate import curate_flow, run_flow

    distill = {"specs": [{"method": "mtt", "ipc": 1, "iterations": 3, "syn_steps": 2, "expert_epochs": 1,
                          "max_start_epoch": 1, "lr_img": 10.0, "dsa": "flip_crop"},
                         {"method": "dm", "ipc": 1, "iterations": 3, "width": 8, "batch_real": 32, "dsa": "flip_crop"}],
               "experts": {"count": 1, "epochs": 2, "width": 8, "batch_size": 128, "dsa": "flip_crop"}}
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", distill=distill)
    report = run_flow(str(cfg), [], str(digits_catalog))
    assert report.endswith("report/report.md")
    rows = json.loads((tmp_path / "run" / "report" / "report.json").read_text())["rows"]
    names = ["full", "random-0.1", "stratified-0.2", "mtt-ipc1", "dm-ipc1", "random-ipc1", "random-n288"]
    assert [r["name"] for r in rows] == names
    assert rows[0]["acc_mean"] > 0.25  # one epoch on full digits: well above chance (0.1)

    state = curate_flow(run_dir=str(tmp_path / "run"), catalog=str(digits_catalog), return_state=True)
    assert state.is_completed()
    states = task_states(state.state_details.flow_run_id)
    # 6 + experts + 2 distill units + one verify unit per row + report
    assert len(states) == 17 and set(states.values()) == {"Cached"}, states

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["curate-report"])))
    table = json.loads(arts[0].data) if isinstance(arts[0].data, str) else arts[0].data
    assert [r["name"] for r in table] == names
    # long units report their progress as Prefect progress artifacts, each run to 100%
    with get_client(sync_client=True) as client:
        progress = client.read_artifacts(artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])))
    finished = {a.description.split(":")[0]: float(a.data) for a in progress}
    assert {"embed", "experts", "distill/mtt-ipc1", "distill/dm-ipc1", "verify/full"} <= set(finished), finished
    assert set(finished.values()) == {100.0}, finished


def test_dask_local_cluster_gives_same_selection(prefect_server, digits_catalog, tmp_path):
    from flows.curate import run_flow

    # craig chooses from what dedup kept: on Dask too it must wait for that selection
    select = [{"method": "random", "budget": 0.1}, {"method": "dedup", "eps": 0.001},
              {"method": "craig", "budget": 0.1, "pool": "dedup-eps0.001"}]
    base = write_config(tmp_path / "a.yaml", tmp_path / "a", select=select)
    dask = write_config(tmp_path / "b.yaml", tmp_path / "b", select=select, flow={"task_runner": "dask", "n_workers": 2})
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in Dask's workers (OMP_NUM_THREADS=1): float sums depend on the thread count
    try:
        run_flow(str(base), [], str(digits_catalog))
    finally:
        torch.set_num_threads(threads)
    run_flow(str(dask), [], str(digits_catalog))
    for sel in ("random-0.1", "dedup-eps0.001", "craig-0.1"):
        a = (tmp_path / "a" / "select" / sel / "selection.parquet").read_bytes()
        b = (tmp_path / "b" / "select" / sel / "selection.parquet").read_bytes()
        assert a == b, sel
    # the dask tasks ran in worker processes, not in this one
    import os

    rec = json.loads((tmp_path / "b" / "embed" / "_stage.json").read_text())
    assert rec["metrics"]["train_accuracy"] > 0.25
    assert rec["pid"] != os.getpid()
    assert json.loads((tmp_path / "a" / "embed" / "_stage.json").read_text())["pid"] == os.getpid()
