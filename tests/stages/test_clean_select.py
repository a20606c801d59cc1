"""score label_issues and select {method: clean} through the real stages, on digits with 10% of
the training labels flipped: the flips are found, and clean drops exactly what was flagged."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.errors import CurateError
from stages.kernels.scores.label_issues import find_label_issues, label_issue_score, stratified_folds
from tests.helpers import fast_config, plant_label_noise

LABEL_ISSUES = {"folds": 5, "epochs": 3, "batch_size": 32}
SELECT = [{"method": "clean", "score": "label_issues"},
          {"method": "clean", "score": "margin", "fraction": 0.1},
          {"method": "stratified", "budget": 0.5, "pool": "clean-label_issues"}]


@pytest.fixture(scope="module")
def noisy(tmp_path_factory, digits_catalog):
    """Digits with 10% of training labels moved to another class (seeded): catalog, flipped keys."""
    return plant_label_noise(digits_catalog, tmp_path_factory.mktemp("noisy-clean") / "cat")


def runner_for(catalog, run_dir, **sections):
    """A runner on the noisy catalog: label_issues and margin scores, the SELECT specs unless given."""
    from pipeline.catalog import Catalog
    from pipeline.config import load_config
    from pipeline.runner import Runner

    sections = {"score": {"methods": ["label_issues", "margin"], "label_issues": LABEL_ISSUES},
                "select": SELECT, **sections}
    return Runner(load_config(fast_config(run_dir, **sections)), Catalog.load(catalog))


@pytest.fixture(scope="module")
def cleaned(noisy, tmp_path_factory, one_torch_thread):
    cat, flipped = noisy
    runner = runner_for(cat, tmp_path_factory.mktemp("run") / "r")
    for unit in ("index", "embed", "score", "select/clean-label_issues", "select/clean-margin-0.1",
                 "select/stratified-0.5"):
        runner.run(unit)
    return runner, flipped


def selection(runner, name):
    return pq.read_table(runner.run_dir / "select" / name / "selection.parquet").to_pydict()


def flags(runner) -> dict:
    return pq.read_table(runner.run_dir / "score" / "label_issues.parquet").to_pydict()


def test_label_issues_finds_the_planted_flips(cleaned):
    runner, flipped = cleaned
    t = pq.read_table(runner.run_dir / "score" / "scores.parquet")
    assert t.column_names == ["row", "uid", "score_label_issues", "score_margin"]
    f = flags(runner)
    assert list(f) == ["row", "uid", "flagged", "likely_label"] and f["uid"] == t.column("uid").to_pylist()
    truth = np.array([u.split("/", 1)[1] in flipped for u in f["uid"]])
    flagged = np.array(f["flagged"])
    precision, recall = truth[flagged].mean(), flagged[truth].mean()
    assert precision >= 0.8 and recall >= 0.6, (precision, recall, int(flagged.sum()), int(truth.sum()))
    from stages.kernels.scores.dynamics import auroc

    assert auroc(np.asarray(t.column("score_label_issues")), truth) > 0.9
    m = runner.record("score")["metrics"]["label_issues"]
    assert m["flagged"] == flagged.sum() and sum(m["flagged_per_class"]) == flagged.sum() and m["epochs"] == 3


def test_flags_and_score_are_confident_learning_on_the_saved_out_of_fold_probabilities(cleaned):
    runner, _ = cleaned
    probs = np.load(runner.run_dir / "score" / "oof_probs.npy")
    labels = np.asarray(pq.read_table(runner.run_dir / "index" / "index.parquet").column("label"))
    assert probs.shape == (len(labels), 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-4)
    score = np.asarray(pq.read_table(runner.run_dir / "score" / "scores.parquet").column("score_label_issues"))
    np.testing.assert_array_equal(score, label_issue_score(probs, labels))
    issue, likely = find_label_issues(probs, labels)
    f = flags(runner)
    np.testing.assert_array_equal(f["flagged"], issue)
    assert f["likely_label"] == [int(v) if v >= 0 else None for v in likely]
    # out of fold: every fold's rows came from a model that did not train on them, so its
    # accuracy on the given (noisy) labels stays well below a model's on its own training rows
    folds = stratified_folds(labels, LABEL_ISSUES["folds"], runner.cfg.seed)
    assert np.bincount(folds).min() >= len(labels) // 5
    assert 0.6 < (probs.argmax(1) == labels).mean() < 0.93


def test_clean_drops_exactly_the_flagged_rows(cleaned):
    runner, _ = cleaned
    labels = np.asarray(pq.read_table(runner.run_dir / "index" / "index.parquet").column("label"))
    flagged = np.array(flags(runner)["flagged"])
    s = selection(runner, "clean-label_issues")
    selected = np.array(s["selected"])
    np.testing.assert_array_equal(~selected, flagged)
    assert s["method"][0] == "clean" and s["budget"][0] == pytest.approx(selected.mean())
    assert s["rank"] == [int(r) if ok else None for r, ok in zip(np.cumsum(selected) - 1, selected)]  # row order
    rec = runner.record("select/clean-label_issues")["metrics"]
    assert rec["removed"] == flagged.sum()
    assert rec["removed_per_class"] == np.bincount(labels[flagged], minlength=10).tolist()


def test_clean_by_fraction_drops_the_worst_share_and_clean_composes(cleaned):
    runner, _ = cleaned
    margin = np.asarray(pq.read_table(runner.run_dir / "score" / "scores.parquet").column("score_margin"))
    s = np.array(selection(runner, "clean-margin-0.1")["selected"])
    n_drop = round(0.1 * len(margin))
    assert (~s).sum() == n_drop
    assert margin[~s].min() >= margin[s].max()  # the highest margins (most confidently wrong) go
    clean = np.array(selection(runner, "clean-label_issues")["selected"])
    after = np.array(selection(runner, "stratified-0.5")["selected"])
    assert after.sum() == round(0.5 * len(clean)) and not (after & ~clean).any()  # only rows clean kept


def test_random_baseline_of_a_clean_selection_is_named_after_it(noisy, tmp_path):
    runner = runner_for(noisy[0], tmp_path / "r")
    assert [s.name for s in runner.cfg.verify_sets()] == [
        "full", "clean-label_issues", "clean-margin-0.1", "stratified-0.5",
        "random-clean-label_issues", "random-clean-margin-0.1", "random-0.5"]


@pytest.mark.parametrize("spec, message", [
    ({"method": "clean", "score": "nope"}, r"^config: select\.0\.score: Input should be 'el2n', .*'label_issues'$"),
    ({"method": "clean", "score": "margin", "fraction": 1.5}, r"^config: select\.0\.fraction: Input should be less than 1$"),
    ({"method": "clean", "score": "margin", "fraction": 0}, r"^config: select\.0\.fraction: Input should be greater than 0$"),
    ({"method": "clean", "score": "margin"}, r"^config: select\.0: clean by score margin needs a fraction to drop"),
    ({"method": "clean", "score": "label_issues", "budget": 0.5}, r"^config: select\.0\.budget: clean takes no budget"),
    ({"method": "clean", "score": "el2n", "fraction": 0.1}, r"^config: select\.0\.score: 'el2n' is not computed"),
])
def test_bad_clean_settings_are_one_line_errors(tmp_path, spec, message):
    from pipeline.config import load_config

    with pytest.raises(CurateError, match=message) as err:
        load_config(fast_config(tmp_path, score={"methods": ["label_issues", "margin"]}, select=[spec]))
    assert "\n" not in str(err.value)


def test_folds_above_a_class_size_are_a_one_line_error(noisy, tmp_path, one_torch_thread):
    runner = runner_for(noisy[0], tmp_path / "r", score={"methods": ["label_issues"],
                                                         "label_issues": {"folds": 500, "epochs": 1}},
                        select=[{"method": "clean", "score": "label_issues"}])
    for unit in ("index", "embed"):
        runner.run(unit)
    with pytest.raises(CurateError, match=r"^score label_issues: class \d has \d+ samples, fewer than "
                                          r"score\.label_issues\.folds \(500\): lower folds$"):
        runner.run("score")
    assert not (runner.run_dir / "score").exists()  # nothing half-written


def test_clean_that_would_drop_more_than_max_removed_stops(cleaned, noisy):
    runner, _ = cleaned
    flagged = runner.record("score")["metrics"]["label_issues"]["flagged_fraction"]
    assert flagged > 0.05
    strict = runner_for(noisy[0], runner.run_dir, select=[{"method": "clean", "score": "label_issues",
                                                            "max_removed": 0.05, "name": "strict"}])
    with pytest.raises(CurateError, match=r"^select strict: clean would remove \d+\.\d% of its pool \(\d+ of 1438\) "
                                          r"as label issues, more than max_removed 0\.05: .*raise max_removed$"):
        strict.run("select/strict")
    assert not (runner.run_dir / "select" / "strict").exists()
    assert strict.state("score") == "done"  # score was not recomputed: the same settings


def test_fold_epochs_default_to_enough_steps_for_a_small_pool():
    from stages.score import LABEL_ISSUES_STEPS, fold_epochs

    assert LABEL_ISSUES_STEPS == 500
    assert fold_epochs(None, 48000, 128) == 2  # 375 steps an epoch: the floor of 2 epochs
    assert fold_epochs(None, 7200, 128) == 9  # 57 steps an epoch
    assert fold_epochs(None, 1150, 32) == 14  # 36 steps an epoch
    assert fold_epochs(3, 1150, 32) == 3  # as configured


@pytest.mark.slow
def test_same_seed_same_bytes(cleaned):
    runner, _ = cleaned
    names = ("scores.parquet", "oof_probs.npy", "label_issues.parquet")
    before = {n: (runner.run_dir / "score" / n).read_bytes() for n in names}
    runner.run("score", force=True)
    assert {n: (runner.run_dir / "score" / n).read_bytes() for n in names} == before
