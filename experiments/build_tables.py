"""Builds the paper's tables from evaluation results, our numbers beside the paper's.

Usage: python experiments/build_tables.py --workroot runs/paper [--out runs/paper/tables.md]

Reads ``<workroot>/<dataset>/<model>/<loss>/eval_final/results.json`` and
``experiments/paper_numbers.json``; prints (and writes) markdown tables of test
ECE before / after temperature scaling with T, test error, and OOD AUROC
(entropy), each as "ours | paper | difference" in percent. Cells without a
result show "-".
"""

import argparse
import json
import sys
from pathlib import Path

from calib_jax.files import atomic_write_text

PAPER = Path(__file__).with_name("paper_numbers.json")


def load_results(workroot: Path):
    results = {}
    for path in sorted(workroot.glob("*/*/*/eval_final/results.json")):
        dataset, model, loss = path.parts[-5:-2]
        results[(dataset, model, loss)] = json.loads(path.read_text())
    return results


def fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def diff(ours, paper):
    return "-" if ours is None or paper is None else f"{ours - paper:+.2f}"


def ece_table(results, paper):
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
        lines.append(f"| {' | '.join(key)} | {fmt(ours)} | {cell['ece']:.2f} | "
                     f"{diff(ours, cell['ece'])} | {fmt(ours_t)} | {cell['ece_t']:.2f} | "
                     f"{diff(ours_t, cell['ece_t'])} | {fmt(t, 1)} | {cell['temperature']:.1f} |")
    return "\n".join(lines)


def error_table(results, paper):
    lines = ["| dataset | model | loss | error ours | error paper | diff |", "|" + "---|" * 6]
    for cell in paper["error"]:
        key = (cell["dataset"], cell["model"], cell["loss"])
        r = results.get(key)
        ours = 100 * r["test"]["before"]["error"] if r else None
        lines.append(f"| {' | '.join(key)} | {fmt(ours)} | {cell['error']:.2f} | "
                     f"{diff(ours, cell['error'])} |")
    return "\n".join(lines)


def ood_table(results, paper):
    lines = ["| OOD set | model | loss | AUROC ours | paper | diff | AUROC (T) ours | paper | "
             "diff |", "|" + "---|" * 9]
    for cell in paper["ood_auroc"]:
        r = results.get((cell["dataset"], cell["model"], cell["loss"]))
        ours = ours_t = None
        if r and cell["ood"] in r["test"]["before"]["ood_auroc"]:
            ours = 100 * r["test"]["before"]["ood_auroc"][cell["ood"]]["entropy"]
            ours_t = 100 * r["test"]["after"]["ood_auroc"][cell["ood"]]["entropy"]
        lines.append(f"| {cell['ood']} | {cell['model']} | {cell['loss']} | {fmt(ours)} | "
                     f"{cell['auroc_entropy']:.2f} | {diff(ours, cell['auroc_entropy'])} | "
                     f"{fmt(ours_t)} | {cell['auroc_entropy_t']:.2f} | "
                     f"{diff(ours_t, cell['auroc_entropy_t'])} |")
    return "\n".join(lines)


def build(workroot) -> str:
    paper = json.loads(PAPER.read_text())
    results = load_results(Path(workroot))
    return "\n\n".join([
        f"# Our results beside the paper's ({len(results)} cells evaluated)",
        "## Test ECE (%), before / after temperature scaling", ece_table(results, paper),
        "## Test error (%)", error_table(results, paper),
        "## OOD AUROC (%), entropy score, models trained on CIFAR-10", ood_table(results, paper)])


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
