"""benchmarks/bootstrap_coverage.py at a tiny size: every row, both methods, the timing and
the JSON (the table it prints at full size is quoted in calib_jax.bootstrap's docstring)."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
import bootstrap_coverage  # noqa: E402


def test_the_table_rows_and_timing_run_and_are_recorded(tmp_path, capsys):
    out = tmp_path / "coverage.json"
    bootstrap_coverage.main(["--trials", "2", "--test-size", "40", "--resamples", "8",
                             "--population", "2000", "--time-size", "50", "--time-resamples", "4",
                             "--time-ood-size", "30", "--time-classes", "3", "--json", str(out)])
    report = json.loads(out.read_text())
    rows = report["coverage"]
    assert [r["row"] for r in rows[:6]] == [row[0] for row in bootstrap_coverage.ROWS]
    for row in rows[:6]:
        assert set(row["held"]) == {"percentile", "basic"} and row["trials"] == 2
        assert all(0 <= held <= 2 for held in row["held"].values())
        assert row["mean_width"] > 0
    # Over-confident logits (x1.2) have the larger population ECE.
    assert rows[1]["population"] > rows[0]["population"] >= 0
    assert rows[6]["width"] > 0
    # The sweep rows are measured against the same population value as the ECE rows.
    assert rows[4]["population"] == rows[0]["population"] and rows[4]["mean_estimate"] >= 0
    assert [t["metric"] for t in report["timing"]] == [
        "metrics.ece", "metrics.summary", "metrics.bootstrap_summary", "ood.aurocs",
        "ood.bootstrap_aurocs"]
    assert [t["examples"] for t in report["timing"]] == [[50], [50], [50], [50, 30], [50, 30]]
    assert all(t["later_call_s"] > 0 and t["resamples"] == 4 and t["classes"] == 3
               for t in report["timing"])
    assert "| calibrated |" in capsys.readouterr().out


def test_bad_arguments_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bootstrap_coverage.main(["--resamples", "1"])
    assert exit_info.value.code == 2 and "--resamples must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        bootstrap_coverage.main(["--time-classes", "1"])
    assert exit_info.value.code == 2 and "--time-classes must be >= 2" in capsys.readouterr().err
