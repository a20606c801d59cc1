"""The README's reading snippets (`<!-- snippet: NAME -->` before a ```python block) run as written
against a materialized run, each in a fresh interpreter, and read what the manifest says."""

import json
import os
import re
import subprocess
import sys
from collections import Counter

import pyarrow.parquet as pq
import pytest

from tests.helpers import REPO

SNIPPET = re.compile(r"<!-- snippet: ([\w-]+) -->\n```python\n(.*?)```", re.S)
RUN_LINE = 'run = "runs/mine"\n'
# what each snippet leaves behind, printed as JSON by the interpreter that ran it
RESULTS = {
    "webdataset": "{'keys': keys, 'images': list(images.shape[1:]), 'weights': sorted(set(weights))}",
    "hf-datasets": "{'keys': list(subset['__key__']), 'labels': list(subset['cls']),"
                   " 'weights': sorted({j['weight'] for j in subset['json']}), 'size': list(subset[0]['png'].size),"
                   " 'manifest_keys': list(manifest['key']), 'columns': manifest.column_names}",
    "polars": "{'kept': per_class['kept'].to_list(), 'labels': per_class['label'].to_list(),"
              " 'weight': float(per_class['weight'].sum()), 'dropped': dropped['key'].to_list()}",
    "manifest-dataset": "{'len': len(ds), 'x': list(x.shape[1:]), 'draws': sampler.num_samples}",
}


def snippets() -> dict[str, str]:
    found = SNIPPET.findall((REPO / "README.md").read_text())
    return dict(found)


def test_every_marked_snippet_is_checked():
    found = snippets()
    assert sorted(found) == sorted(RESULTS)
    assert all(code.startswith(RUN_LINE) for code in found.values())


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, digits_catalog):
    """runs/mine with stratified-0.3 of digits (431 samples) selected and materialized."""
    from pipeline.catalog import Catalog
    from pipeline.config import load_config
    from pipeline.runner import Runner
    from tests.helpers import fast_config

    run_dir = tmp_path_factory.mktemp("readme") / "runs" / "mine"
    cfg = load_config(fast_config(run_dir, select={"method": "stratified", "budget": 0.3},
                                  materialize={"register_entry": False}))
    r = Runner(cfg, Catalog.load(digits_catalog))
    r.write_run_json()
    for u in ("index", "select/stratified-0.3", "materialize/stratified-0.3"):
        r.run(u)
    return run_dir


def run_snippet(name: str, run_dir, tmp_path) -> dict:
    """Run a snippet, with `run` pointing at run_dir, in a fresh interpreter (its DataLoader workers
    fork from that, not from this test process; Hugging Face datasets reads HF_HOME at import);
    return RESULTS[name] evaluated after it."""
    code = snippets()[name]
    assert code.count(RUN_LINE) == 1
    code = code.replace(RUN_LINE, f"run = {str(run_dir)!r}\n")
    code += f"\nimport json as _json\nprint('RESULT ' + _json.dumps({RESULTS[name]}))\n"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


@pytest.fixture(scope="module")
def manifest(demo_run):
    return pq.read_table(demo_run / "materialize" / "stratified-0.3" / "manifest.parquet")


def test_webdataset_snippet_reads_every_sample_once(demo_run, manifest, tmp_path):
    got = run_snippet("webdataset", demo_run, tmp_path)
    assert Counter(got["keys"]) == Counter(manifest.column("key").to_pylist())
    assert got["images"] == [3, 8, 8] and got["weights"] == [1.0]


def test_hf_datasets_snippet_reads_shards_and_manifest(demo_run, manifest, tmp_path):
    got = run_snippet("hf-datasets", demo_run, tmp_path)
    keys = manifest.column("key").to_pylist()
    assert got["keys"] == keys and got["manifest_keys"] == keys  # shards in order, rows in order
    assert got["labels"] == manifest.column("label").to_pylist()
    assert got["weights"] == [1.0] and got["size"] == [8, 8]
    assert got["columns"] == manifest.column_names


def test_polars_snippet_counts_kept_and_dropped(demo_run, manifest, tmp_path):
    got = run_snippet("polars", demo_run, tmp_path)
    counts = Counter(manifest.column("label").to_pylist())
    assert got["labels"] == list(range(10)) and got["kept"] == [counts[c] for c in range(10)]
    assert sum(got["kept"]) == 431 and got["weight"] == 431.0
    sel = pq.read_table(demo_run / "select" / "stratified-0.3" / "selection.parquet")
    assert len(got["dropped"]) == 1438 - 431
    assert set(got["dropped"]) == set(sel.filter(sel.column("selected").to_numpy() == 0).column("key").to_pylist())


def test_manifest_dataset_snippet(demo_run, tmp_path):
    got = run_snippet("manifest-dataset", demo_run, tmp_path)
    assert got == {"len": 431, "x": [1, 8, 8], "draws": 431}
