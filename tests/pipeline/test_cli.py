"""The CLI: exit codes and one-line errors."""


import pytest

from tests.helpers import curate, one_line_error


def test_stage_status_and_bad_budget(make_runner, digits_catalog, tmp_path):
    r = make_runner(tmp_path / "run")
    run = str(r.run_dir)
    res = curate("stage", "index", "--run", run, "--catalog", str(digits_catalog))
    assert res.returncode == 0 and "index: computed" in res.stdout
    res = curate("stage", "index", "--run", run, "--catalog", str(digits_catalog))
    assert "index: cached" in res.stdout
    err = one_line_error(curate("stage", "select", "--run", run, "--set", "select.0.budget=0"))
    assert "select.0.budget: budget 0 selects nothing" in err
    err = one_line_error(curate("stage", "select", "--run", run, "--set", "select.0.budget=1.2"))
    assert "out of range" in err
    err = one_line_error(curate("stage", "select", "--run", run, "--set", "select.0.budget=100000"))
    assert "larger than the dataset (1438 samples)" in err
    res = curate("status", "--run", run)
    lines = {line.split()[0]: line.split()[1] for line in res.stdout.strip().splitlines()}
    assert lines["index"] == "done" and lines["embed"] == "missing" and lines["verify/full"] == "missing"
    assert lines["report"] == "missing"


@pytest.mark.parametrize("args,needle", [
    (["stage", "index", "--run", "nowhere"], "no run.json here"),
    (["stage", "bogus", "--run", "."], None),
    (["ingest", "mnist", "--out", "x", "--name", "y"], "unknown source 'mnist'"),
    (["ingest", "idx", "--out", "x", "--name", "y", "--src", "missing-dir"], "--src missing-dir does not exist"),
    (["report", "--run", "nowhere"], "no report/report.json"),
    (["run", "no-such.yaml"], "config no-such.yaml: no such file"),
])
def test_errors_are_one_line(args, needle, tmp_path, digits_catalog):
    if args[1] == "bogus":
        (tmp_path / "c.yaml").write_text(f"run: {tmp_path}/r\ndataset: digits\n")
        args = ["stage", "bogus", "--run", str(tmp_path / "r"), "--config", str(tmp_path / "c.yaml"),
                "--catalog", str(digits_catalog)]
        needle = "no stage named 'bogus'"
    assert needle in one_line_error(curate(*args, cwd=tmp_path))


def test_ingest_digits_cli(tmp_path):
    res = curate("ingest", "digits", "--out", "d", "--name", "digits", "--catalog", "cat.yaml", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert '"train": "d/train-000000.tar"' in res.stdout
    assert (tmp_path / "d" / "sizes.json").read_text().count("000000") == 2


def test_a_run_from_before_per_set_verify_units(make_runner, digits_catalog, tmp_path):
    """A run directory whose verify is the one unit of old (verify/_stage.json, verify/report.json)
    shows the per-set units and the report as missing; they are computed beside the old files."""
    import json

    r = make_runner(tmp_path / "run")
    run = str(r.run_dir)
    old = r.run_dir / "verify"
    old.mkdir()
    (old / "_stage.json").write_text(json.dumps({"stage": "verify", "unit": "verify", "stage_version": 2,
                                                 "fingerprint": "0" * 64, "outputs": {}, "metrics": {}}))
    (old / "report.json").write_text('{"rows": []}')
    res = curate("status", "--run", run, "--catalog", str(digits_catalog))
    assert res.returncode == 0, res.stderr
    lines = {line.split()[0]: line.split()[1] for line in res.stdout.strip().splitlines()}
    assert "verify" not in lines and lines["verify/full"] == lines["verify/random-0.2"] == lines["report"] == "missing"
    assert "no report/report.json" in one_line_error(curate("report", "--run", run))
    assert "report needs verify/full, which is missing" in one_line_error(
        curate("stage", "report", "--run", run, "--catalog", str(digits_catalog)))
    r.run("index")
    assert r.run("verify/full")["status"] == "computed"
    assert (old / "full" / "result.json").exists() and (old / "report.json").read_text() == '{"rows": []}'
