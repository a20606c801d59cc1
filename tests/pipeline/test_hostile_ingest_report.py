"""Hostile input to `curate ingest --out` and `curate report`: one `error:` line, never a traceback,
and nothing curate did not write is deleted or overwritten."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import pipeline.ingest
from pipeline.catalog import Catalog
from pipeline.cli import app
from pipeline.ingest import ingest
from pipeline.report import render_markdown
from stages.report import compare_with_full


def curate(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result) -> str:
    """The CLI failed with exit 1 and exactly one `error: ...` line (no traceback)."""
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def snapshot(root: Path) -> dict:
    """Every path under root -> its bytes (None for a folder)."""
    return {p.relative_to(root).as_posix(): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


# ---------------------------------------------------------------- ingest --out
@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory) -> Path:
    """digits ingested once (3 train shards of <= 500, 1 test shard) into data/x beside cat.yaml."""
    root = tmp_path_factory.mktemp("ingested")
    ingest("digits", root / "data" / "x", "digits", catalog=str(root / "cat.yaml"), shard_size=500)
    return root


@pytest.fixture
def earlier(digits_shards, tmp_path, monkeypatch) -> Path:
    """A private copy of `digits_shards` as the working directory."""
    shutil.copytree(digits_shards, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


SHARD = b"curate wrote this shard"
FOREIGN = {  # layout of data/x -> the entry the refusal names first (sorted)
    "user shards": ({"train-originals.tar": b"my originals", "test-final.tar": b"my test"}, "test-final.tar"),
    "a sub-folder": ({"notes/todo.txt": b"mine"}, "notes"),
    "earlier ingest + a user file": ({"sizes.json": b'{"train-000000.tar": 1}', "train-000000.tar": SHARD,
                                      "train-originals.tar": b"mine"}, "train-originals.tar"),
    "no sizes.json": ({"train-000000.tar": b"mine"}, "train-000000.tar"),
    "sizes.json not JSON": ({"sizes.json": b"{oops", "train-000000.tar": SHARD}, "sizes.json"),
    "sizes.json a list": ({"sizes.json": b'["train-000000.tar"]', "train-000000.tar": SHARD}, "sizes.json"),
    "negative count": ({"sizes.json": b'{"train-000000.tar": -1}', "train-000000.tar": SHARD}, "sizes.json"),
    "count not an int": ({"sizes.json": b'{"train-000000.tar": true}', "train-000000.tar": SHARD}, "sizes.json"),
    "lists a user file": ({"sizes.json": b'{"notes.txt": 3}', "notes.txt": b"mine"}, "notes.txt"),
    "lists a path outside": ({"sizes.json": b'{"../victim.tar": 1}'}, "sizes.json"),
    "listed shard is a folder": ({"sizes.json": b'{"train-000000.tar": 1}', "train-000000.tar/a": b"mine"},
                                 "train-000000.tar"),
}


@pytest.mark.parametrize("layout, first", FOREIGN.values(), ids=list(FOREIGN))
def test_ingest_refuses_a_folder_it_did_not_write(layout, first, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, data in layout.items():
        (tmp_path / "data" / "x" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "x" / name).write_bytes(data)
    (tmp_path / "data" / "victim.tar").write_bytes(b"outside")
    (tmp_path / "cat.yaml").write_text("datasets: {}\n")
    before = snapshot(tmp_path)
    err = one_line_error(curate("ingest", "digits", "--out", "data/x", "--name", "d", "--catalog", "cat.yaml"))
    assert err == (f"error: ingest: --out data/x holds {first}, which curate ingest did not write; "
                   "choose an empty or new folder")
    assert snapshot(tmp_path) == before  # byte-identical, catalog untouched, no temporary folder left


def test_ingest_out_is_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x").write_bytes(b"my file")
    err = one_line_error(curate("ingest", "digits", "--out", "x", "--name", "d", "--catalog", "cat.yaml"))
    assert err == "error: ingest: --out x exists and is not a folder; choose an empty or new folder"
    assert snapshot(tmp_path) == {"x": b"my file"}


def test_reingest_replaces_exactly_the_earlier_shards(earlier):
    assert sorted(os.listdir("data/x")) == ["sizes.json", "test-000000.tar", "train-000000.tar",
                                            "train-000001.tar", "train-000002.tar"]
    ingest("digits", "data/x", "digits", catalog="cat.yaml", shard_size=1000)
    assert sorted(os.listdir("data/x")) == ["sizes.json", "test-000000.tar", "train-000000.tar", "train-000001.tar"]
    assert json.loads(Path("data/x/sizes.json").read_text()) == {
        "test-000000.tar": 359, "train-000000.tar": 1000, "train-000001.tar": 438}
    assert Catalog.load("cat.yaml").entry("digits").splits == {"train": "data/x/train-{000000..000001}.tar",
                                                               "test": "data/x/test-000000.tar"}
    assert not list(earlier.glob("data/.tmp-ingest-*"))


def test_killed_ingest_leaves_the_old_shards(earlier, monkeypatch):
    before = snapshot(earlier)
    real = pipeline.ingest.write_split

    def killed_in_test(samples, out, split, *args):
        if split == "test":
            raise KeyboardInterrupt
        return real(samples, out, split, *args)

    monkeypatch.setattr(pipeline.ingest, "write_split", killed_in_test)
    with pytest.raises(KeyboardInterrupt):
        ingest("digits", "data/x", "digits", catalog="cat.yaml", shard_size=1000)
    assert snapshot(earlier) == before


def test_file_dropped_into_out_during_ingest_is_kept(earlier, monkeypatch):
    before = snapshot(earlier)
    real = pipeline.ingest.write_split

    def user_writes_meanwhile(samples, out, split, *args):
        Path("data/x/mine.txt").write_text("mine")
        return real(samples, out, split, *args)

    monkeypatch.setattr(pipeline.ingest, "write_split", user_writes_meanwhile)
    err = one_line_error(curate("ingest", "digits", "--out", "data/x", "--name", "digits", "--catalog", "cat.yaml",
                                "--shard-size", "1000"))
    assert "--out data/x holds mine.txt, which curate ingest did not write" in err
    assert snapshot(earlier) == {**before, "data/x/mine.txt": b"mine"}


# ---------------------------------------------------------------- report
def row(name, kind, method, budget, samples, acc, std, secs, cur=0.0):
    """One row as stages.verify.summarise writes it (digits: 1438 training samples)."""
    return {"name": name, "kind": kind, "method": method, "budget": budget, "samples": samples,
            "fraction": samples / 1438, "weighted": False, "accs": [acc - std, acc + std], "acc_mean": acc,
            "acc_std": std, "train_seconds": secs, "epochs": 4, "backprop_samples": 4 * samples,
            "probe_samples": 4 * samples, "backprop_share": samples / 1438, "curation": {},
            "curation_seconds": cur, "energy_j": None}


def honest_report(method="craig") -> dict:
    rows = [row("full", "full", "full", 1.0, 1438, 0.95, 0.01, 8.0),
            row(f"{method}-0.3", "selection", method, 0.3, 431, 0.9, 0.02, 2.5, cur=1.25),
            row("uniform-0.3", "online", "uniform", 0.3, 431, 0.88, 0.015, 3.0),
            row("random-n431", "random", "random", 431, 431, 0.86, 0.03, 2.4)]
    compare_with_full(rows)
    return {"metric": "test accuracy", "dataset": "digits", "recipe": "convnet3", "epochs": 4, "seeds": 2,
            "device": "cpu", "train_samples": 1438, "test_samples": 359, "protocol": {}, "rows": rows}


GOLDEN = """\
# curate verification: digits

Recipe `convnet3`, 4 epochs, 2 seed(s), 1438 training / 359 test samples, device cpu.

| training set | method | budget | samples | backprop share | test acc (%) | rel. error (pp) | train (s) | train speed-up | curation (s) | end-to-end speed-up | energy ratio |
|---|---|---|---|---|---|---|---|---|---|---|---|
| full | full | 1.0 | 1438 | 1.000 | 95.00 ± 1.00 | +0.00 | 8.00 | 1.00x | 0.00 | 1.00x | n/a |
| craig-0.3 | craig | 0.3 | 431 | 0.300 | 90.00 ± 2.00 | +5.00 | 2.50 | 3.20x | 1.25 | 2.13x | n/a |
| uniform-0.3 | uniform | 0.3 | 431 | 0.300 | 88.00 ± 1.50 | +7.00 | 3.00 | 2.67x | 0.00 | 2.67x | n/a |
| random-n431 | random | 431 | 431 | 0.300 | 86.00 ± 3.00 | +9.00 | 2.40 | 3.33x | 0.00 | 3.33x | n/a |

- rel. error: subset test error - full-data test error, in percentage points.
- train speed-up: full-data training time / this set's training time (online methods: their selection work inside training included).
- curation: embedding + scoring + selection seconds this set needed (from each stage's `_stage.json`); end-to-end speed-up: full-data training time / (curation + training time).
- energy ratio: this set's training energy / full-data training energy (NVML counter, GPU only).
- samples: training-set size; for online methods, the budget's samples per epoch. backprop share: samples backpropagated per epoch / training-set size, as measured (adaptive methods' full-data warm start raises it above the budget).
"""


def test_honest_report_renders_as_before():
    md = render_markdown(honest_report())
    assert md == GOLDEN
    # the only change for an honest report: markup characters are escaped
    assert render_markdown(honest_report("big_loss")) == md.replace("craig", r"big\_loss")


def cells(line: str) -> list[str]:
    """A table row's cells, split at unescaped pipes."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]


def unescape(cell: str) -> str:
    return re.sub(r"\\(.)", r"\1", cell)


@pytest.fixture
def run_dir(tmp_path):
    (tmp_path / "run" / "report").mkdir(parents=True)
    return tmp_path / "run"


def write_report(run_dir: Path, report) -> Path:
    path = run_dir / "report" / "report.json"
    path.write_text(json.dumps(report))
    return path


def test_report_without_full_row_shows_na(run_dir):
    report = honest_report()
    report["rows"] = report["rows"][1:]  # rel_error etc. still there, but nothing to compare with
    write_report(run_dir, report)
    res = curate("report", "--run", run_dir)
    assert res.exit_code == 0, res.output
    md = (run_dir / "report" / "report.md").read_text()
    table = [cells(line) for line in md.splitlines() if line.startswith("| ") and "training set" not in line]
    assert [t[0] for t in table] == ["craig-0.3", "uniform-0.3", "random-n431"]
    for t in table:
        assert t[5] != "n/a" and t[7] != "n/a"  # accuracy and training time are still there
        assert [t[6], t[8], t[10], t[11]] == ["n/a"] * 4  # rel. error, speed-ups, energy ratio
    assert "No full-data row" in md
    assert {"accuracy_vs_budget.png", "accuracy_vs_time.png"} <= set(os.listdir(run_dir / "report"))


@pytest.mark.parametrize("rows, needle", [([], "holds no training-set rows"),
                                          (None, "'rows' must be a list of objects"),
                                          ([1, 2], "'rows' must be a list of objects")])
def test_report_without_rows_is_one_line(run_dir, rows, needle):
    report = honest_report()
    if rows is None:
        del report["rows"]
    else:
        report["rows"] = rows
    path = write_report(run_dir, report)
    before = snapshot(run_dir)
    err = one_line_error(curate("report", "--run", run_dir))
    assert err.startswith(f"error: {path}: ") and needle in err
    assert snapshot(run_dir) == before


ODD = ["a|b", "**bold**", "_x_", "<script>alert(1)</script>", "`code`", "two\nlines", "[link](http://x)",
       "back\\slash|", "$\\frac$", "_hidden"]


def test_report_escapes_markup_in_names(run_dir):
    report = honest_report()
    report["dataset"] = "<b>ds|x</b>"
    for r, odd in zip(report["rows"][1:], ODD):
        r["name"] = r["method"] = odd
    extra = [dict(report["rows"][1], name=odd, method=odd) for odd in ODD[3:]]
    report["rows"] += extra
    write_report(run_dir, report)
    res = curate("report", "--run", run_dir)
    assert res.exit_code == 0, res.output
    md = (run_dir / "report" / "report.md").read_text()
    assert md.startswith(r"# curate verification: \<b\>ds\|x\</b\>" + "\n")
    lines = [line for line in md.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + len(report["rows"])  # no name broke a row in two
    table = [cells(line) for line in lines[2:]]
    assert all(len(t) == 12 for t in table)
    want = ["full"] + ODD[:3] + ODD[3:]
    assert [unescape(t[0]) for t in table] == [w.replace("\n", " ") for w in want]
    assert [unescape(t[1]) for t in table] == [w.replace("\n", " ") for w in want]
    assert "<script>" not in md and "**bold**" not in md and "`code`" not in md
    for name in ("accuracy_vs_budget.png", "accuracy_vs_time.png"):
        assert (run_dir / "report" / name).stat().st_size > 0


@pytest.mark.parametrize("content, needle", [
    (b"{not json", "not JSON"), (b"\xff\xfe\x00", "not JSON"), (b"[1, 2]", "a JSON object is expected"),
    (b"null", "a JSON object is expected"), (b'"text"', "a JSON object is expected"),
    (None, "cannot read"),  # report.json is a folder
])
def test_report_json_not_an_object(run_dir, content, needle):
    path = run_dir / "report" / "report.json"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    err = one_line_error(curate("report", "--run", run_dir))
    assert err.startswith(f"error: {path}: ") and needle in err


def test_report_with_a_folder_in_the_way(run_dir):
    write_report(run_dir, honest_report())
    (run_dir / "report" / "report.md").mkdir()
    (run_dir / "report" / "report.md" / "mine.txt").write_text("mine")
    before = snapshot(run_dir)
    err = one_line_error(curate("report", "--run", run_dir))
    assert err.startswith(f"error: {run_dir / 'report'}: cannot write the report")
    assert snapshot(run_dir) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_report_in_a_read_only_report_folder(run_dir):
    write_report(run_dir, honest_report())
    before = snapshot(run_dir)
    (run_dir / "report").chmod(0o555)
    try:
        err = one_line_error(curate("report", "--run", run_dir))
    finally:
        (run_dir / "report").chmod(0o755)
    assert err.startswith(f"error: {run_dir / 'report'}: cannot write the report (Permission denied")
    assert snapshot(run_dir) == before
