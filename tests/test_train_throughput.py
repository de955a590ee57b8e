"""benchmarks/train_throughput.py at CPU size: the GPU session that runs it (gpu_check.sh
table / models, a few lent minutes) must not be the first to find it broken."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
import train_throughput  # noqa: E402


def test_the_table_parts_rows_run_and_are_recorded(tmp_path, capsys, monkeypatch):
    """gpu_check.sh table's kinds of row (the evaluation pass, a training row, the epoch
    overhead, the six-loss row, here two losses as sequential members) at ResNet-8 size."""
    monkeypatch.setattr(train_throughput, "NUM_TRAIN", 512)
    monkeypatch.setattr(train_throughput, "NUM_VAL", 500)
    out = tmp_path / "rows.json"
    # Two steps per call, unrolled: on CPU a rolled loop runs its convolutions through
    # XLA:CPU's slow in-loop path (jax-ml/jax#12868), ten times slower again at the test
    # session's XLA level 0 (45 s alone with the rolled loop, 35 s unrolled).
    status = train_throughput.main([
        "--models", "resnet8", "--batch-sizes", "8", "--dtypes", "bfloat16", "--losses", "ce",
        "--steps-per-call", "2", "--unroll", "2", "--calls", "1", "--epoch-overhead",
        "--param-layout", "flat",  # the GPU default's path, here on CPU
        "--multi", "ce,flsd53",
        "--multi-modes", "sequential", "--eval", "--json", str(out)])
    assert status == 0, capsys.readouterr().out[-2000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert not [r for r in rows if "error" in r]
    eval_row, train_row, overhead, multi = rows
    assert eval_row["eval_pass_s"] > 0 and eval_row["logits"] == "10000x10"
    assert (train_row["model"], train_row["batch"], train_row["dtype"], train_row["loss"]) == \
        ("resnet8", 8, "bfloat16", "ce")
    assert train_row["img_per_s"] > 0 and train_row["compile_s"] > 0
    # How the rows were compiled: flat parameters as asked; no XLA options on CPU.
    for row in (train_row, multi):
        assert row["flat_params"] is True and row["compiler_options"] == {}
    assert overhead["epoch_overhead"] and overhead["val_images"] == 500
    assert overhead["full_run_min_ckpt_every_epoch"]["async"] > 0
    # The benchmark's own correctness check: the CE member's first step is the single run's
    # (0 measured for sequential members on CPU; vmapped 7.6e-5).
    assert (multi["runs"], multi["members"]) == (2, "sequential")
    assert multi["losses_vs_single_run"]["first_step_rel_diff"] < 1e-5
    table = capsys.readouterr().out
    assert "| resnet8 | 8 | bfloat16 | ce (2/call, unroll 2, flat params;" in table and "2 runs (sequential)" in table


def test_a_failed_row_is_recorded_the_others_run_and_the_status_says_so(
        tmp_path, monkeypatch, capsys):
    def broken(args, name, batch_size, dtype, loss, data):
        if loss == "ce":
            raise RuntimeError("out of memory")
        return {"model": name, "batch": batch_size, "dtype": dtype, "loss": loss,
                "img_per_s": 1.0, "compile_s": 1.0, "steps_per_call": 1}

    monkeypatch.setattr(train_throughput, "bench_model", broken)
    monkeypatch.setattr(train_throughput, "synthetic_train_data", lambda: None)
    monkeypatch.setattr(train_throughput, "_print_row", lambda r: None)
    out = tmp_path / "rows.json"
    status = train_throughput.main(["--models", "resnet8", "--batch-sizes", "8",
                                    "--dtypes", "float32", "--losses", "ce,flsd53",
                                    "--json", str(out)])
    assert status == 1
    rows = json.loads(out.read_text())["rows"]
    assert rows[0] == {"row": "resnet8/8/float32/ce", "error": "RuntimeError: out of memory"}
    assert rows[1]["loss"] == "flsd53"
    assert "1 row(s) failed: resnet8/8/float32/ce" in capsys.readouterr().out


@pytest.mark.parametrize("argv,why", [
    (["--unroll", "-1"], "--unroll must be >= 0"),
    # Each of these ran every row, each failing on its own (GPU time lost to a typo):
    (["--models", "resnet50,resnet9"], "--models: unknown resnet9"),
    (["--models", "tree_lstm"], "--models: unknown tree_lstm"),  # the task is images
    (["--dtypes", "float16"], "--dtypes: unknown float16"),
    (["--losses", "ce,fsld53"], "--losses: unknown fsld53"),
    (["--multi", "ce,brier,mmce"], "--multi: unknown mmce"),
    (["--multi", "ce", "--multi-modes", "vmap,parallel"], "--multi-modes: unknown parallel"),
    (["--batch-sizes", "128,0"], "--batch-sizes takes positive integers"),
    (["--steps-per-call", "0"], "--steps-per-call must be >= 1"),
    (["--calls", "0"], "--calls must be >= 1"),
])
def test_bad_arguments_are_usage_errors(argv, why, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_throughput.parse_args(argv)
    assert exit_info.value.code == 2 and why in capsys.readouterr().err
