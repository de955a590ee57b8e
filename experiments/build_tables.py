"""Builds the paper's tables from evaluation results, our numbers beside the paper's.

Usage: python experiments/build_tables.py --workroot runs/paper [--out runs/paper/tables.md]
       python experiments/build_tables.py --workroot runs/paper,runs/paper-seed2,runs/paper-seed3 \
           --out runs/tables-3-seeds.md

Reads ``<workroot>/<dataset>/<model>/<loss>/eval_final/results.json`` (``eval_best/`` for a
run whose ``config.eval_checkpoint`` is ``best``: 20 Newsgroups and SST, as the reference) and
``experiments/paper_numbers.json``; prints (and writes) markdown tables of test
ECE before / after temperature scaling with T, test error, and OOD AUROC
(entropy), each as "ours | paper | difference" in percent, then our AdaECE, classwise
ECE and NLL before / after scaling (the paper's appendix tables of those are not in our
docs, so they have no "paper" column). Cells without a result show "-"; evaluated cells
that the paper's tables lack (e.g. FL-3 on CIFAR-100) follow the paper's cells with "-" as
the paper's number. A cell trained with another recipe than the paper's (e.g. a trial
sweep's ``--set num_epochs=1``: its ``results.json`` records the config) is marked ``*``
and its differences are listed under the title, with the data the results came from (the
offline CIFAR-10 copy is JPEG-compressed: its numbers are close to, not equal to, the
original's).

Beside the markdown goes ``<out>.json`` (default ``tables.json``): every evaluated cell's
numbers over its runs, mean and sample standard deviation (:func:`cell_summary`).

Runs evaluated with bootstrap intervals (``sweep.py --bootstrap N``) get a last table, one
row per run: error, ECE before / after scaling, NLL and OOD AUROC (entropy) after, each with
its basic 95 % interval over resamples of the test set (:func:`interval_table`).

**Replicates (error bars over seeds).** A cell's runs with other seeds -- ``<loss>-seed<s>/``
beside ``<loss>/``, as ``sweep.py --seeds 1,2,3`` trains them, or the same cell in several work
roots, each the sweep trained with another seed (``sweep.py --workroot runs/paper-seed2 --set
seed=2``) -- give one table whose numbers are the mean over a cell's runs, followed by
``± s`` (the sample standard deviation) where a cell has two or more; the differences to the
paper are of the mean.
The runs of one cell must differ in their seed and in nothing else that changes what they
compute; otherwise the tables are refused, naming the cell, the work roots and the fields
(two copies of one run, or a trial run beside a full one, would give a wrong mean). The seed
is not a recipe difference: it does not mark a cell ``*``. The members of a program trained
with several seeds (``python -m calib_jax.train --workdir <workroot>/<dataset>/<model> --config
'experiments/configs/paper.py:cell=<dataset>/<model>/[ce,flsd53],seeds=[1,2,3]'``: directories
``ce-seed1``, ...) are replicates of their cell in the same way, within one work root.
"""

import argparse
import collections
import json
import math
import os
import re
import sys
from pathlib import Path

from calib_jax import evaluate, train
from calib_jax.files import atomic_write_text

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "configs"))
import paper as paper_configs  # noqa: E402

PAPER = Path(__file__).with_name("paper_numbers.json")
#: Marks our number of a cell whose recipe differs from the paper's.
OFF_RECIPE = "*"
#: Config fields in which the replicates of a cell differ: not a recipe difference.
SEED_FIELDS = frozenset({"seed", "seeds"})


def recipe_differences(results) -> dict:
    """``{cell: ["field ours (paper's recipe: value)", ...]}`` for the cells whose recorded
    config differs from ``paper.get_config(cell=...)`` in what they compute (the seed apart).

    ``results`` maps a cell to its runs (:func:`load_replicates`, which checked their configs
    to be equal up to the seed: the first is read).
    """
    out = {}
    for (dataset, model, loss), (r, *_) in results.items():
        try:
            recipe = paper_configs.get_config(f"cell={dataset}/{model}/{loss}")
        except ValueError as e:  # not a cell of the tables
            out[(dataset, model, loss)] = [str(e)]
            continue
        changed = train.field_differences(json.loads(recipe.to_json()), r.get("config", {}),
                                          ignore=train.EXECUTION_FIELDS | SEED_FIELDS)
        if changed:
            out[(dataset, model, loss)] = [f"{k} {ours!r} (paper's recipe: {theirs!r})"
                                           for k, theirs, ours in changed]
    return out


def load_results(workroot: Path):
    """``{(dataset, model, loss): results.json}`` of the evaluated cells under ``workroot``:
    each run's evaluation of its ``config.eval_checkpoint`` (``eval_final/``; ``eval_best/``
    for 20 Newsgroups and SST, the reference's protocol)."""
    results = {}
    for run_dir in sorted({p.parents[1] for p in Path(workroot).glob("*/*/*/eval_*/results.json")}):
        path = evaluate.table_evaluation_dir(run_dir) / "results.json"
        if path.exists():
            results[run_dir.parts[-3:]] = json.loads(path.read_text())
    return results


#: A member of a group trained with several seeds (``calib_jax.train.run_members``):
#: ``<loss>-seed<s>``, a replicate of the cell ``<loss>``.
SEED_MEMBER = re.compile(r"^(?P<loss>.+)-seed(?P<seed>\d+)$")


def load_replicates(workroots) -> dict:
    """``{cell: [results.json, ...]}`` over one or several work roots (one per seed), in the
    roots' order. A run directory ``<loss>-seed<s>`` (a member of a program trained with
    ``seeds=[...]``) is a run of the cell ``<loss>``.

    Raises ValueError when two runs of a cell differ in anything but the seed and the
    execution fields, have the same seed (the same run twice), or one has no recorded config.
    """
    runs = {}  # cell -> [(run directory, results)]
    for root in workroots:
        for (dataset, model, name), r in load_results(root).items():
            member = SEED_MEMBER.match(name)
            loss = member["loss"] if member else name
            runs.setdefault((dataset, model, loss), []).append(
                (Path(root) / dataset / model / name, r))
    for cell, replicates in runs.items():
        if len(replicates) < 2:
            continue
        name = "/".join(cell)
        (first_dir, first), *_ = replicates
        if any("config" not in r for _, r in replicates):
            raise ValueError(f"cell {name}: a results.json without its config (written by an "
                             f"older calib_jax) among the runs "
                             f"{[str(run_dir) for run_dir, _ in replicates]}: its seed is "
                             "unknown; evaluate it again (python -m calib_jax.evaluate) or "
                             "leave its work root out")
        seeds = {}
        for run_dir, r in replicates:
            changed = train.field_differences(first["config"], r["config"],
                                              ignore=train.EXECUTION_FIELDS | SEED_FIELDS)
            if changed:
                raise ValueError(
                    f"cell {name}: the runs in {first_dir} and {run_dir} differ in "
                    + "; ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changed)
                    + ": replicates must differ only in their seed (train them with the "
                      "same --set, and sweep.py --seeds)")
            seed = r["config"].get("seed")
            if seed in seeds:
                raise ValueError(f"cell {name}: the runs in {seeds[seed]} and {run_dir} both "
                                 f"have seed {seed}, i.e. they are the same run: replicates "
                                 "need distinct seeds (sweep.py --seeds 1,2,3); leave one of "
                                 "them out")
            seeds[seed] = run_dir
    return {cell: [r for _, r in replicates] for cell, replicates in runs.items()}


def mean_std(values) -> tuple:
    """``(mean, sample standard deviation)`` of the values that are not None; the deviation is
    None for a single value, both are None for none."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def stat(values, digits=2, mark=""):
    """``"-"``, one value, or ``"mean ± sample std"`` of several, with ``mark`` after."""
    m, s = mean_std(values)
    if m is None:
        return "-"
    m = evaluate.fixed(m, digits)
    return f"{m}{mark}" if s is None else f"{m} ± {evaluate.fixed(s, digits)}{mark}"


def mean(values):
    return mean_std(values)[0]


def cell_summary(workroot) -> dict:
    """Every evaluated cell's numbers over its runs, for notebooks and scripts (what
    ``main`` also writes as JSON beside the tables): ``{"dataset/model/loss": {"runs": n,
    "seeds": [...], "temperature": {"mean", "std"}, "test": {"before" | "after": {metric:
    {"mean", "std"}, "ood_auroc": {set: {score: {"mean", "std"}}}}}}}``, metrics as fractions
    (the tables' percentages / 100), ``std`` the sample standard deviation (None for one run);
    and, where a run was evaluated with bootstrap intervals, ``"test_intervals"``: each run's
    (``results.json``'s; None for a run without).
    ``workroot``: one work root or a list of them, as :func:`build`."""
    return _summary(load_replicates(_workroots(workroot)))


def _summary(results) -> dict:
    """:func:`cell_summary` of the runs :func:`load_replicates` gave."""
    def summary(values):
        m, s = mean_std(values)
        return {"mean": m, "std": s}

    out = {}
    for cell, runs in results.items():
        test = {}
        for when in ("before", "after"):
            reports = [r["test"][when] for r in runs]
            metrics = sorted({k for rep in reports for k, v in rep.items()
                              if isinstance(v, (int, float))})
            test[when] = {k: summary([rep.get(k) for rep in reports]) for k in metrics}
            sets = sorted({s for rep in reports for s in rep.get("ood_auroc", {})})
            test[when]["ood_auroc"] = {
                s: {score: summary([rep["ood_auroc"][s][score] for rep in reports
                                    if s in rep.get("ood_auroc", {})])
                    for score in ("entropy", "confidence")} for s in sets}
        out["/".join(cell)] = {
            "runs": len(runs), "seeds": [r.get("config", {}).get("seed") for r in runs],
            "temperature": summary([r["temperature"]["value"] for r in runs]), "test": test}
        if any(r.get("test_intervals") for r in runs):
            out["/".join(cell)]["test_intervals"] = [r.get("test_intervals") for r in runs]
    return out


def _workroots(workroot) -> list:
    return [Path(workroot)] if isinstance(workroot, (str, os.PathLike)) else \
        [Path(w) for w in workroot]


def diff(ours, paper):
    return "-" if ours is None or paper is None else f"{ours - paper:+.2f}"


def _paper(value, digits=2):
    return "-" if value is None else evaluate.fixed(value, digits)


def _rows(results, paper_cells):
    """The paper's cells in its order, then the evaluated cells of the tables it lacks."""
    keys = [(c["dataset"], c["model"], c["loss"]) for c in paper_cells]
    extra = [c for c in paper_configs.cells() if c in results and c not in set(keys)]
    return [(key, cell) for key, cell in zip(keys, paper_cells)] + [(c, {}) for c in extra]


def _test(runs, when, metric, scale=100.0):
    """``scale`` x a test metric of each run; None where a results.json lacks it."""
    values = (r["test"][when].get(metric) for r in runs)
    return [None if v is None else scale * v for v in values]


def _beside(ours, paper, mark):
    """``"ours | paper | difference"``: our runs' values (mean ± std), the paper's number, and
    the difference of the mean."""
    return f"{stat(ours, mark=mark)} | {_paper(paper)} | {diff(mean(ours), paper)}"


def ece_table(results, paper, off=()):
    lines = ["| dataset | model | loss | ECE ours | ECE paper | diff | ECE (T) ours | "
             "ECE (T) paper | diff | T ours | T paper |", "|" + "---|" * 11]
    for key, cell in _rows(results, paper["ece"]):
        runs = results.get(key, [])
        before, after = _test(runs, "before", "ece"), _test(runs, "after", "ece")
        temps = [r["temperature"]["value"] for r in runs]
        mark = OFF_RECIPE if key in off else ""
        lines.append(f"| {' | '.join(key)} | {_beside(before, cell.get('ece'), mark)} | "
                     f"{_beside(after, cell.get('ece_t'), mark)} | {stat(temps, 1)} | "
                     f"{_paper(cell.get('temperature'), 1)} |")
    return "\n".join(lines)


def error_table(results, paper, off=()):
    lines = ["| dataset | model | loss | error ours | error paper | diff |", "|" + "---|" * 6]
    for key, cell in _rows(results, paper["error"]):
        ours = _test(results.get(key, []), "before", "error")
        mark = OFF_RECIPE if key in off else ""
        lines.append(f"| {' | '.join(key)} | {_beside(ours, cell.get('error'), mark)} |")
    return "\n".join(lines)


def ood_table(results, paper, off=()):
    lines = ["| OOD set | model | loss | AUROC ours | paper | diff | AUROC (T) ours | paper | "
             "diff |", "|" + "---|" * 9]
    for cell in paper["ood_auroc"]:
        key = (cell["dataset"], cell["model"], cell["loss"])
        mark = OFF_RECIPE if key in off else ""
        runs = [r for r in results.get(key, []) if cell["ood"] in r["test"]["before"]["ood_auroc"]]
        ours = [100 * r["test"]["before"]["ood_auroc"][cell["ood"]]["entropy"] for r in runs]
        ours_t = [100 * r["test"]["after"]["ood_auroc"][cell["ood"]]["entropy"] for r in runs]
        lines.append(f"| {cell['ood']} | {cell['model']} | {cell['loss']} | "
                     f"{_beside(ours, cell['auroc_entropy'], mark)} | "
                     f"{_beside(ours_t, cell['auroc_entropy_t'], mark)} |")
    return "\n".join(lines)


def other_metrics_table(results, paper, off=()):
    """Our AdaECE and classwise ECE (%) and NLL before / after scaling, per cell of the ECE
    table (the paper's numbers for these are not in our docs)."""
    lines = ["| dataset | model | loss | AdaECE | AdaECE (T) | classwise ECE | "
             "classwise ECE (T) | NLL | NLL (T) |", "|" + "---|" * 9]
    for key, _ in _rows(results, paper["ece"]):
        runs = results.get(key, [])
        mark = OFF_RECIPE if key in off else ""
        values = [stat(_test(runs, when, metric, scale), mark=mark)
                  for metric, scale in (("adaptive_ece", 100.0), ("classwise_ece", 100.0),
                                        ("nll", 1.0))
                  for when in ("before", "after")]
        lines.append(f"| {' | '.join(key)} | {' | '.join(values)} |")
    return "\n".join(lines)


def _with_interval(value, entry, scale, digits, mark):
    """``"value [low, high]"`` (the basic interval); the value alone without ``entry``."""
    shown = f"{evaluate.fixed(scale * value, digits)}{mark}"
    if not entry:
        return shown
    low, high = entry["basic"]
    return f"{shown} {evaluate.fixed_interval(scale * low, scale * high, digits)}"


def interval_table(results, off=()):
    """The runs evaluated with bootstrap intervals (``evaluate --bootstrap N``, ``sweep.py
    --bootstrap N``), one row each: error, ECE before / after scaling, NLL after, and OOD
    AUROC (entropy) after, each with its basic 95 % interval over resamples of the test set
    (OOD AUROC: and of the OOD set). None when no run has them."""
    order = {cell: i for i, cell in enumerate(paper_configs.cells())}
    lines = ["| dataset | model | loss | seed | resamples | error | ECE | ECE (T) | NLL (T) | "
             "OOD AUROC (T), entropy |", "|" + "---|" * 10]
    for key in sorted(results, key=lambda k: (order.get(k, len(order)), k)):
        mark = OFF_RECIPE if key in off else ""
        for r in results[key]:
            intervals = r.get("test_intervals")
            if not intervals:
                continue
            test, before, after = r["test"], intervals["before"], intervals["after"]
            ood_cells = "; ".join(
                f"{name} " + _with_interval(scores["entropy"],
                                            after.get("ood_auroc", {}).get(name, {}).get(
                                                "entropy"), 100.0, 2, mark)
                for name, scores in sorted(test["after"]["ood_auroc"].items())) or "-"
            cells = [_with_interval(test["before"]["error"], before.get("error"), 100.0, 2, mark),
                     _with_interval(test["before"]["ece"], before.get("ece"), 100.0, 2, mark),
                     _with_interval(test["after"]["ece"], after.get("ece"), 100.0, 2, mark),
                     _with_interval(test["after"]["nll"], after.get("nll"), 1.0, 4, mark),
                     ood_cells]
            lines.append(f"| {' | '.join(key)} | {r.get('config', {}).get('seed', '-')} | "
                         f"{intervals['num_resamples']:,} | {' | '.join(cells)} |")
    return "\n".join(lines) if len(lines) > 2 else None


def _replicate_notes(results, workroots) -> list:
    """What ``±`` means, the seeds and the work roots, and the cells with fewer runs than the
    most; nothing when every cell has one run."""
    most = max((len(runs) for runs in results.values()), default=0)
    if most < 2:
        return []
    seeds = sorted({r.get("config", {}).get("seed") for runs in results.values() for r in runs},
                   key=lambda s: (s is None, s if isinstance(s, int) else 0))
    roots = f"{len(workroots)} work roots ({', '.join(map(str, workroots))})" \
        if len(workroots) > 1 else f"work root {workroots[0]}"
    note = (f"Replicates: seeds {', '.join(map(str, seeds))}; {roots}. A number with `±` is "
            "the mean over a cell's runs and the sample standard deviation; differences are of "
            "the mean.")
    fewer = sorted((cell, len(runs)) for cell, runs in results.items() if len(runs) < most)
    if fewer:
        note += f" Cells with fewer than {most} runs: " + ", ".join(
            f"{'/'.join(cell)} ({n})" for cell, n in fewer) + "."
    return [note]


def build(workroot) -> str:
    """The tables' markdown for one work root, or a list of work roots (replicates)."""
    workroots = _workroots(workroot)
    return _tables(load_replicates(workroots), workroots)


def _tables(results, workroots) -> str:
    """:func:`build` of the runs :func:`load_replicates` read from ``workroots``."""
    paper = json.loads(PAPER.read_text())
    off = recipe_differences(results)
    sources = collections.Counter((r.get("config", {}).get("dataset", cell[0]),
                                   r.get("data", {}).get("test", "?"))
                                  for cell, runs in results.items() for r in runs)
    notes = ["Test data: " + ", ".join(f"{d} from {src} ({n} run{'s' if n != 1 else ''})"
                                       for (d, src), n in sorted(sources.items())) + "."] \
        if sources else []
    notes += _replicate_notes(results, workroots)
    if off:
        notes.append(f"`{OFF_RECIPE}`: trained with another recipe than the paper's, not "
                     f"comparable with its numbers:")
        notes.append("\n".join(f"- {'/'.join(cell)}: {'; '.join(why)}"
                               for cell, why in sorted(off.items())))
    intervals = interval_table(results, off)
    return "\n\n".join([
        f"# Our results beside the paper's ({len(results)} cells evaluated)", *notes,
        "## Test ECE (%), before / after temperature scaling", ece_table(results, paper, off),
        "## Test error (%)", error_table(results, paper, off),
        "## OOD AUROC (%), entropy score, models trained on CIFAR-10",
        ood_table(results, paper, off),
        "## Test AdaECE (%), classwise ECE (%) and NLL, before / after temperature scaling "
        "(ours only: the paper's appendix tables are not in our docs)",
        other_metrics_table(results, paper, off),
        *(["## Bootstrap 95 % intervals of single runs (%; NLL as is)",
           "Each run evaluated with intervals (`sweep.py --bootstrap N`): its number and the "
           "basic interval over N resamples of its test set (OOD AUROC: and of the OOD set), "
           "T fixed. The spread of one run's estimate over test sets of this size -- not over "
           "seeds, which `±` above gives; see calib_jax.bootstrap on what an interval of a "
           "calibration error covers.", intervals] if intervals else [])])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    parser.add_argument("--workroot", default="runs/paper",
                        help="the --workroot of experiments/sweep.py; several, comma "
                             "separated, are replicates (one per seed): mean ± std")
    parser.add_argument("--out", default=None,
                        help="default: <workroot>/tables.md (required with several work roots); "
                             "the numbers per cell go beside it as JSON (tables.json)")
    args = parser.parse_args(argv)
    workroots = [w for w in args.workroot.split(",") if w]
    if not workroots:
        parser.error("--workroot: give the work root of experiments/sweep.py (or several, "
                     "comma separated)")
    for workroot in workroots:
        if not Path(workroot).is_dir():
            # A mistyped path would otherwise give a table of the paper's numbers only.
            parser.error(f"--workroot {workroot}: no such directory (the --workroot that "
                         "experiments/sweep.py trained and evaluated into)")
    if len(set(map(os.path.realpath, workroots))) < len(workroots):
        parser.error(f"--workroot {args.workroot}: a work root is given twice (each is one "
                     "replicate: its runs would count twice)")
    if args.out and Path(args.out).suffix == ".json":
        parser.error(f"--out {args.out}: give the markdown file (e.g. tables.md); the numbers "
                     "go beside it as <name>.json")
    if len(workroots) > 1 and not args.out:
        parser.error("--out: give the file for the tables of several work roots (the default, "
                     "<workroot>/tables.md, is each single work root's own table)")
    try:
        roots = _workroots(workroots)
        results = load_replicates(roots)  # read once for both files
        text, summary = _tables(results, roots), _summary(results)
    except ValueError as e:
        parser.error(f"--workroot {args.workroot}: {e}")
    for root in roots:
        if not load_results(root):  # e.g. a parent or a sibling of the sweep's --workroot
            print(f"warning: no evaluated run under {root} (the tables read "
                  f"{root}/<dataset>/<model>/<loss>/eval_final/results.json, eval_best/ for "
                  f"20 Newsgroups and SST, which experiments/sweep.py or python -m "
                  f"calib_jax.evaluate writes): its columns are empty.", file=sys.stderr)
    print(text)
    out = Path(args.out) if args.out else Path(workroots[0]) / "tables.md"
    atomic_write_text(out, text + "\n")
    atomic_write_text(out.with_suffix(".json"), json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
