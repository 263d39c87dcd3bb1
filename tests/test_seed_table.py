"""benchmarks/seed_table.py: mean ± std over seeds from finished runs' result files."""

import json

import pytest

from benchmarks.seed_table import comparison_table, domain_table


def _run(tmp_path, seed, accuracy, domains):
    run = tmp_path / f"s{seed}"
    run.mkdir()
    (run / "config.yaml").write_text(f"seed: {seed}\n")
    rows = [{"model": "teacher", "role": "teacher", "eval_accuracy": accuracy + 0.1, "train_time_s": 10.0 * seed},
            {"model": "student", "role": "student", "eval_accuracy": accuracy, "train_time_s": None}]
    (run / "comparison.json").write_text(json.dumps({"metric": "eval_accuracy", "rows": rows}))
    (run / "domain_results.json").write_text(json.dumps({"rows": {"student": {
        "eval_accuracy": accuracy, "eval_books_accuracy": domains[0], "eval_dvd_accuracy": domains[1]}}}))
    return str(run)


def test_rows_carry_each_seed_the_mean_the_sample_std_and_the_mean_time(tmp_path):
    runs = [_run(tmp_path, 1, 0.5, (0.4, 0.6)), _run(tmp_path, 2, 0.7, (0.6, 0.8)), _run(tmp_path, 3, 0.6, (0.5, 0.7))]
    table = comparison_table(runs).splitlines()
    assert table[0] == "| model | seed 1 | seed 2 | seed 3 | eval_accuracy mean ± std | train time (s), mean |"
    assert table[2] == "| teacher | 0.6000 | 0.8000 | 0.7000 | 0.7000 ± 0.1000 | 20 |"
    assert table[3] == "| student | 0.5000 | 0.7000 | 0.6000 | 0.6000 ± 0.1000 | — |"
    domains = domain_table(runs).splitlines()
    assert domains[0] == "| model | all | books | dvd |"
    assert domains[2] == "| student | 0.6000 ± 0.1000 | 0.5000 ± 0.1000 | 0.7000 ± 0.1000 |"


def test_a_run_without_results_is_named(tmp_path):
    with pytest.raises(SystemExit, match="comparison.json is missing"):
        comparison_table([str(tmp_path)])
