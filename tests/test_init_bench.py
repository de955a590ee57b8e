"""benchmarks/init_bench.py at CPU size (gpu_check.sh init runs it on a lent GPU)."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
import init_bench  # noqa: E402


def test_both_modes_are_timed_in_fresh_processes_and_compared(tmp_path, capsys):
    """On a CPU both modes initialise on the CPU: equal numbers. A model that fails is
    recorded with its error, the others still run, and the exit status says so."""
    out = tmp_path / "init.json"
    status = init_bench.main(["--models", "resnet8,no_such_model", "--json", str(out)])
    assert status == 1
    ok, failed = json.loads(out.read_text())["rows"]
    assert ok["model"] == "resnet8" and ok["backend"] == "cpu"
    assert ok["host_s"] > 0 and ok["device_s"] > 0 and ok["variables"] > 70_000
    assert ok["same_structure"] and ok["elements_differing"] == 0
    assert failed["model"] == "no_such_model" and "no_such_model" in failed["error"]
    assert "| resnet8 | 0.1 M |" in capsys.readouterr().out


def test_compare_counts_the_elements_that_differ(tmp_path):
    import numpy as np
    np.savez(tmp_path / "a.npz", w=np.array([1.0, 2.0, 3.0], np.float32), b=np.zeros(2))
    np.savez(tmp_path / "b.npz", w=np.array([1.0, 2.5, 3.0], np.float32), b=np.zeros(2))
    result = init_bench.compare(tmp_path / "a.npz", tmp_path / "b.npz")
    assert (result["elements_differing"], result["max_abs_diff"]) == (1, 0.5)
    assert result["first_leaves_differing"] == ["w"]
    np.savez(tmp_path / "c.npz", w=np.zeros(3))
    assert not init_bench.compare(tmp_path / "a.npz", tmp_path / "c.npz")["same_structure"]
