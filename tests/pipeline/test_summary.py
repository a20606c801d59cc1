"""What `curate run` prints at the end: the table and the one line, computed from the report's rows."""

from pipeline.summary import headline, random_twin, terminal_table


def row(name, kind, samples, acc, loss=0.1):
    return {"name": name, "kind": kind, "method": name.split("-")[0], "samples": samples, "fraction": samples / 1000,
            "acc_mean": acc, "acc_std": 0.01, "train_loss": loss}


def report(*rows):
    return {"dataset": "d", "recipe": "small_cnn", "training_protocol": "steps", "steps": 500, "seeds": 2,
            "test_samples": 300, "rows": list(rows)}


FULL = row("full", "full", 1000, 0.90)


def test_headline_names_the_best_the_smallest_at_full_level_and_the_losers_to_random():
    r = report(FULL, row("craig-0.1", "selection", 100, 0.50), row("clean", "selection", 900, 0.97),
               row("clean-craig-0.1", "selection", 100, 0.92), row("random-n100", "random", 100, 0.80),
               row("random-n900", "random", 900, 0.91))
    assert headline(r) == (
        "In short: best: clean at 97.00% with 90% of the samples, +7.00 points against full data's 90.00% "
        "(a random set of its size: 91.00%); clean-craig-0.1 matches full data with 10% of it (100 samples, "
        "92.00%); below a random set of their size: craig-0.1 (50.00% vs 80.00%).")


def test_without_a_subset_at_full_level_it_names_the_closest():
    r = report(FULL, row("craig-0.1", "selection", 100, 0.85), row("craig-0.3", "selection", 300, 0.88),
               row("random-n100", "random", 100, 0.80))
    line = headline(r)
    assert "no subset reaches full data; the closest is craig-0.3, 2.00 points below" in line
    assert line.endswith("every subset beats a random set of its size.")


def test_table_compares_with_full_and_the_random_set_of_the_same_size():
    r = report(FULL, row("craig-0.1", "selection", 100, 0.85), row("random-n100", "random", 100, 0.80))
    lines = terminal_table(r).splitlines()
    assert lines[0] == ("d: small_cnn recipe, every set trained for the same 500 optimiser steps, mean ± std "
                        "over 2 seed(s), tested on 300 held-out samples")
    assert lines[2].split("  ")[0] == "training set"
    craig = lines[5].split()
    assert craig == ["craig-0.1", "100", "10%", "85.00", "±", "1.00", "-5.00", "+5.00", "0.100"]
    assert lines[6].split()[-2:] == ["-10.00", "0.100"]  # a random row: no comparison with itself
    assert random_twin(r["rows"][1], r["rows"])["name"] == "random-n100"


def test_no_full_row_says_so():
    assert headline(report(row("craig-0.1", "selection", 100, 0.85))).startswith("No full-data row")
