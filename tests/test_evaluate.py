"""calib_jax.evaluate: the evaluation pass on a saved checkpoint of a tiny run."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import experiment_configs
from calib_jax import bootstrap, calibration, evaluate, metrics, train
from calib_jax.data import datasets


def tiny_config(**overrides):
    config = experiment_configs.load("cifar10", experiment_configs.TINY_RUN)
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.fixture(scope="module")
def run_dir(evaluated_runs):
    return evaluated_runs / "cifar10" / "resnet50" / "ce"  # tiny_config(), trained in conftest


def test_training_logs(run_dir):
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((run_dir / "config.json").read_text())["model"] == "resnet8"


def test_evaluation_pass_writes_report(run_dir):
    results = evaluate.evaluate_run(run_dir, which="final")
    out = run_dir / "eval_final"
    for name in ("results.json", "results.md", "reliability.png", "reliability_equal_mass.png",
                 "confidence_histogram.png", "temperature_curves.png", "roc_synthetic_c.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert saved["epoch"] == 2 and saved["temperature"]["criterion"] == "ece"
    for tag in ("before", "after"):
        values = saved["test"][tag]
        for key in evaluate.METRIC_NAMES:
            assert 0 <= values[key] < 10 and np.isfinite(values[key])
        assert set(values["ood_auroc"]["synthetic_c"]) == {"entropy", "confidence"}
        assert 0 <= values["ece_sweep"] <= 1 and values["sweep_num_bins"] >= 1
    assert saved["test"]["before"]["error"] == saved["test"]["after"]["error"]
    # What compare checks before pairing examples: each data set's content fingerprint.
    config = evaluate.load_run_config(run_dir)
    prints, options = saved["data"]["fingerprints"], train.dataset_options(config)
    assert prints["test"] == datasets.fingerprint(datasets.load(config.dataset, "test",
                                                                **options))
    assert prints["val"] == datasets.fingerprint(datasets.load(config.dataset, "val",
                                                               **options))
    assert prints["ood"] == {"synthetic_c": datasets.fingerprint(datasets.load("synthetic_c",
                                                                               "test"))}
    assert prints["test"] != prints["val"] and saved["data"]["ood_sources"] == {
        "synthetic_c": datasets.load("synthetic_c", "test").source}
    t = saved["temperature"]["value"]
    assert 0.1 <= t <= 10
    # The NLL-fit temperature where the validation logits' NLL has a finite minimum, else
    # none and why (this tiny synthetic run's may be either).
    saved_logits = np.load(out / evaluate.LOGITS_FILE)
    optimum = calibration.nll_optimum(saved_logits["val_logits"], saved_logits["val_labels"])
    if optimum == "finite":
        assert saved["temperature"]["nll_fit"] > 0 and "nll_fit_none" not in saved["temperature"]
    else:
        assert saved["temperature"]["nll_fit"] is None
        assert saved["temperature"]["nll_fit_none"] == calibration.NO_FINITE_NLL_OPTIMUM[optimum]
    assert f"({evaluate.nll_fit_phrase(saved['temperature'])})." in (out / "results.md").read_text()
    # A T at an end of the grid is marked as such (the criterion may fall beyond it).
    at_edge = json.loads(json.dumps(saved))
    for index, t, end in ((0, 0.1, "smallest"), (99, 10.0, "largest")):
        at_edge["temperature"].update(grid_index=index, value=t)
        assert f"T = {t:.2f} (the grid's {end} T: the ECE may fall further beyond it) chosen" \
            in evaluate.markdown_report(at_edge)
    assert "the grid's" not in evaluate.markdown_report(saved) or \
        saved["temperature"]["grid_index"] in (0, 99)
    assert results["test"]["after"]["ece"] <= results["test"]["before"]["ece"] + 0.05
    report = (out / "results.md").read_text()
    assert "| ece |" in report
    after = saved["test"]["after"]
    assert f"| {evaluate.fixed(100 * after['ece_sweep'])} ({after['sweep_num_bins']} bins) |" \
        in report
    # An earlier version's results (no ece_sweep): the report leaves the row out.
    older = json.loads(json.dumps(saved))
    for tag in ("before", "after"):
        del older["test"][tag]["ece_sweep"], older["test"][tag]["sweep_num_bins"]
    assert "ece_sweep" not in evaluate.markdown_report(older)


def test_bootstrap_intervals_of_the_test_metrics(run_dir, tmp_path, capsys):
    """--bootstrap N: intervals of every metric before and after T from the same resamples
    (the error, which T does not change, gets the same interval both times), in results.json
    and results.md; the report without them has no interval columns."""
    out = tmp_path / "intervals"
    assert evaluate.main(["--workdir", str(run_dir), "--out", str(out), "--bootstrap", "40",
                          "--bootstrap-seed", "3"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "results.json").read_text())
    intervals = saved["test_intervals"]
    assert (intervals["num_resamples"], intervals["seed"], intervals["confidence"]) == \
        (40, 3, 0.95)
    for tag in ("before", "after"):
        for name in evaluate.METRIC_NAMES:
            row = intervals[tag][name]
            assert row["std"] >= 0 and row["percentile"][0] <= row["percentile"][1]
            assert row["basic"][0] <= row["basic"][1]
            # Basic ends are the percentile ends reflected around the reported value.
            value = saved["test"][tag][name]
            np.testing.assert_allclose(row["basic"], [2 * value - row["percentile"][1],
                                                      2 * value - row["percentile"][0]],
                                       atol=1e-5)
    assert intervals["before"]["error"] == intervals["after"]["error"]
    assert intervals["before"]["error"]["std"] > 0
    # The resamples (counted) are bootstrap's of the saved test logits, seed 3.
    with np.load(out / evaluate.LOGITS_FILE) as saved_logits:
        test_logits, test_labels = saved_logits["test_logits"], saved_logits["test_labels"]
    gathered = bootstrap.bootstrap(metrics.summary, test_logits, test_labels,
                                   key=bootstrap.seed_key(3), num_resamples=40)
    for name in ("ece", "adaptive_ece", "classwise_ece", "nll"):
        np.testing.assert_allclose(intervals["before"][name]["percentile"],
                                   [gathered.low[name], gathered.high[name]], atol=2e-6)
    # ece_sweep's interval: gathered resamples, the same ones.
    sweep = bootstrap.bootstrap(metrics.ece_sweep, test_logits, test_labels,
                                key=bootstrap.seed_key(3), num_resamples=40)
    np.testing.assert_allclose(intervals["before"]["ece_sweep"]["percentile"],
                               [sweep.low, sweep.high], atol=1e-7)
    for tag in ("before", "after"):
        row, value = intervals[tag]["ece_sweep"], saved["test"][tag]["ece_sweep"]
        assert row["std"] > 0 and row["percentile"][0] <= row["percentile"][1]
        np.testing.assert_allclose(row["basic"], [2 * value - row["percentile"][1],
                                                  2 * value - row["percentile"][0]], atol=1e-5)
    # OOD AUROC: a two-sample bootstrap (calib_jax.bootstrap's tests check its resamples).
    for tag in ("before", "after"):
        for score in ("entropy", "confidence"):
            row = intervals[tag]["ood_auroc"]["synthetic_c"][score]
            value = saved["test"][tag]["ood_auroc"]["synthetic_c"][score]
            assert row["std"] > 0 and row["percentile"][0] <= row["percentile"][1]
            np.testing.assert_allclose(row["basic"], [2 * value - row["percentile"][1],
                                                      2 * value - row["percentile"][0]],
                                       atol=1e-5)
    report = (out / "results.md").read_text()
    assert "| metric | before T | 95 % interval | after T | 95 % interval |" in report
    low, high = intervals["before"]["ece"]["basic"]
    assert f"| ece | {evaluate.fixed(100 * saved['test']['before']['ece'])} | " \
        f"[{evaluate.fixed(100 * low)}, {evaluate.fixed(100 * high)}] |" in report
    assert "Intervals: basic bootstrap, 40 resamples of the test set (seed 3; OOD AUROC: and " \
        "of the OOD set, independently)" in printed
    low, high = intervals["after"]["ood_auroc"]["synthetic_c"]["entropy"]["basic"]
    value = saved["test"]["after"]["ood_auroc"]["synthetic_c"]["entropy"]
    assert f"| {evaluate.fixed(100 * value)} | [{evaluate.fixed(100 * low)}, " \
        f"{evaluate.fixed(100 * high)}] |" in report
    low, high = intervals["after"]["ece_sweep"]["basic"]
    after = saved["test"]["after"]
    assert f"| {evaluate.fixed(100 * after['ece_sweep'])} ({after['sweep_num_bins']} bins) | " \
        f"[{evaluate.fixed(100 * low)}, {evaluate.fixed(100 * high)}] |" in report
    # An evaluation of an earlier version (no ece_sweep interval): empty cells in its row.
    older = {**saved, "test_intervals": {
        **intervals, **{tag: {k: v for k, v in intervals[tag].items() if k != "ece_sweep"}
                        for tag in ("before", "after")}}}
    assert f"({after['sweep_num_bins']} bins) |  |" in evaluate.markdown_report(older)
    # An evaluation of an earlier version (intervals without OOD AUROC): empty OOD cells.
    older = {**saved, "test_intervals": {
        **intervals, **{tag: {k: v for k, v in intervals[tag].items() if k != "ood_auroc"}
                        for tag in ("before", "after")}}}
    assert "| OOD AUROC synthetic_c (entropy) | " in evaluate.markdown_report(older)
    assert " |  | " in evaluate.markdown_report(older)
    plain = evaluate.markdown_report({k: v for k, v in saved.items() if k != "test_intervals"})
    assert "| metric | before T | after T |" in plain and "interval" not in plain.lower()
    for argv in (["--bootstrap", "1"], ["--bootstrap", "-5"], ["--bootstrap-seed", "-1"],
                 ["--bootstrap-seed", str(2 ** 32)]):
        with pytest.raises(SystemExit):
            evaluate.main(["--workdir", str(run_dir), *argv])
        assert f"`{argv[0]}` must be " in capsys.readouterr().err
    for kwargs, match in (
            (dict(bootstrap_resamples=1), "`bootstrap_resamples` must be 0 \\(no intervals\\) "
                                          "or an int >= 2 \\(1000 is customary\\), got 1"),
            (dict(bootstrap_resamples=2.5), "`bootstrap_resamples` must be 0 .* got 2.5"),
            (dict(bootstrap_seed=2 ** 32), r"`bootstrap_seed` must be an int in \[0, 2\*\*32\)"),
            (dict(bootstrap_seed=-1), "`bootstrap_seed` must be an int in")):
        with pytest.raises(ValueError, match=match):
            evaluate.evaluate_run(run_dir, which="final", out=tmp_path / "refused", **kwargs)
    assert not (tmp_path / "refused").exists()


def test_the_report_never_prints_a_signed_zero(run_dir):
    """A run whose scaled predictions are certain has an NLL of -0.0 (the mean of -log 1):
    the report says 0.0000, not a negative NLL."""
    results = evaluate.evaluate_run(run_dir, which="final")
    results["test"]["after"]["nll"] = -0.0
    results["test"]["after"]["ece"] = -1e-9
    lines = evaluate.markdown_report(results).splitlines()
    nll, ece = ([line for line in lines if line.startswith(f"| {name} |")][0]
                for name in ("nll", "ece"))
    assert nll.endswith("| 0.0000 |") and ece.endswith("| 0.00 |"), (nll, ece)
    assert "-0.0" not in "\n".join(lines)


def test_evaluate_best_and_epoch_checkpoints(run_dir, tmp_path):
    best = evaluate.evaluate_run(run_dir, which="best", criterion="nll")
    assert best["temperature"]["criterion"] == "nll" and best["epoch"] in (1, 2)
    # Another criterion's results go beside the default (ECE) ones, never over them.
    assert json.loads((run_dir / "eval_best_nll" / "results.json").read_text()) == best
    assert not (run_dir / "eval_best").exists()
    first = evaluate.evaluate_run(run_dir, which="1", out=tmp_path / "one")
    assert first["epoch"] == 1
    with pytest.raises(FileNotFoundError, match="epoch 7"):
        evaluate.evaluate_run(run_dir, which="7", out=tmp_path / "seven")
    import os
    real_access = os.access
    with pytest.MonkeyPatch.context() as patch:  # a read-only directory (root writes anyway)
        patch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path
                      and real_access(path, mode))
        with pytest.raises(evaluate.EvaluationRefused,
                           match=rf"`out` = {tmp_path}/ro: {tmp_path}, where it would be "
                                 rf"created, is not writable by this process; give --out"):
            evaluate.evaluate_run(run_dir, which="1", out=tmp_path / "ro")
    (tmp_path / "a_file").write_text("kept")  # refused before any compute, and left as it is
    with pytest.raises(evaluate.EvaluationRefused,
                       match="`out` = .*a_file is a file; give a directory"):
        evaluate.evaluate_run(run_dir, which="1", out=tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "kept"
    with pytest.raises(datasets.DataNotFoundError, match="`data_dir` = .*nowhere: no such "
                                                         "directory"):
        evaluate.evaluate_run(run_dir, which="1", data_dir=tmp_path / "nowhere")


def test_an_evaluation_stopped_while_drawing_leaves_no_results_json(run_dir, tmp_path,
                                                                    monkeypatch):
    """results.json, which marks a complete evaluation for the sweep and the tables, is
    written last: an evaluation that stops while drawing its figures leaves none."""
    from calib_jax import plots

    def broken(*args, **kwargs):
        raise RuntimeError("the last figure failed")
    monkeypatch.setattr(plots, "roc_curves", broken)
    with pytest.raises(RuntimeError, match="the last figure failed"):
        evaluate.evaluate_run(run_dir, which="1", out=tmp_path / "stopped")
    assert (tmp_path / "stopped" / "reliability.png").exists()  # it got that far
    assert not (tmp_path / "stopped" / "results.json").exists()


def test_the_runs_own_data_dir_falls_back_when_not_here(run_dir, tmp_path, monkeypatch, capsys):
    """A run trained on another machine names a data_dir that is not here: the default search
    takes over, with a note (an explicit `data_dir` argument that is no directory is refused)."""
    class Loaded(Exception):
        """Stops the pass at its first data set: the data_dir it was given is the answer."""

    def recording_load(*args, **kwargs):
        raise Loaded(kwargs.get("data_dir"))
    monkeypatch.setattr(evaluate.datasets, "load", recording_load)
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    for saved, given, used in [("/elsewhere/data", None, None), (str(tmp_path), None, tmp_path),
                               ("/elsewhere/data", tmp_path, tmp_path)]:
        (copy / "config.json").write_text(json.dumps(dict(config, data_dir=saved)))
        with pytest.raises(Loaded) as info:
            evaluate.evaluate_run(copy, data_dir=given)
        got = info.value.args[0]
        assert got is None if used is None else str(got) == str(used)
        noted = "data_dir /elsewhere/data is not a directory here" in capsys.readouterr().err
        assert noted == (given is None and saved == "/elsewhere/data")


def test_the_default_checkpoint_is_the_runs_eval_checkpoint(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    assert config["eval_checkpoint"] == "final"
    # Not finished (the config asks for more epochs): the best so far is not the run's best.
    (copy / "config.json").write_text(json.dumps(dict(config, eval_checkpoint="best",
                                                      num_epochs=3)))
    with pytest.raises(evaluate.EvaluationRefused,
                       match=r"has not finished \(latest checkpoint: epoch 2 of 3\)"):
        evaluate.evaluate_run(copy)
    assert not (copy / "eval_best").exists()
    (copy / "config.json").write_text(json.dumps(dict(config, eval_checkpoint="best")))
    results = evaluate.evaluate_run(copy)
    best_epoch = json.loads(next((copy / "best").glob("*/meta/metadata")).read_text())["epoch"]
    assert results["checkpoint"] == "best" and results["epoch"] == best_epoch
    assert json.loads((copy / "eval_best" / "results.json").read_text()) == results
    assert evaluate.main(["--workdir", str(copy), "--out", str(tmp_path / "cli")]) == 0
    assert json.loads((tmp_path / "cli" / "results.json").read_text())["checkpoint"] == "best"


def test_unfinished_run_needs_latest(tmp_path):
    config = tiny_config(num_epochs=3)
    from calib_jax import checkpoints
    state = train.state_for_config(config, 4, (32, 32, 3))
    (tmp_path / "config.json").write_text(config.to_json())
    ckpt = checkpoints.RunCheckpoints(tmp_path)
    ckpt.save(1, state, {"final": False})
    ckpt.close()
    with pytest.raises(evaluate.EvaluationRefused, match="has not finished"):
        evaluate.evaluate_run(tmp_path, which="final")
    assert evaluate.evaluate_run(tmp_path, which="latest")["epoch"] == 1


def test_final_is_the_last_epoch_of_the_runs_config(tmp_path):
    """A finished run lengthened on resume (its config.json now asks for more epochs) has not
    finished, though its old last checkpoint says "final"; a last checkpoint that cannot be
    read is not replaced by an earlier one under the name "final"."""
    from calib_jax import checkpoints
    config = tiny_config(num_epochs=2)
    state = train.state_for_config(config, 4, (32, 32, 3))
    ckpt = checkpoints.RunCheckpoints(tmp_path)
    ckpt.save(1, state, {"final": False})
    ckpt.save(2, state, {"final": True})
    ckpt.close()
    (tmp_path / "config.json").write_text(tiny_config(num_epochs=5).to_json())
    for which in ("final", None):
        with pytest.raises(evaluate.EvaluationRefused,
                           match=r"not finished \(latest checkpoint: epoch 2 of 5\)"):
            evaluate.evaluate_run(tmp_path, which=which)
    (tmp_path / "config.json").write_text(config.to_json())
    for path in (tmp_path / "checkpoints" / "2").rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "meta" not in str(path):
            path.write_bytes(b"\0garbage" * 3)
    with pytest.warns(RuntimeWarning, match="could not be read"), \
            pytest.raises(evaluate.EvaluationRefused,
                          match=r"\(epoch 2\) could not be read; the newest readable one is "
                                r"epoch 1"):
        evaluate.evaluate_run(tmp_path, which="final")
    assert not (tmp_path / "eval_final").exists()


def test_a_run_none_of_whose_checkpoints_can_be_read_is_refused_with_what_to_do(tmp_path):
    """Every periodic checkpoint unreadable: the refusal says to rerun training (which
    recomputes them); an unreadable best, which a finished run never trains again, says to
    evaluate another checkpoint. A run without checkpoints is still a FileNotFoundError."""
    from calib_jax import checkpoints
    config = tiny_config(num_epochs=2)
    (tmp_path / "config.json").write_text(config.to_json())
    state = train.state_for_config(config, 4, (32, 32, 3))
    ckpt = checkpoints.RunCheckpoints(tmp_path)
    ckpt.save(2, state, {"final": True}, best_metrics={"val_accuracy": 0.5})
    ckpt.close()
    with pytest.raises(FileNotFoundError, match="no readable 'best' checkpoint"):
        evaluate.restore_checkpoint(config, tmp_path / "empty", "best", 4, (32, 32, 3))
    from checkpoint_damage import damage
    for folder in ("checkpoints", "best"):
        damage(tmp_path / folder / "2")
    for which, instead in (("final", "rerun the run's training command to recompute them"),
                           ("best", r"evaluate another checkpoint \(--checkpoint final")):
        with pytest.warns(RuntimeWarning, match="could not be read"), \
                pytest.raises(evaluate.EvaluationRefused,
                              match=rf"no '{which}' checkpoint of the run in .* could be read "
                                    rf"\(epochs 2: see the warnings above\); {instead}"):
            evaluate.evaluate_run(tmp_path, which=which)


def test_a_diverged_checkpoint_is_named_as_such(tmp_path):
    import jax
    import jax.numpy as jnp
    config = tiny_config(num_epochs=1)
    from calib_jax import checkpoints
    state = train.state_for_config(config, 4, (32, 32, 3))
    state = state.replace(params=jax.tree_util.tree_map(lambda p: jnp.full_like(p, jnp.nan),
                                                        state.params))
    (tmp_path / "config.json").write_text(config.to_json())
    ckpt = checkpoints.RunCheckpoints(tmp_path)
    ckpt.save(1, state, {"final": True})
    ckpt.close()
    with pytest.raises(evaluate.EvaluationRefused,
                       match=r"'final' checkpoint of .* \(epoch 1\) gives 512 NaN or infinite "
                             r"logits on synthetic \(val\): the run had diverged"):
        evaluate.evaluate_run(tmp_path)
    assert not (tmp_path / "eval_final").exists()


def test_cli_and_bad_arguments(run_dir, tmp_path, capsys):
    assert evaluate.main(["--workdir", str(run_dir), "--out", str(tmp_path / "cli")]) == 0
    assert "| error |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        evaluate.main(["--workdir", str(run_dir), "--checkpoint", "newest"])
    with pytest.raises(FileNotFoundError, match="config.json"):
        evaluate.evaluate_run(tmp_path / "empty")
    # --data-dir as the demo spells it, --data_dir as before; both checked before any compute.
    # The command states a refusal in one message (exit status 1), not a traceback.
    for flag in ("--data-dir", "--data_dir"):
        assert evaluate.main(["--workdir", str(run_dir), flag, str(tmp_path / "nowhere")]) == 1
        assert "DataNotFoundError: `data_dir` = " in capsys.readouterr().err
    assert evaluate.main(["--workdir", str(run_dir), "--checkpoint", "7"]) == 1
    assert "FileNotFoundError: no checkpoint for epoch 7" in capsys.readouterr().err
    copy = tmp_path / "longer"  # the run lengthened: not finished
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("eval_*"))
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(dict(config, num_epochs=3)))
    assert evaluate.main(["--workdir", str(copy)]) == 1
    assert "EvaluationRefused: the run in " in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an abbreviation is refused, not taken for --criterion
        evaluate.main(["--workdir", str(run_dir), "--crit", "nll"])
    assert "unrecognized arguments: --crit" in capsys.readouterr().err


def test_a_group_evaluates_every_member_it_can(run_dir, tmp_path, capsys):
    # One member that cannot be evaluated (here: lengthened, so not finished) is reported and
    # the others are evaluated all the same; the exit status says that one was not.
    group = tmp_path / "group"
    for name in ("unfinished", "done"):
        shutil.copytree(run_dir, group / name, ignore=shutil.ignore_patterns("eval_*"))
    config = json.loads((group / "unfinished" / "config.json").read_text())
    (group / "unfinished" / "config.json").write_text(json.dumps(dict(config, num_epochs=3)))
    (group / "members.json").write_text(json.dumps({"members": ["unfinished", "done"]}))
    assert evaluate.main(["--workdir", str(group)]) == 1
    captured = capsys.readouterr()
    assert "EvaluationRefused: the run in " in captured.err and "| error |" in captured.out
    assert "not evaluated: unfinished (of 2 members" in captured.err
    assert (group / "done" / "eval_final" / "results.json").exists()
    assert not (group / "unfinished" / "eval_final").exists()
