"""Runs many cells one after another: train (resumable), then the evaluation pass.

Usage:
  python experiments/sweep.py --cells 'cifar10/resnet50/*' --workroot runs/paper [--dry-run]
      [--set num_epochs=1,batch_size=64]

``--cells`` takes shell-style patterns over ``dataset/model/loss`` (comma
separated); a cell whose ``eval_final/results.json`` exists is skipped, and a
half-trained cell resumes from its checkpoint, so the sweep can be restarted
at any time. Each cell's work directory is ``<workroot>/<dataset>/<model>/<loss>``.
"""

import argparse
import fnmatch
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "configs"))
import paper  # noqa: E402


def selected(patterns):
    return [c for c in paper.cells() if any(fnmatch.fnmatch("/".join(c), p) for p in patterns)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", required=True)
    parser.add_argument("--workroot", default="runs/paper")
    parser.add_argument("--set", default="", help="config overrides, key=value,...")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    cells = selected(args.cells.split(","))
    if not cells:
        parser.error(f"no cell matches {args.cells!r}")
    for dataset, model, loss in cells:
        workdir = Path(args.workroot) / dataset / model / loss
        done = (workdir / "eval_final" / "results.json").exists()
        spec = f"cell={dataset}/{model}/{loss}" + (f",{args.set}" if args.set else "")
        print(f"{'done ' if done else 'run  '} {spec} -> {workdir}", flush=True)
        if done or args.dry_run:
            continue
        from calib_jax import evaluate, train
        train.train_and_evaluate(paper.get_config(spec), workdir)
        evaluate.evaluate_run(workdir, which="final")
    return 0


if __name__ == "__main__":
    sys.exit(main())
