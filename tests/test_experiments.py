"""experiments/: per-cell configs, the sweep runner and the table builder."""

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
sys.path.insert(0, str(REPO / "experiments" / "configs"))

import build_tables  # noqa: E402
import cifar10  # noqa: E402
import paper  # noqa: E402
import sweep  # noqa: E402
import tiny_imagenet  # noqa: E402

from calib_jax import train  # noqa: E402


def test_every_paper_cell_has_a_valid_config():
    cells = paper.cells()
    numbers = json.loads((REPO / "experiments" / "paper_numbers.json").read_text())
    assert {(c["dataset"], c["model"], c["loss"]) for c in numbers["ece"]} <= set(cells)
    assert len(cells) == 66  # 54 with paper numbers, 6 FL-3 cells not reprinted, 6 SST cells
    for dataset, model, loss in cells:
        config = paper.get_config(f"cell={dataset}/{model}/{loss}")
        train.validate_config(config, num_devices=1)
        assert (config.dataset, config.model, config.loss) == (dataset, model, loss)


def test_config_overrides_cast_to_the_field_type_or_name_the_field():
    config = cifar10.get_config("early_decay=TRUE,augment=0,num_epochs=7,learning_rate=0.05,"
                                "lr_boundaries=[3,5],seeds=1:2,loss=[ce,flsd53]")
    assert config.early_decay is True and config.augment is False
    assert (config.num_epochs, config.learning_rate) == (7, 0.05)
    assert config.lr_boundaries == (3, 5) and config.seeds == (1, 2)
    assert config.loss == "[ce,flsd53]"
    # A typo never falls back to a default: early_decay=ture used to train with False.
    for bad, field in [("early_decay=ture", "early_decay"), ("num_epochs=3.5", "num_epochs"),
                       ("learning_rate=fast", "learning_rate"),
                       ("lr_boundaries=150.5:250", "lr_boundaries"), ("seeds=[a]", "seeds")]:
        with pytest.raises(ValueError, match=rf"config override {field}=.*{field} takes a"):
            cifar10.get_config(bad)
    with pytest.raises(ValueError, match="unknown config field 'epochs'"):
        cifar10.get_config("epochs=3")


def test_reference_exceptions_and_recipes():
    assert paper.get_config("cell=cifar10/wide_resnet_26_10/brier").num_epochs == 550
    assert paper.get_config("cell=cifar100/resnet110/brier").num_epochs == 430
    assert paper.get_config("cell=cifar10/resnet110/brier").num_epochs == 350
    c = paper.get_config("cell=cifar10/resnet50/ce")
    assert (c.learning_rate, tuple(c.lr_boundaries), c.batch_size, c.weight_decay, c.clip_norm,
            c.momentum) == (0.1, (150, 250), 128, 5e-4, 2.0, 0.9)
    t = tiny_imagenet.get_config("loss=brier")
    assert (t.learning_rate, t.num_epochs, tuple(t.lr_boundaries), t.batch_size) == \
        (0.035, 100, (40, 60), 64)
    assert tiny_imagenet.get_config("loss=ce").learning_rate == 0.1
    assert paper.get_config("cell=cifar10/resnet50/ce,num_epochs=2").num_epochs == 2
    # The checkpoint each recipe reports: the last epoch, or (text) the best validation one.
    assert [paper.get_config(f"cell={cell}").eval_checkpoint for cell in (
        "cifar10/resnet50/ce", "tiny_imagenet/resnet50_tiny_imagenet/ce",
        "20news/global_pooling_cnn/ce", "sst/tree_lstm/ce")] == ["final", "final", "best", "best"]
    bad = paper.get_config("cell=cifar10/resnet50/ce,eval_checkpoint=latest")
    with pytest.raises(ValueError, match="config.eval_checkpoint = 'latest': must be one of"):
        train.validate_config(bad, num_devices=1)
    # SST trains as the reference does: every labelled phrase, MMCE without a lambda.
    s = paper.get_config("cell=sst/tree_lstm/mmce_weighted")
    assert (s.phrase_labels, s.mmce_lambda, s.loss_mean) == (True, 1.0, True)
    assert not paper.get_config("cell=20news/global_pooling_cnn/ce").phrase_labels
    with pytest.raises(ValueError, match="config.phrase_labels = True: trains a Tree-LSTM on "
                                         "SST's labelled phrases"):
        train.validate_config(paper.get_config("cell=cifar10/resnet50/ce,phrase_labels=true"),
                              num_devices=1)
    with pytest.raises(ValueError, match="cell="):
        paper.get_config("model=resnet50")


def test_sweep_and_tables_end_to_end(tmp_path, capsys):
    # One real cell, shrunk to the synthetic task so that it runs in seconds.
    args = ["--cells", "cifar10/resnet50/ce", "--workroot", str(tmp_path),
            "--set", "dataset=synthetic,model=resnet8,num_epochs=1,batch_size=64"]
    assert sweep.main(args) == 0
    results = tmp_path / "cifar10" / "resnet50" / "ce" / "eval_final" / "results.json"
    assert results.exists()
    assert sweep.main(args) == 0  # restart: the finished cell is skipped
    assert "done  cell=cifar10/resnet50/ce" in capsys.readouterr().out
    # Asked for bootstrap intervals, the cell evaluated without them is evaluated again (its
    # training has nothing left to do); then it is done.
    assert sweep.main(args + ["--bootstrap", "20"]) == 0
    out = capsys.readouterr().out
    assert "(its results have no bootstrap intervals of 20 resamples)" in out
    assert "nothing to train" in out
    assert json.loads(results.read_text())["test_intervals"]["num_resamples"] == 20
    assert sweep.main(args + ["--bootstrap", "20"]) == 0
    assert "done  cell=cifar10/resnet50/ce" in capsys.readouterr().out
    saved = json.loads(results.read_text())
    assert set(saved["test_intervals"]["before"]["ood_auroc"]) == {"synthetic_c"}
    # The tables list the run with its intervals.
    low, high = saved["test_intervals"]["before"]["ece"]["basic"]
    row = _row(build_tables.build(tmp_path).split("## Bootstrap 95 % intervals")[1],
               "| cifar10 | resnet50 | ce | 1 | 20 | ")
    assert f"| {100 * saved['test']['before']['ece']:.2f}* [{100 * low:.2f}, {100 * high:.2f}] |" \
        in row and "synthetic_c " in row
    with pytest.raises(SystemExit):
        sweep.main(args + ["--bootstrap", "1"])
    assert "`--bootstrap` must be 0 (no intervals) or an int >= 2" in capsys.readouterr().err
    # Asked for longer, the cell is not done: it trains on from its last epoch and is
    # evaluated again.
    longer = args[:-1] + [args[-1].replace("num_epochs=1", "num_epochs=2")]
    assert sweep.main(longer) == 0
    out = capsys.readouterr().out
    assert "todo  cell=cifar10/resnet50/ce -> " in out
    assert "(its results are of another config: num_epochs 1 -> 2)" in out
    assert "resumed from" in out and "epoch 2/2:" in out and "epoch 1/2:" not in out
    assert json.loads(results.read_text())["epoch"] == 2
    # Any other change is refused by the training, naming the field; the results stay.
    with pytest.raises(ValueError, match="learning_rate 0.1 -> 0.2"):
        sweep.main(longer[:-1] + [longer[-1] + ",learning_rate=0.2"])
    assert json.loads(results.read_text())["epoch"] == 2
    text = build_tables.build(tmp_path)
    row = next(line for line in text.splitlines()
               if line.startswith("| cifar10 | resnet50 | ce | ") and "4.35" in line)
    ours = json.loads(results.read_text())["test"]["before"]["ece"] * 100
    assert f"{ours:.2f}" in row and f"{ours - 4.35:+.2f}" in row
    assert "(1 cells evaluated)" in text
    # Trained on the synthetic task with a ResNet-8: marked, and the differences listed.
    assert f"| {ours:.2f}* | 4.35 |" in row
    assert ("- cifar10/resnet50/ce: dataset 'synthetic' (paper's recipe: 'cifar10'); model "
            "'resnet8' (paper's recipe: 'resnet50'); num_epochs 2 (paper's recipe: 350)") in text
    assert "Test data: synthetic from generated (1 run)." in text
    assert build_tables.main(["--workroot", str(tmp_path)]) == 0
    assert (tmp_path / "tables.md").read_text() == text + "\n"
    # Replicates: --seeds trains the other seeds beside the recipe seed's (done) cell, and the
    # tables give the mean and the sample standard deviation of each number.
    assert sweep.main(longer + ["--seeds", "1,2"]) == 0
    out = capsys.readouterr().out
    seed2 = tmp_path / "cifar10" / "resnet50" / "ce-seed2"
    assert "done  cell=cifar10/resnet50/ce -> " in out
    assert f"run   cell=cifar10/resnet50/ce,seed=2,{longer[-1]} -> {seed2}" in out
    assert json.loads((seed2 / "config.json").read_text())["seed"] == 2
    both = build_tables.build(tmp_path)
    eces = [100 * json.loads((run_dir / "eval_final" / "results.json").read_text())[
        "test"]["before"]["ece"] for run_dir in (results.parents[1], seed2)]
    assert eces[0] != eces[1]
    assert f"| {sum(eces) / 2:.2f} ± {abs(eces[0] - eces[1]) / 2 ** 0.5:.2f}* | 4.35 |" in both
    assert "Replicates: seeds 1, 2;" in both and "(2 runs)" in both
    assert sweep.main(longer + ["--seeds", "1,2"]) == 0  # both done now
    assert "done  cell=cifar10/resnet50/ce,seed=2 -> " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        sweep.main(["--cells", "mnist/*/*", "--workroot", str(tmp_path)])
    for several_runs in ("seeds=[1,2]", "num_epochs=1,loss=flsd53"):  # a cell is one run
        with pytest.raises(SystemExit):
            sweep.main(args[:-1] + [several_runs])
        assert "a cell is one loss and one seed" in capsys.readouterr().err
    for bad_seeds, why in (("1,x", "give integers"), ("2,2", "a seed is given twice")):
        with pytest.raises(SystemExit):
            sweep.main(args + ["--seeds", bad_seeds])
        assert why in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.main(args[:-1] + [args[-1] + ",seed=3", "--seeds", "1,2"])
    assert "give the seeds in --seeds alone" in capsys.readouterr().err
    # A bad value is refused before any run trains, also in a dry run.
    fresh = ["--cells", "cifar10/resnet50/ce", "--workroot", str(tmp_path / "fresh"), "--dry-run"]
    for more, why in ((["--set", "keep_checkpoints=0"], "config.keep_checkpoints = 0"),
                      (["--seeds", "1,-2"], "config.seed = -2"),
                      (["--set", "lr=3"], "--set lr=3: unknown config field 'lr'; fields: "),
                      (["--set", "batch_size=abc"], "batch_size takes an integer")):
        with pytest.raises(SystemExit):
            sweep.main(fresh + more)
        assert why in capsys.readouterr().err
    assert not (tmp_path / "fresh").exists()
    with pytest.raises(SystemExit):  # a mistyped workroot: not a table of the paper's numbers
        build_tables.main(["--workroot", str(tmp_path / "typo")])
    assert not (tmp_path / "typo").exists()
    # One that exists but holds no evaluated run (the sweep's parent): said, and which files
    # the tables read.
    assert build_tables.main(["--workroot", str(tmp_path / "cifar10")]) == 0
    assert f"warning: no evaluated run under {tmp_path / 'cifar10'} (the tables read " \
        f"{tmp_path / 'cifar10'}/<dataset>/<model>/<loss>/eval_final/results.json" \
        in capsys.readouterr().err
    build_tables.main(["--workroot", str(tmp_path)])
    assert "warning" not in capsys.readouterr().err


def _write_results(root, cell, config, ece=0.01, **report):
    """A results.json as evaluate_run writes it, with only the fields the tables read."""
    report = {"ece": ece, "error": 0.05, "ood_auroc": {}, **report}
    results = {"config": json.loads(config.to_json()), "data": {"test": "/data/cifar10"},
               "checkpoint": "final", "temperature": {"value": 1.1},
               "test": {"before": report, "after": report}}
    path = Path(root).joinpath(*cell.split("/"), "eval_final", "results.json")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(results))


def _row(text, prefix, table=0):
    return [line for line in text.splitlines() if line.startswith(prefix)][table]


def test_tables_mark_only_the_cells_off_the_papers_recipe(tmp_path):
    def write(cell, config):
        _write_results(tmp_path, cell, config)

    write("cifar10/resnet110/brier", paper.get_config("cell=cifar10/resnet110/brier"))
    recipe = paper.get_config("cell=cifar10/resnet110/ce")
    with recipe.unlocked():  # how a run was executed does not matter; what it computed does
        recipe.steps_per_call, recipe.learning_rate = 7, 0.2
    write("cifar10/resnet110/ce", recipe)
    text = build_tables.build(tmp_path)
    rows = {}  # loss -> its rows: ECE table, error table
    for line in text.splitlines():
        if line.startswith("| cifar10 | resnet110 | "):
            rows.setdefault(line.split(" | ")[2], []).append(line)
    assert "| 1.00 |" in rows["brier"][0] and "| 5.00 |" in rows["brier"][1]
    assert not any("*" in row for row in rows["brier"])
    assert "| 1.00* |" in rows["ce"][0] and "| 5.00* |" in rows["ce"][1]
    assert "- cifar10/resnet110/ce: learning_rate 0.2 (paper's recipe: 0.1)" in text
    assert "cifar10/resnet110/brier:" not in text
    assert "Test data: cifar10 from /data/cifar10 (2 runs)." in text


def test_tables_list_the_runs_evaluated_with_bootstrap_intervals(tmp_path):
    """Each run with intervals gets a row (its seed, resamples, values with basic intervals);
    a run without adds none; no run with intervals, no section; tables.json keeps them."""
    def entry(low, high):
        return {"std": 0.001, "percentile": [low, high], "basic": [low, high]}

    cell = "cifar10/resnet110/ce"
    for root, seed in ((tmp_path / "a", 1), (tmp_path / "b", 2)):
        _write_results(root, cell, paper.get_config(f"cell={cell},seed={seed}"), ece=0.03,
                       nll=0.2, ood_auroc={"svhn": {"entropy": 0.9, "confidence": 0.8}})
    assert "Bootstrap" not in build_tables.build([tmp_path / "a", tmp_path / "b"])
    path = tmp_path / "a" / "cifar10" / "resnet110" / "ce" / "eval_final" / "results.json"
    saved = json.loads(path.read_text())
    scored = {"error": entry(0.04, 0.06), "ece": entry(0.02, 0.041), "nll": entry(0.15, 0.25)}
    saved["test_intervals"] = {
        "num_resamples": 1000, "seed": 0, "confidence": 0.95, "before": scored,
        "after": {**scored, "ood_auroc": {"svhn": {"entropy": entry(0.88, 0.92)}}}}
    path.write_text(json.dumps(saved))
    text = build_tables.build([tmp_path / "a", tmp_path / "b"])
    section = text.split("## Bootstrap 95 % intervals of single runs (%; NLL as is)")[1]
    assert section.count("| cifar10 | resnet110 | ce |") == 1  # seed 2 has none
    assert "| cifar10 | resnet110 | ce | 1 | 1,000 | 5.00 [4.00, 6.00] | 3.00 [2.00, 4.10] | " \
        "3.00 [2.00, 4.10] | 0.2000 [0.1500, 0.2500] | svhn 90.00 [88.00, 92.00] |" in section
    out = tmp_path / "tables.md"
    assert build_tables.main(["--workroot", f"{tmp_path / 'a'},{tmp_path / 'b'}",
                              "--out", str(out)]) == 0
    summary = json.loads(out.with_suffix(".json").read_text())[cell]
    assert summary["test_intervals"][0]["num_resamples"] == 1000
    assert summary["test_intervals"][1] is None


def test_sweep_bootstrap_needs_ood_auroc_intervals_too(tmp_path):
    """A cell evaluated with intervals of N resamples but none of OOD AUROC (an earlier
    version's evaluation) is not done under --bootstrap N: the sweep evaluates it again."""
    cell = "cifar10/resnet110/ce"
    config = paper.get_config(f"cell={cell}")
    run_dir = tmp_path.joinpath(*cell.split("/"))
    _write_results(tmp_path, cell, config,
                   ood_auroc={"svhn": {"entropy": 0.9, "confidence": 0.8}})
    (run_dir / "config.json").write_text(config.to_json())
    path = run_dir / "eval_final" / "results.json"
    saved = json.loads(path.read_text())
    entry = {"std": 0.01, "percentile": [0.0, 0.1], "basic": [0.0, 0.1]}
    saved["test_intervals"] = {"num_resamples": 20, "seed": 0, "confidence": 0.95,
                               "before": {"ece": entry}, "after": {"ece": entry}}
    path.write_text(json.dumps(saved))
    assert sweep.finished(run_dir, config) == (True, "")
    assert sweep.finished(run_dir, config, 20) == (
        False, " (its results have no bootstrap intervals of OOD AUROC: evaluated by an "
               "earlier version)")
    for tag in ("before", "after"):
        saved["test_intervals"][tag]["ood_auroc"] = {"svhn": {"entropy": entry}}
    path.write_text(json.dumps(saved))
    assert sweep.finished(run_dir, config, 20) == (True, "")
    assert sweep.finished(run_dir, config, 30)[0] is False


def test_tables_and_sweep_read_the_checkpoint_each_recipe_reports(tmp_path):
    # 20 Newsgroups reports the best-validation checkpoint (the reference keeps that model).
    cell = "20news/global_pooling_cnn/flsd53"
    config = paper.get_config(f"cell={cell}")
    run_dir = tmp_path.joinpath(*cell.split("/"))
    _write_results(tmp_path, cell, config, ece=0.07)  # eval_final/: not the table's
    assert sweep.finished(run_dir, config) == (False, "")
    best = json.loads((run_dir / "eval_final" / "results.json").read_text())
    best["checkpoint"], best["test"]["before"]["ece"] = "best", 0.02
    (run_dir / "eval_best").mkdir()
    (run_dir / "eval_best" / "results.json").write_text(json.dumps(best))
    assert build_tables.load_results(tmp_path)[tuple(cell.split("/"))]["checkpoint"] == "final"
    (run_dir / "config.json").write_text(config.to_json())  # the run's record says best
    assert build_tables.load_results(tmp_path)[tuple(cell.split("/"))]["checkpoint"] == "best"
    assert "| 20news | global_pooling_cnn | flsd53 | 2.00 |" in build_tables.build(tmp_path)
    assert sweep.finished(run_dir, config) == (True, "")
    # Asked for the other checkpoint, the cell is not done (its results are of the other one).
    final = paper.get_config(f"cell={cell},eval_checkpoint=final")
    assert sweep.finished(run_dir, final) == (
        False, " (its results are of another config: eval_checkpoint 'best' -> 'final')")


def test_tables_of_replicates_give_mean_and_sample_std_over_seeds(tmp_path):
    roots = [tmp_path / f"seed{s}" for s in (1, 2, 3)]
    for root, seed, ece in zip(roots, (1, 2, 3), (0.01, 0.02, 0.06)):
        config = paper.get_config(f"cell=cifar10/resnet110/ce,seed={seed}")
        _write_results(root, "cifar10/resnet110/ce", config, ece=ece, adaptive_ece=ece / 2,
                       classwise_ece=0.004, nll=0.25)
    # A cell of only one root (FL-3 on CIFAR-100: no paper numbers) is shown as it is.
    _write_results(roots[0], "cifar100/resnet110/focal",
                   paper.get_config("cell=cifar100/resnet110/focal"), ece=0.03)
    text = build_tables.build(roots)
    # ECE 1, 2, 6 %: mean 3.00, sample std sqrt(((-2)^2 + (-1)^2 + 3^2) / 2) = 2.65.
    ece_row = _row(text, "| cifar10 | resnet110 | ce | ")
    assert ece_row.startswith("| cifar10 | resnet110 | ce | 3.00 ± 2.65 | 4.41 | -1.41 | "
                              "3.00 ± 2.65 | ")
    assert ece_row.endswith("| 1.1 ± 0.0 | 2.8 |")  # T, ours and the paper's
    assert _row(text, "| cifar10 | resnet110 | ce | ", 1).startswith(
        "| cifar10 | resnet110 | ce | 5.00 ± 0.00 | ")
    assert _row(text, "| cifar10 | resnet110 | ce | ", 2) == (
        "| cifar10 | resnet110 | ce | 1.50 ± 1.32 | 1.50 ± 1.32 | 0.40 ± 0.00 | 0.40 ± 0.00 | "
        "0.25 ± 0.00 | 0.25 ± 0.00 |")
    assert _row(text, "| cifar100 | resnet110 | focal | ").startswith(
        "| cifar100 | resnet110 | focal | 3.00 | - | - | 3.00 | - | - | 1.1 | - |")
    assert "seeds 1, 2, 3" in text
    assert "Cells with fewer than 3 runs: cifar100/resnet110/focal (1)." in text
    assert "*" not in ece_row  # the seed is not a recipe difference
    # A single root keeps its plain numbers.
    assert _row(build_tables.build(roots[2]), "| cifar10 | resnet110 | ce | ").startswith(
        "| cifar10 | resnet110 | ce | 6.00 | 4.41 | +1.59 | ")

    out = tmp_path / "tables.md"
    assert build_tables.main(["--workroot", ",".join(map(str, roots)), "--out", str(out)]) == 0
    assert out.read_text() == text + "\n"
    summary = json.loads((tmp_path / "tables.json").read_text())  # the numbers, for scripts
    ce = summary["cifar10/resnet110/ce"]
    assert (ce["runs"], ce["seeds"]) == (3, [1, 2, 3])
    assert ce["test"]["before"]["ece"] == pytest.approx({"mean": 0.03, "std": 0.0264575})
    assert ce["test"]["after"]["nll"] == pytest.approx({"mean": 0.25, "std": 0.0})
    assert summary["cifar100/resnet110/focal"]["test"]["before"]["ece"] == {"mean": 0.03,
                                                                           "std": None}
    assert ce["temperature"] == pytest.approx({"mean": 1.1, "std": 0.0})
    for argv in (["--workroot", ",".join(map(str, roots))],            # --out needed
                 ["--workroot", f"{roots[0]},{roots[0]}", "--out", str(out)],  # a root twice
                 ["--workroot", str(roots[0]), "--out", str(tmp_path / "t.json")]):  # -> .json
        with pytest.raises(SystemExit):
            build_tables.main(argv)
    assert not (roots[0] / "tables.md").exists()


def test_tables_read_the_members_of_a_program_trained_with_seeds_as_replicates(tmp_path):
    # What train_and_evaluate writes for a row trained with seeds in one program: each member
    # a run directory <loss>-seed<s> in the row's directory, with its single-run config.
    group = paper.get_config("cell=cifar10/resnet110/[ce,flsd53],seeds=[1,2]")
    members = train.run_members(group)
    assert [name for name, _ in members] == ["ce-seed1", "ce-seed2", "flsd53-seed1",
                                             "flsd53-seed2"]
    for (name, config), ece in zip(members, (0.01, 0.03, 0.02, 0.02)):
        _write_results(tmp_path, f"cifar10/resnet110/{name}", config, ece=ece)
    text = build_tables.build(tmp_path)
    assert _row(text, "| cifar10 | resnet110 | ce | ").startswith(
        "| cifar10 | resnet110 | ce | 2.00 ± 1.41 | 4.41 | -2.41 | ")
    assert _row(text, "| cifar10 | resnet110 | flsd53 | ").startswith(
        "| cifar10 | resnet110 | flsd53 | 2.00 ± 0.00 | 1.87 | +0.13 | ")
    assert "(2 cells evaluated)" in text and "*" not in _row(text, "| cifar10 | resnet110 | ce")
    assert f"Replicates: seeds 1, 2; work root {tmp_path}." in text
    # The single run of seed 1 beside its member: the same run twice.
    _write_results(tmp_path, "cifar10/resnet110/ce", paper.get_config("cell=cifar10/resnet110/ce"))
    with pytest.raises(ValueError, match=r"resnet110/ce and \S*/ce-seed1 both have seed 1"):
        build_tables.build(tmp_path)


def test_tables_refuse_replicates_that_are_not_other_seeds_of_one_recipe(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _write_results(a, "cifar10/resnet110/ce", paper.get_config("cell=cifar10/resnet110/ce"))
    _write_results(b, "cifar10/resnet110/ce", paper.get_config(
        "cell=cifar10/resnet110/ce,steps_per_call=7"))  # how it ran: not a difference
    with pytest.raises(ValueError, match=rf"cell cifar10/resnet110/ce: the runs in "
                                         rf"{a / 'cifar10/resnet110/ce'} and "
                                         rf"{b / 'cifar10/resnet110/ce'} both have seed 1, "
                                         r"i.e. they are the same run"):
        build_tables.build([a, b])
    c = tmp_path / "c"
    _write_results(c, "cifar10/resnet110/ce", paper.get_config(
        "cell=cifar10/resnet110/ce,seed=2,num_epochs=1"))
    with pytest.raises(ValueError, match=r"differ in num_epochs 350 -> 1: replicates must differ "
                                         r"only in their seed"):
        build_tables.build([a, c])
    with pytest.raises(SystemExit):
        build_tables.main(["--workroot", f"{a},{c}", "--out", str(tmp_path / "t.md")])
    assert "differ in num_epochs 350 -> 1" in capsys.readouterr().err
    assert not (tmp_path / "t.md").exists()


def test_sweep_stops_at_a_failing_cell_or_with_keep_going_runs_the_rest(tmp_path, capsys,
                                                                        monkeypatch):
    from calib_jax import data, evaluate
    trained, evaluated = [], []

    def fake_train(config, workdir):
        if config.dataset == "cifar100":
            raise data.DataNotFoundError("CIFAR-100 (train) not found")
        trained.append(Path(workdir).relative_to(tmp_path).as_posix())

    monkeypatch.setattr(train, "train_and_evaluate", fake_train)
    monkeypatch.setattr(evaluate, "evaluate_run", lambda run_dir, bootstrap_resamples=0:
                        evaluated.append(Path(run_dir).name))
    # Cells run in table order: the CIFAR-100 cell before the Tiny-ImageNet one.
    cells = ["--cells", "tiny_imagenet/*/ce,cifar100/resnet110/ce", "--workroot", str(tmp_path)]
    with pytest.raises(data.DataNotFoundError):
        sweep.main(cells)
    assert trained == [] and evaluated == []
    assert sweep.main([*cells, "--keep-going"]) == 1
    assert trained == ["tiny_imagenet/resnet50_tiny_imagenet/ce"] and evaluated == ["ce"]
    err = capsys.readouterr().err
    assert "FAILED cell=cifar100/resnet110/ce: DataNotFoundError: CIFAR-100" in err
    assert "1 of 2 runs failed" in err


def test_two_sweeps_over_one_work_root_share_the_runs(tmp_path, capsys, monkeypatch):
    """A run another process is training (its directory locked) is left to it ("busy", not a
    failure: exit 0), and one another sweep finished since this one listed it is not trained
    again ("done")."""
    from calib_jax import evaluate, files
    trained, evaluated = [], []
    root = tmp_path
    busy_dir = root / "cifar100" / "resnet110" / "ce"
    finished_dir = root / "tiny_imagenet" / "resnet50_tiny_imagenet" / "ce"

    def fake_train(config, workdir):  # locks as train.train_and_evaluate does
        with files.hold_directory_lock(workdir, "training"):
            trained.append(Path(workdir).relative_to(root).as_posix())
            # Meanwhile another sweep finishes the Tiny-ImageNet cell.
            recipe = paper.get_config("cell=tiny_imagenet/resnet50_tiny_imagenet/ce")
            (finished_dir / "eval_final").mkdir(parents=True)
            (finished_dir / "config.json").write_text(recipe.to_json())
            (finished_dir / "eval_final" / "results.json").write_text("{}")

    monkeypatch.setattr(train, "train_and_evaluate", fake_train)
    monkeypatch.setattr(evaluate, "evaluate_run", lambda run_dir, bootstrap_resamples=0:
                        evaluated.append(Path(run_dir).name))
    cells = ["--cells", "cifar100/resnet110/ce,cifar100/resnet110/brier,tiny_imagenet/*/ce",
             "--workroot", str(root)]
    with files.hold_directory_lock(busy_dir, "training"):
        assert sweep.main([*cells, "--dry-run"]) == 0
        listed = capsys.readouterr().out
        assert (f"todo  cell=cifar100/resnet110/ce -> {busy_dir} (being trained by another "
                f"process: pid {os.getpid()} on ") in listed
        assert f"todo  cell=cifar100/resnet110/brier -> {root}/cifar100/resnet110/brier\n" \
            in listed
        assert sweep.main(cells) == 0
    assert trained == ["cifar100/resnet110/brier"] and evaluated == ["brier"]
    out = capsys.readouterr().out
    assert f"busy  cell=cifar100/resnet110/ce: {busy_dir} is in use by another process" in out
    assert (f"done  cell=tiny_imagenet/resnet50_tiny_imagenet/ce -> {finished_dir} (finished "
            f"by another process meanwhile)") in out
    assert "1 of 3 runs were being trained by another process and were left to it" in out


def test_sweep_trains_a_row_as_one_program_except_its_exception_cells(tmp_path, capsys):
    def planned_runs(cells="cifar10/wide_resnet_26_10/*", *more):  # --vmap-rows --dry-run
        assert sweep.main(["--cells", cells, "--workroot", str(tmp_path), "--vmap-rows",
                           "--dry-run", *more]) == 0
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("run")]

    runs = planned_runs()
    row = tmp_path / "cifar10" / "wide_resnet_26_10"
    assert runs == [
        f"run   cell=cifar10/wide_resnet_26_10/[ce,mmce_weighted,label_smoothing,focal,flsd53] "
        f"-> {row}",
        f"run   cell=cifar10/wide_resnet_26_10/brier -> {row / 'brier'}"]  # 550 epochs
    config = paper.get_config("cell=cifar10/wide_resnet_26_10/[ce,mmce_weighted,flsd53]")
    assert [name for name, _ in train.run_members(config)] == ["ce", "mmce_weighted", "flsd53"]
    # Cells already checkpointed (a sweep stopped midway) train in a program of their own per
    # saved epoch, so none restarts from epoch 0 with the new ones.
    for loss, epoch in (("focal", "20"), ("ce", "20"), ("flsd53", "10")):
        (row / loss / "checkpoints" / epoch).mkdir(parents=True)
    (row / "ce" / "checkpoints" / "30.orbax-checkpoint-tmp-1").mkdir()  # a save in flight
    assert sweep.split_by_progress(["ce", "brier", "focal", "flsd53"], row) == [
        ["ce", "focal"], ["brier"], ["flsd53"]]
    assert planned_runs() == [
        f"run   cell=cifar10/wide_resnet_26_10/[ce,focal] -> {row}",
        f"run   cell=cifar10/wide_resnet_26_10/[mmce_weighted,label_smoothing] -> {row}",
        f"run   cell=cifar10/wide_resnet_26_10/flsd53 -> {row / 'flsd53'}",
        f"run   cell=cifar10/wide_resnet_26_10/brier -> {row / 'brier'}"]
    # One other seed trains one run per cell, in <loss>-seed<s> (a program with one seed would
    # name its members <loss>: the recipe seed's directories) ...
    assert planned_runs("cifar10/wide_resnet_26_10/[cb]*", "--seeds", "1,3") == [
        f"run   cell=cifar10/wide_resnet_26_10/ce -> {row / 'ce'}",
        f"run   cell=cifar10/wide_resnet_26_10/brier -> {row / 'brier'}",
        f"run   cell=cifar10/wide_resnet_26_10/ce,seed=3 -> {row / 'ce-seed3'}",
        f"run   cell=cifar10/wide_resnet_26_10/brier,seed=3 -> {row / 'brier-seed3'}"]
    # ... two or more train as one program per recipe, members <loss>-seed<s> with the configs
    # of the single runs (so the done-check and the tables see the same runs) ...
    assert planned_runs("cifar10/wide_resnet_26_10/[cbm]*", "--seeds", "1,3,2")[-2:] == [
        f"run   cell=cifar10/wide_resnet_26_10/[ce,mmce_weighted],seeds=[3,2] -> {row}",
        f"run   cell=cifar10/wide_resnet_26_10/brier,seeds=[3,2] -> {row}"]
    group = paper.get_config("cell=cifar10/wide_resnet_26_10/[ce,mmce_weighted],seeds=[3,2]")
    members = train.run_members(group)
    assert [name for name, _ in members] == ["ce-seed3", "ce-seed2", "mmce_weighted-seed3",
                                             "mmce_weighted-seed2"]
    for name, member in members:
        loss, seed = name.split("-seed")
        single = paper.get_config(f"cell=cifar10/wide_resnet_26_10/{loss},seed={seed}")
        assert json.loads(member.to_json()) == json.loads(single.to_json())
    # ... unless a member has progress the others lack: then each trains on alone.
    (row / "ce-seed2" / "checkpoints" / "5").mkdir(parents=True)
    mmce = "cell=cifar10/wide_resnet_26_10/mmce_weighted"
    assert planned_runs("cifar10/wide_resnet_26_10/[cbm]*", "--seeds", "1,3,2")[-5:] == [
        f"run   cell=cifar10/wide_resnet_26_10/brier,seeds=[3,2] -> {row}",
        f"run   cell=cifar10/wide_resnet_26_10/ce,seed=3 -> {row / 'ce-seed3'}",
        f"run   {mmce},seed=3 -> {row / 'mmce_weighted-seed3'}",
        f"run   cell=cifar10/wide_resnet_26_10/ce,seed=2 -> {row / 'ce-seed2'}",
        f"run   {mmce},seed=2 -> {row / 'mmce_weighted-seed2'}"]


SHARED = REPO.parent / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "cifar10").is_dir(), reason=f"no CIFAR-10 copy at {SHARED}")
def test_demo_runs_end_to_end_at_a_tiny_size(tmp_path, capsys):
    """`make demo`'s script (the README's first command), at a size the suite affords: both
    losses train, the table is printed, and results.json / results.md / reliability.png are
    written."""
    import demo
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--epochs", "1", "--train-size", "256",
                      "--batch-size", "128", "--eval-size", "500"]) == 0
    printed = capsys.readouterr().out
    assert "| Cross-entropy |" in printed and "| FLSD-53 |" in printed
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["results"]) == {"ce", "flsd53"}
    for result in saved["results"].values():
        assert 0.1 <= result["temperature"] <= 10
        for tag in ("before", "after"):
            values = result["metrics"][tag]
            assert 0 <= values["ece"] <= 1 and 0 <= values["error"] <= 1
            assert set(values["ood_auroc"]) == {"cifar10_c"}
    assert (out / "results.md").read_text().startswith("| loss |")
    # The paired difference: its value is the difference of the two rows' ECEs.
    gaps = saved["ece_gap_flsd53_minus_ce"]
    for tag in ("before", "after"):
        want = saved["results"]["flsd53"]["metrics"][tag]["ece"] - \
            saved["results"]["ce"]["metrics"][tag]["ece"]
        assert abs(gaps[tag]["gap"] - want) < 1e-6
        assert gaps[tag]["basic_95"][0] <= gaps[tag]["basic_95"][1]
    assert "FLSD-53's test ECE minus cross-entropy's, in points: before T " in printed
    assert "paired resamples of the test set" in (out / "results.md").read_text()
    assert (out / "reliability.png").stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--train-size", "100000"], "--train-size <= 45,000"),
    (["--train-size", "64"], "--batch-size <= --train-size"),
    (["--batch-size", "0"], "need 1 <= --batch-size"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--lr", "-0.1"], "--lr must be a positive number"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--eval-size", "-5"], "--eval-size must be >= 0"),
    (["--eval", "500"], "unrecognized arguments: --eval"),  # not taken for --eval-size
])
def test_demo_refuses_bad_arguments_before_reading_data(args, message, capsys, monkeypatch):
    import demo
    monkeypatch.setattr(demo.datasets, "load", lambda *a, **k: pytest.fail("data was loaded"))
    with pytest.raises(SystemExit) as info:
        demo.main(args)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_demo_refuses_an_out_that_is_a_file(tmp_path, capsys):
    import demo
    (tmp_path / "f").write_text("kept")
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path / "f")])
    assert "is a file" in capsys.readouterr().err and (tmp_path / "f").read_text() == "kept"
