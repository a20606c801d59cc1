"""Progress lines where the output is not a terminal: silent for short work, then a line every
few seconds or tenth of the work, and one at the end (a fake clock, no sleeping)."""

from __future__ import annotations

import io

from pipeline import progress as progress_mod
from pipeline.progress import ProgressLines, progress


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_short_work_prints_nothing():
    clock, out = Clock(), io.StringIO()
    p = ProgressLines(50, "select", out=out, clock=clock, every_s=10)
    for done in range(1, 51):
        clock.t += 0.1  # 5 s in all
        assert p.update(done) is None
    assert out.getvalue() == ""


def test_lines_every_period_and_tenth_then_the_end():
    clock, out = Clock(), io.StringIO()
    p = ProgressLines(100, "embed: open_clip index.parquet", " img", out=out, clock=clock, every_s=10)
    printed = []
    for done in range(1, 101):
        clock.t += 0.5  # 50 s in all: tenths every 5 s
        line = p.update(done)
        if line:
            printed.append((done, round(clock.t - 100, 1)))
    # silent until 10 s, then every tenth (5 s apart, more than the 1 s floor), and the end
    assert printed == [(20, 10.0), (30, 15.0), (40, 20.0), (50, 25.0), (60, 30.0), (70, 35.0), (80, 40.0),
                       (90, 45.0), (100, 50.0)]
    lines = out.getvalue().splitlines()
    assert lines[0] == "embed: open_clip index.parquet: 20/100 img (20%), 0:10 elapsed, ~0:40 left"
    assert lines[-1] == "embed: open_clip index.parquet: 100/100 img (100%), 0:50 elapsed"
    assert p.update(100) is None  # the end is told once


def test_slow_steps_get_a_line_per_period():
    clock, out = Clock(), io.StringIO()
    p = ProgressLines(1000, "verify full: trainings", out=out, clock=clock, every_s=10)
    times = []
    for done in range(1, 61):  # 3 s per step, 6% of the work per minute: the period decides
        clock.t += 3
        if p.update(done):
            times.append(clock.t - 100)
    assert times == [12, 24, 36, 48, 60, 72, 84, 96, 108, 120, 132, 144, 156, 168, 180]
    assert "6/1000 (1%)" not in out.getvalue() and "4/1000 (0%)" in out.getvalue()


def test_progress_prints_lines_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(progress_mod, "LINE_EVERY_S", 0.0)  # every step is due
    heard = []
    token = progress_mod.LISTENER.set(lambda frac, desc: heard.append(frac))
    try:
        with progress(4, "score: knn_shapley", " rows") as step:
            for _ in range(4):
                step(1)
    finally:
        progress_mod.LISTENER.reset(token)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("score: knn_shapley: 1/4 rows (25%)")
    assert err[-1].startswith("score: knn_shapley: 4/4 rows (100%)")
    assert "\r" not in "".join(err)  # no bar redraws in a log
    assert heard[0] == 0.0 and heard[-1] == 1.0


def test_index_and_materialize_report_progress(make_runner, tmp_path, capsys, monkeypatch):
    """Every unit that reads the dataset tells its progress: index per shard, materialize per sample."""
    monkeypatch.setattr(progress_mod, "LINE_EVERY_S", 0.0)
    r = make_runner(tmp_path / "run", select={"method": "random", "budget": 0.1})
    heard = []
    token = progress_mod.LISTENER.set(lambda frac, desc: heard.append((desc, frac)))
    try:
        for unit in ("index", "select/random-0.1", "materialize/random-0.1"):
            r.run(unit)
    finally:
        progress_mod.LISTENER.reset(token)
    err = capsys.readouterr().err
    assert "index digits: train shards: 3/3 shards (100%)" in err  # the fixture catalog has 3 train shards
    assert "materialize random-0.1: 144/144 samples (100%)" in err
    assert ("index digits: train shards", 1.0) in heard and ("materialize random-0.1", 1.0) in heard
