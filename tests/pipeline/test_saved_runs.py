"""Runs you can return to: a failed --set changes no saved config, replacing a different
saved config is announced, a config's relative paths are its folder's."""

import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import fast_config

CURATE = [sys.executable, "-m", "pipeline.cli"]


def test_a_failed_set_leaves_the_saved_config(make_runner, digits_catalog, tmp_path):
    r = make_runner(tmp_path / "run")
    r.run("index")
    before = (r.run_dir / "run.json").read_bytes()
    for bad in ("select.0.budget=100000", "select.0.budget=0", "embed.epochs=-1"):
        res = subprocess.run([*CURATE, "stage", "select", "--run", str(r.run_dir), "--catalog", str(digits_catalog),
                              "--set", bad], capture_output=True, text=True, timeout=300)
        assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert (r.run_dir / "run.json").read_bytes() == before, bad


def test_replacing_a_different_saved_config_is_announced(make_runner, digits_catalog, tmp_path):
    from pipeline.runner import open_run

    r = make_runner(tmp_path / "run")
    said = []
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(fast_config(Path("run"), select=[{"method": "random", "budget": 0.3}])))
    runner = open_run(str(cfg), [], str(digits_catalog), announce=said.append)
    assert runner.run_dir == r.run_dir  # `run: run` is relative to the config file's folder
    assert len(said) == 1 and "the saved config differs in select" in said[0] and "curate run --run" in said[0]
    assert runner.cfg.select[0].budget == 0.3
    open_run(str(cfg), [], str(digits_catalog), announce=said.append)  # the same config again: nothing to say
    assert len(said) == 1


def test_a_saved_run_is_reopened_with_its_own_config(make_runner, digits_catalog, tmp_path):
    from pipeline.runner import open_run

    r = make_runner(tmp_path / "run", overrides=["select.1.budget=0.25"])
    said = []
    again = open_run(None, [], str(digits_catalog), str(r.run_dir), announce=said.append)
    assert said == [] and [s.sel_name for s in again.cfg.select] == ["random-0.1", "stratified-0.25"]
