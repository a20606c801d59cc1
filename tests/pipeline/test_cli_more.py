"""The CLI verbs that explain a run: methods, config show, clean, status's cost columns, and the
one-line error for images of several sizes."""

from __future__ import annotations

import io
import json

import numpy as np
import yaml
from PIL import Image
from pydantic_core import PydanticUndefined

from pipeline.config import (DISTILL_TYPES, ONLINE_METHODS, SELECT_SPECS, EmbedConfig, RunConfig, ScoreConfig,
                             load_config)
from pipeline.methods import SCORES

from tests.helpers import curate, one_line_error, rewrite_shard


def yaml_value(v) -> str:
    """A default as `curate methods` prints it."""
    if v is None:
        return "null"
    return v if isinstance(v, str) else json.dumps(v)


def defaults(model, skip=("method",)) -> dict[str, str]:
    """Field -> default, read from the pydantic model itself (nested sections flattened)."""
    out = {}
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        if isinstance(info.annotation, type) and hasattr(info.annotation, "model_fields"):
            out |= {f"{name}.{k}": v for k, v in defaults(info.annotation, ()).items()}
        elif info.default_factory is not None:
            out[name] = yaml_value(info.default_factory())
        else:
            out[name] = "required" if info.default is PydanticUndefined else yaml_value(info.default)
    return out


def test_methods_lists_every_method_with_its_defaults():
    res = curate("methods", "--json")
    assert res.returncode == 0, res.stderr
    kinds = json.loads(res.stdout)
    assert list(kinds) == ["embed", "score", "select", "online", "distill"]

    def options(kind, method):
        m = next(m for m in kinds[kind]["methods"] if m["name"] == method)
        return {o["name"]: o["default"] for o in kinds[kind]["common"] + m["options"]}, m

    assert [m["name"] for m in kinds["select"]["methods"]] == list(SELECT_SPECS)
    for name, cls in SELECT_SPECS.items():
        opts, m = options("select", name)
        assert opts == defaults(cls), name
        if cls.needs:
            assert f"needs {', '.join(sorted(cls.needs))}" in m["facts"], name
    assert options("select", "dedup")[0]["budget"] == "null" and options("select", "craig")[0]["budget"] == "required"
    assert [m["name"] for m in kinds["score"]["methods"]] == list(SCORES)
    score_opts = {o["name"]: o["default"] for o in kinds["score"]["common"]}
    assert score_opts == defaults(ScoreConfig, ("methods",))
    for name, spec in SCORES.items():
        facts = next(m for m in kinds["score"]["methods"] if m["name"] == name)["facts"]
        assert f"needs {', '.join(sorted(spec.needs))}" in facts and (("value score" in " ".join(facts)) == spec.value)
    assert [m["name"] for m in kinds["online"]["methods"]] == list(ONLINE_METHODS)
    assert options("online", "craig")[0] == {"budget": "required", "name": "null", "kappa": "0.5", "every": "5"}
    embed_names = [m["name"] for m in kinds["embed"]["methods"]]
    assert embed_names == list(EmbedConfig.model_fields["method"].annotation.__args__)
    assert {o["name"]: o["default"] for o in kinds["embed"]["common"]} == defaults(EmbedConfig)
    for cls in DISTILL_TYPES:
        name = cls.model_fields["method"].annotation.__args__[0]
        assert options("distill", name)[0] == defaults(cls)
    text = curate("methods").stdout  # the plain listing names every method too
    for kind in kinds.values():
        assert all(f"\n  {m['name']} " in text or f"\n  {m['name']}\n" in text for m in kind["methods"])
    assert "select methods" in curate("methods", "select").stdout
    assert "no method kind 'nope'" in one_line_error(curate("methods", "nope"))


def test_config_show_prints_the_validated_config_with_defaults(tmp_path, digits_catalog):
    res = curate("config", "show")
    assert res.returncode == 0, res.stderr
    shown = yaml.safe_load(res.stdout)
    demo = load_config(None)
    assert RunConfig.model_validate(shown) == demo
    assert shown["verify"]["momentum"] == 0.9 and shown["verify"]["schedule"] == "step"  # defaults filled in
    assert shown["verify"]["steps"] == demo.verify.steps == 500 and shown["verify"]["epochs"] is None  # the demo's
    assert [s["budget"] for s in shown["select"]] == [0.1, 0.3, None, 0.1, 0.3]  # budget lists expanded
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run: r\ndataset: digits\nselect: [{method: craig, budget: 0.1}]\n")
    res = curate("config", "show", str(cfg), "--set", "select.0.eps=0.02", "--catalog", str(digits_catalog))
    shown = yaml.safe_load(res.stdout)
    assert shown["select"][0]["eps"] == 0.02 and shown["select"][0]["knn"] == 32
    assert shown["run"] == str(tmp_path / "r")  # relative to the config file, as `curate run` reads it
    assert RunConfig.model_validate(shown) == load_config(str(cfg), ["select.0.eps=0.02"])
    assert "select.0.eps: Input should be less than 1" in one_line_error(
        curate("config", "show", str(cfg), "--set", "select.0.eps=3"))
    cfg.write_text("run: r\ndataset: nope\n")
    assert "nope" in one_line_error(curate("config", "show", str(cfg), "--catalog", str(digits_catalog)))
    assert list(tmp_path.iterdir()) == [cfg]  # nothing written


def sizes(d) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def freed_bytes(line: str) -> int:
    """`freed 0.1 MB, 123 bytes in 2 unit(s)` -> 123."""
    return int(line.split(", ")[1].split()[0])


def test_clean_removes_units_the_config_no_longer_has(make_runner, tmp_path):
    r = make_runner(tmp_path / "run")  # selections random-0.1 and stratified-0.2
    for unit in ("index", "select/random-0.1", "select/stratified-0.2", "materialize/random-0.1"):
        r.run(unit)
    run = r.run_dir
    (run / "notes.txt").write_text("mine")
    (run / "select" / "mine").mkdir()
    (run / "select" / "mine" / "a.bin").write_bytes(b"x" * 100)
    fake = run / "select" / "fake"  # a _stage.json that claims another unit: not this directory's
    fake.mkdir()
    (fake / "_stage.json").write_text(json.dumps({"stage": "select", "unit": "select/other", "outputs": {}}))
    user_file = run / "materialize" / "random-0.1" / "extra.txt"
    user_file.write_text("a user's file inside an old unit")

    make_runner(run, select=[{"method": "random", "budget": 0.1}])  # the stratified selection leaves the config
    res = curate("clean", "--run", str(run), "--dry-run")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert [ln.split()[2] for ln in lines[:-1]] == ["select/stratified-0.2"]
    assert freed_bytes(lines[-1]) == sizes(run / "select" / "stratified-0.2")
    assert (run / "select" / "stratified-0.2" / "selection.parquet").exists()  # a dry run removes nothing

    r3 = make_runner(run, select=[{"method": "stratified", "budget": 0.3}])  # random-0.1 leaves too
    removed = ["select/random-0.1", "select/stratified-0.2", "materialize/random-0.1"]
    expected = sum(sizes(run / u) for u in removed) - user_file.stat().st_size
    res = curate("clean", "--run", str(run))
    assert res.returncode == 0, res.stderr
    out = res.stdout.splitlines()
    assert sorted(ln.split()[1] for ln in out[:-1]) == sorted(removed)
    assert "1 other file(s) kept" in next(ln for ln in out if "materialize/random-0.1" in ln)
    assert freed_bytes(out[-1]) == expected and out[-1].endswith("in 3 unit(s)")
    assert not (run / "select" / "random-0.1").exists() and not (run / "select" / "stratified-0.2").exists()
    assert [p.name for p in (run / "materialize" / "random-0.1").iterdir()] == ["extra.txt"]
    assert (run / "notes.txt").read_text() == "mine" and (run / "select" / "mine" / "a.bin").exists()
    assert (fake / "_stage.json").exists()
    assert r3.state("index") == "done"
    assert "nothing to clean" in curate("clean", "--run", str(run)).stdout


def test_status_shows_cpu_memory_and_worker(make_runner, tmp_path):
    r = make_runner(tmp_path / "run")
    r.run("index")
    r.run("select/random-0.1")
    path = r.run_dir / "index" / "_stage.json"
    rec = json.loads(path.read_text())
    rec.update({"cpu_seconds": 12.34, "peak_rss_bytes": 250_000_000, "worker": "gpu-node-1"})
    path.write_text(json.dumps(rec))
    path = r.run_dir / "select" / "random-0.1" / "_stage.json"
    rec = json.loads(path.read_text())
    for k in ("cpu_seconds", "peak_rss_bytes", "worker"):
        rec.pop(k, None)
    path.write_text(json.dumps(rec))
    res = curate("status", "--run", str(r.run_dir))
    assert res.returncode == 0, res.stderr
    lines = {ln.split()[0]: ln for ln in res.stdout.splitlines()}
    assert lines["unit"].split()[:8] == ["unit", "state", "fingerprint", "wall", "cpu", "peak", "worker", "ended"]
    cols = lines["index"].split()
    assert cols[1] == "done" and cols[5:10] == ["12.3", "s", "250.0", "MB", "gpu-node-1"]
    cols = lines["select/random-0.1"].split()
    assert cols[1] == "done" and cols[5:8] == ["-", "-", "-"]
    assert lines["embed"].split()[1:2] == ["missing"]


def test_images_of_several_sizes_name_the_config_keys_and_the_samples(catalog_copy, make_runner, tmp_path):
    shard = sorted((catalog_copy.parent / "shards").glob("train-*.tar"))[1]
    big = {}

    def edit(key, members):
        if len(big) < 2 and "png" in members:  # the first two samples of the second shard: 16 x 16
            img = np.asarray(Image.open(io.BytesIO(members["png"])))
            buf = io.BytesIO()
            Image.fromarray(img.repeat(2, 0).repeat(2, 1)).save(buf, format="png")
            members["png"] = buf.getvalue()
            big[key] = True
        return key, members

    rewrite_shard(shard, edit)
    r = make_runner(tmp_path / "run", catalog=catalog_copy)
    res = curate("stage", "index", "--run", str(r.run_dir), "--catalog", str(catalog_copy))
    assert res.returncode == 0, res.stderr
    err = one_line_error(curate("stage", "embed", "--run", str(r.run_dir), "--catalog", str(catalog_copy)))
    first16 = next(iter(big))
    assert "images have 2 different sizes" in err and "embed.image_size" in err and "verify.image_size" in err
    assert f"16x16 (2, first {first16!r} in {shard.name}, shape (16, 16))" in err
    assert "8x8 (" in err and "first 'train_0000000' in train-000000.tar" in err
    assert "--set embed.image_size=8" in err
    assert not (r.run_dir / "embed").exists()
