"""Builds the paper's tables from evaluation results, our numbers beside the paper's.

Usage: python experiments/build_tables.py --workroot runs/paper [--out runs/paper/tables.md]

Reads ``<workroot>/<dataset>/<model>/<loss>/eval_final/results.json`` and
``experiments/paper_numbers.json``; prints (and writes) markdown tables of test
ECE before / after temperature scaling with T, test error, and OOD AUROC
(entropy), each as "ours | paper | difference" in percent. Cells without a
result show "-". A cell trained with another recipe than the paper's (e.g. a trial sweep's
``--set num_epochs=1``: its ``results.json`` records the config) is marked ``*`` and its
differences are listed under the title, with the data the results came from (the offline
CIFAR-10 copy is JPEG-compressed: its numbers are close to, not equal to, the original's).
"""

import argparse
import collections
import json
import os
import sys
from pathlib import Path

from calib_jax import train
from calib_jax.files import atomic_write_text

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "configs"))
import paper as paper_configs  # noqa: E402

PAPER = Path(__file__).with_name("paper_numbers.json")
#: Marks our number of a cell whose recipe differs from the paper's.
OFF_RECIPE = "*"


def recipe_differences(results) -> dict:
    """``{cell: ["field ours (paper's recipe: value)", ...]}`` for the cells whose recorded
    config differs from ``paper.get_config(cell=...)`` in what they compute."""
    out = {}
    for (dataset, model, loss), r in results.items():
        try:
            recipe = paper_configs.get_config(f"cell={dataset}/{model}/{loss}")
        except ValueError as e:  # not a cell of the tables
            out[(dataset, model, loss)] = [str(e)]
            continue
        changed = train.field_differences(json.loads(recipe.to_json()), r.get("config", {}),
                                          ignore=train.EXECUTION_FIELDS)
        if changed:
            out[(dataset, model, loss)] = [f"{k} {ours!r} (paper's recipe: {theirs!r})"
                                           for k, theirs, ours in changed]
    return out


def load_results(workroot: Path):
    results = {}
    for path in sorted(workroot.glob("*/*/*/eval_final/results.json")):
        dataset, model, loss = path.parts[-5:-2]
        results[(dataset, model, loss)] = json.loads(path.read_text())
    return results


def fmt(value, digits=2, mark=""):
    return "-" if value is None else f"{value:.{digits}f}{mark}"


def diff(ours, paper):
    return "-" if ours is None or paper is None else f"{ours - paper:+.2f}"


def ece_table(results, paper, off=()):
    lines = ["| dataset | model | loss | ECE ours | ECE paper | diff | ECE (T) ours | "
             "ECE (T) paper | diff | T ours | T paper |", "|" + "---|" * 11]
    for cell in paper["ece"]:
        key = (cell["dataset"], cell["model"], cell["loss"])
        r = results.get(key)
        ours = ours_t = t = None
        if r:
            ours = 100 * r["test"]["before"]["ece"]
            ours_t = 100 * r["test"]["after"]["ece"]
            t = r["temperature"]["value"]
        mark = OFF_RECIPE if key in off else ""
        lines.append(f"| {' | '.join(key)} | {fmt(ours, mark=mark)} | {cell['ece']:.2f} | "
                     f"{diff(ours, cell['ece'])} | {fmt(ours_t, mark=mark)} | "
                     f"{cell['ece_t']:.2f} | "
                     f"{diff(ours_t, cell['ece_t'])} | {fmt(t, 1)} | {cell['temperature']:.1f} |")
    return "\n".join(lines)


def error_table(results, paper, off=()):
    lines = ["| dataset | model | loss | error ours | error paper | diff |", "|" + "---|" * 6]
    for cell in paper["error"]:
        key = (cell["dataset"], cell["model"], cell["loss"])
        r = results.get(key)
        ours = 100 * r["test"]["before"]["error"] if r else None
        mark = OFF_RECIPE if key in off else ""
        lines.append(f"| {' | '.join(key)} | {fmt(ours, mark=mark)} | {cell['error']:.2f} | "
                     f"{diff(ours, cell['error'])} |")
    return "\n".join(lines)


def ood_table(results, paper, off=()):
    lines = ["| OOD set | model | loss | AUROC ours | paper | diff | AUROC (T) ours | paper | "
             "diff |", "|" + "---|" * 9]
    for cell in paper["ood_auroc"]:
        key = (cell["dataset"], cell["model"], cell["loss"])
        r = results.get(key)
        mark = OFF_RECIPE if key in off else ""
        ours = ours_t = None
        if r and cell["ood"] in r["test"]["before"]["ood_auroc"]:
            ours = 100 * r["test"]["before"]["ood_auroc"][cell["ood"]]["entropy"]
            ours_t = 100 * r["test"]["after"]["ood_auroc"][cell["ood"]]["entropy"]
        lines.append(f"| {cell['ood']} | {cell['model']} | {cell['loss']} | "
                     f"{fmt(ours, mark=mark)} | "
                     f"{cell['auroc_entropy']:.2f} | {diff(ours, cell['auroc_entropy'])} | "
                     f"{fmt(ours_t, mark=mark)} | {cell['auroc_entropy_t']:.2f} | "
                     f"{diff(ours_t, cell['auroc_entropy_t'])} |")
    return "\n".join(lines)


def build(workroot) -> str:
    paper = json.loads(PAPER.read_text())
    results = load_results(Path(workroot))
    off = recipe_differences(results)
    sources = collections.Counter((r.get("config", {}).get("dataset", cell[0]),
                                   r.get("data", {}).get("test", "?"))
                                  for cell, r in results.items())
    notes = ["Test data: " + ", ".join(f"{d} from {src} ({n} cells)"
                                       for (d, src), n in sorted(sources.items())) + "."] \
        if sources else []
    if off:
        notes.append(f"`{OFF_RECIPE}`: trained with another recipe than the paper's, not "
                     f"comparable with its numbers:")
        notes.append("\n".join(f"- {'/'.join(cell)}: {'; '.join(why)}"
                               for cell, why in sorted(off.items())))
    return "\n\n".join([
        f"# Our results beside the paper's ({len(results)} cells evaluated)", *notes,
        "## Test ECE (%), before / after temperature scaling", ece_table(results, paper, off),
        "## Test error (%)", error_table(results, paper, off),
        "## OOD AUROC (%), entropy score, models trained on CIFAR-10",
        ood_table(results, paper, off)])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workroot", default="runs/paper")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not Path(args.workroot).is_dir():
        # A mistyped path would otherwise give a table of the paper's numbers only.
        parser.error(f"--workroot {args.workroot}: no such directory (the --workroot that "
                     "experiments/sweep.py trained and evaluated into)")
    text = build(args.workroot)
    print(text)
    out = Path(args.out) if args.out else Path(args.workroot) / "tables.md"
    atomic_write_text(out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
